"""Uniform and fps sampling with true timestamps, on our mp4 files and on files from an independent encoder.

    pytest tests/test_sampling.py
"""
import os
import shutil
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest

from data import load_jsonl
from sampling import VideoError, fps_clip_starts, sample_fps, sample_uniform

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="Debian's ffmpeg is not installed")


def write_video(path, colours, times, rate=None, size=32, codec="libx264"):
    """One flat-coloured frame per entry, shown from its time (seconds); pts in a 1/1000 s time base."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate or 25)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.time_base = s.codec_context.time_base = Fraction(1, 1000)  # else x264 rounds pts to 1/rate
        for colour, t in zip(colours, times):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), colour, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def grey(k):
    return (k * 20 % 250, 0, 250 - k * 20 % 250)


def test_fps_sampling_on_our_video(tiny_world):
    world, _ = tiny_world
    q = load_jsonl(os.path.join(world, "train.jsonl"))[0]
    path = os.path.join(world, q["video"])
    frames, times, clips = sample_fps(path, fps=2, frames_per_clip=4, max_clips=32)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (64, 64, 3) and len(frames) == len(times) == 4 * len(clips)
    native = next(s for s in load_jsonl_scenes(world) if s["name"] in q["video"])["fps"]
    assert np.allclose(times * native, np.round(times * native), atol=1e-3)  # each a real frame's time
    targets = (np.arange(len(times)) + 0.5) / 2
    inside = targets < times[-1] + 1 / native  # targets past the end get the last frame
    assert np.all(times <= targets + 1e-6) and np.all((targets - times)[inside] < 1 / native + 1e-6)
    assert np.all(times[~inside] == times[-1])


def load_jsonl_scenes(world):
    import json
    with open(os.path.join(world, "scenes.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_clips_spread_over_long_videos():
    starts = fps_clip_starts(duration=100.0, fps=2, frames_per_clip=4, max_clips=5)
    np.testing.assert_allclose(starts, [9, 29, 49, 69, 89])  # each 2 s clip centred in a 20 s part
    np.testing.assert_allclose(fps_clip_starts(7.0, 2, 4, 5), [0, 2, 4, 6])  # short: back to back


def test_uniform_sampling_times_and_content(tmp_path):
    path = tmp_path / "steps.mp4"
    write_video(path, [grey(k) for k in range(10)], [k * 0.5 for k in range(10)], rate=2)
    frames, times = sample_uniform(path, 5)  # duration 5 s: targets 0.5, 1.5, ... 4.5
    np.testing.assert_allclose(times, [0.5, 1.5, 2.5, 3.5, 4.5])
    for img, t in zip(frames, times):
        assert np.abs(img[16, 16].astype(int) - grey(int(round(t * 2)))).max() < 12


def test_variable_frame_rate_gives_true_times(tmp_path):
    path = tmp_path / "vfr.mp4"
    shown = [0.0, 0.1, 0.15, 1.0, 1.05, 2.5, 3.7, 3.8]
    write_video(path, [grey(k) for k in range(len(shown))], shown)
    frames, times, clips = sample_fps(path, fps=1, frames_per_clip=2, max_clips=10)
    # targets 0.5, 1.5, 2.5, 3.5 -> the frames on screen then
    np.testing.assert_allclose(times, [0.15, 1.05, 2.5, 2.5], atol=1e-6)
    assert np.abs(frames[1, 5, 5].astype(int) - grey(4)).max() < 12
    assert clips[0] == (0.0, 2.0)


def test_shorter_video_than_a_clip_repeats_its_last_frame(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, [grey(k) for k in range(3)], [0.0, 0.1, 0.2], rate=10)
    frames, times, clips = sample_fps(path, fps=2, frames_per_clip=4, max_clips=4)
    assert len(frames) == 4 and len(clips) == 1
    np.testing.assert_allclose(times, [0.2, 0.2, 0.2, 0.2])  # true times, not invented ones
    frames, times = sample_uniform(path, 8)
    assert len(frames) == 8 and set(np.round(times, 3)) <= {0.0, 0.1, 0.2}


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated", "audio", "zero_frames"])
def test_unreadable_files_raise_one_clear_error(tmp_path, tiny_world, kind):
    world, _ = tiny_world
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "truncated":
        data = open(os.path.join(world, "videos", "train_00000.mp4"), "rb").read()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "audio":
        with av.open(str(path), "w") as c:
            s = c.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, 0
            for p in s.encode(frame):
                c.mux(p)
            for p in s.encode():
                c.mux(p)
    elif kind == "zero_frames":  # a video stream that holds not one frame
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=10)
            s.width = s.height = 32
            s.pix_fmt = "yuv420p"
    for call in (lambda: sample_uniform(path, 4), lambda: sample_fps(path, 2, 4, 4)):
        with pytest.raises(VideoError, match=str(path)):
            call()


def test_a_huge_video_is_scaled_as_it_is_decoded(tmp_path):
    path = tmp_path / "uhd.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 3840, 2160, "yuv420p"
        s.options = {"preset": "ultrafast"}
        for k in range(4):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((2160, 3840, 3), grey(k), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    frames, times = sample_uniform(path, 2, size=64)
    assert frames.shape == (2, 64, 64, 3) and times.tolist() == pytest.approx([0.1, 0.3])
    assert np.abs(frames[1].astype(int) - grey(3)).max() < 12
    assert sample_fps(path, 10, 2, 1)[0].shape == (2, 2160, 3840, 3)  # without size: the video's own


def test_rotation_metadata_turns_the_frame_upright(tmp_path):
    """A phone's portrait video: stored 64x32 with a 90-degree display rotation, shown (and sampled) 32x64."""
    path = tmp_path / "portrait.mp4"
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32], img[:16, 32:], img[16:, 32:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)  # red left; blue, green right
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)
        for _ in range(3):
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    frame = sample_uniform(path, 1)[0][0]
    assert frame.shape == (64, 32, 3)
    assert frame[60, 16].argmax() == 0 and frame[2, 4].argmax() == 2 and frame[2, 28].argmax() == 1
    if FFMPEG:  # an independent decoder, which turns it upright by itself, agrees pixel for pixel
        raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
                              "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(frame.shape), frame)


@needs_ffmpeg
def test_video_from_an_independent_encoder(tmp_path):
    """ffmpeg's own encoder: red for 1 s then blue for 1 s, 25 fps, in a stream that starts late (1.5 s)."""
    path = tmp_path / "ffmpeg.mp4"
    subprocess.run([FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", "color=c=red:s=32x32:r=25:d=1",
                    "-f", "lavfi", "-i", "color=c=blue:s=32x32:r=25:d=1", "-filter_complex", "[0][1]concat=n=2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-output_ts_offset", "1.5", str(path)], check=True)
    with av.open(str(path)) as c:
        assert float(c.streams.video[0].start_time * c.streams.video[0].time_base) >= 1.4  # it really starts late
    frames, times = sample_uniform(path, 4)  # targets 0.25, 0.75, 1.25, 1.75 s from the stream's start
    np.testing.assert_allclose(times, [0.24, 0.72, 1.24, 1.72], atol=0.021)
    assert [int(f[16, 16, 0] > f[16, 16, 2]) for f in frames] == [1, 1, 0, 0]  # red, red, blue, blue
    frames, times, clips = sample_fps(path, fps=4, frames_per_clip=4, max_clips=8)
    assert len(clips) == 2 and np.all(np.diff(times) > 0) and times[0] < 0.2


def test_contact_sheet_shows_the_sampled_frames_with_their_times(tiny_world, tmp_path):
    """`python sampling.py VIDEO` writes a PNG: each cell is a sampled frame (twice the size), labelled with its
    time in white; the PNG decodes back to exactly that image."""
    import sampling
    world, _ = tiny_world
    video = os.path.join(world, load_jsonl(os.path.join(world, "train.jsonl"))[0]["video"])
    out = str(tmp_path / "sheet.png")
    assert sampling.main([video, "--fps=1", "--frames_per_clip=4", "--max_clips=2", f"--out={out}"]) == out
    frames, times, clips = sample_fps(video, 1, 4, 2)
    with av.open(out) as c:
        sheet = next(c.decode(video=0)).to_ndarray(format="rgb24")
    np.testing.assert_array_equal(sheet, sampling.contact_sheet(frames, times, 4))
    H, W = frames.shape[1:3]
    assert sheet.shape == (len(clips) * (2 * H + 14), 4 * 2 * W, 3)
    np.testing.assert_array_equal(sheet[:2 * H, 2 * W:4 * W], frames[1].repeat(2, 0).repeat(2, 1))
    strip = sheet[2 * H:2 * H + 14, :2 * W]
    assert (strip == 255).all(-1).sum() == sampling.label(f"{times[0]:.2f}").sum()  # the label, pixel for pixel
    run = subprocess.run([sys.executable, "sampling.py", str(tmp_path / "missing.mp4")], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode != 0 and "missing.mp4: no such file" in run.stderr and "Traceback" not in run.stderr


def test_skipping_unwanted_frames_keeps_the_pixels(tiny_world):
    """sample_uniform lets the decoder skip frames nothing refers to; what it returns equals the same frames
    out of a plain decode of every frame."""
    world, _ = tiny_world
    path = os.path.join(world, "videos", "train_00002.mp4")
    frames, times = sample_uniform(path, 7)
    with av.open(path) as c:
        every = {round(float(f.time), 6): f.to_ndarray(format="rgb24") for f in c.decode(video=0)}
    for frame, t in zip(frames, times):
        np.testing.assert_array_equal(frame, every[round(float(t), 6)])
