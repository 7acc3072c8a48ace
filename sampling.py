"""
Video sampling: which frames of a video the model sees, and when each was shown (Apollo paper §4.1).

- `sample_uniform(path, num_frames)`: N frames spread evenly over the video, whatever its length.
- `sample_fps(path, fps, frames_per_clip, max_clips)`: frames at a fixed rate, grouped into clips of
  frames_per_clip. When the video needs more clips than max_clips, the *clips* are spread out (each centred
  in an equal part of the video); the frames inside a clip stay at the fixed rate. This is Apollo's choice.

Every frame carries its true presentation time in seconds from the start of the stream, read from the
container's timestamps, so variable frame rates and streams that start late come out right. Decoding takes
two passes: the first reads only the packets' timestamps (cheap), the second decodes until the last frame
needed, skips the frames that are neither wanted nor referred to by others (most B-frames), and converts
to RGB only the frames chosen. Anything unreadable raises VideoError naming the file.
"""
import math
import os
import sys

import av
import numpy as np


FONT = {  # 3x5 bitmaps, one string of 3 bits per row: the contact sheet's labels and the world's glyphs (data.py)
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111", "3": "111 001 111 001 111",
    "4": "101 101 111 001 001", "5": "111 100 111 001 111", "6": "111 100 111 101 111", "7": "111 001 001 010 010",
    "8": "111 101 111 101 111", "9": "111 101 111 001 111", "A": "010 101 111 101 101", "C": "111 100 100 100 111",
    "E": "111 100 111 100 111", "H": "101 101 111 101 101", "L": "100 100 100 100 111", "P": "111 101 111 100 100",
    "T": "111 010 010 010 010", "U": "101 101 101 101 111", "X": "101 101 010 101 101",
    ".": "000 000 000 000 010"}


class VideoError(RuntimeError):
    """A video that cannot be sampled; the message names the file and the cause."""


def frame_times(container, stream, path):
    """Presentation times (sorted, seconds from the stream's start), the pts of each, and the video's end time."""
    pts = []
    try:
        for packet in container.demux(stream):
            if packet.pts is not None and packet.size > 0:
                pts.append(packet.pts)
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: unreadable packets ({e})") from None
    if not pts:
        raise VideoError(f"{path}: the video stream holds no frames")
    pts = np.unique(np.array(pts, dtype=np.int64))  # decode order -> presentation order
    tb = float(stream.time_base)
    start = stream.start_time if stream.start_time is not None else int(pts[0])
    times = (pts - start) * tb
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / float(stream.average_rate or 25)
    return times, pts, float(times[-1] + step)


def open_video(path):
    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise VideoError(f"{path}: no such file") from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"{path}: not a readable video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream (streams: {[s.type for s in container.streams]})")
    return container


def to_rgb(frame, size=None):
    """A decoded frame as (H, W, 3) uint8 RGB, scaled to size x size if given, turned upright if rotated."""
    resize = size and (frame.width, frame.height) != (size, size)
    img = frame.to_ndarray(format="rgb24", **({"width": size, "height": size, "interpolation": "AREA"} if resize
                                               else {}))
    return np.rot90(img, k=round(frame.rotation / 90) % 4).copy() if frame.rotation else img


def decode_at(path, plan, size=None):
    """Frames shown at the times plan(duration) asks for: (T, H, W, 3) uint8 RGB, their true times (T,), duration.

    A target time is served by the last frame whose presentation time is <= it (the first frame before it).
    With size, each chosen frame is scaled to size x size as it is converted (a 4K video then costs what the
    model sees). A frame with rotation metadata (a phone's portrait video) is turned upright.
    """
    with open_video(path) as container:
        stream = container.streams.video[0]
        times, pts, end = frame_times(container, stream, path)
        targets = np.asarray(plan(end), dtype=np.float64)
        idx = np.clip(np.searchsorted(times, targets, side="right") - 1, 0, len(times) - 1)  # (T,)
        wanted = {int(p): None for p in pts[idx]}
        last = max(wanted)
        container.seek(0, stream=stream)  # back to the start after the packet pass
        codec = stream.codec_context
        try:
            for packet in container.demux(stream):
                # a frame no other frame refers to (most B-frames) need not be decoded unless it is wanted
                codec.skip_frame = "NONREF" if packet.pts is not None and packet.pts not in wanted else "DEFAULT"
                for frame in packet.decode():
                    if frame.pts in wanted:
                        wanted[frame.pts] = to_rgb(frame, size)
                if packet.pts is not None and packet.pts >= last and all(f is not None for f in wanted.values()):
                    break
        except av.error.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed ({e})") from None
    missing = [p for p, f in wanted.items() if f is None]
    if missing:
        raise VideoError(f"{path}: {len(missing)} frames listed in the container could not be decoded (truncated?)")
    frames = np.stack([wanted[int(p)] for p in pts[idx]])  # (T, H, W, 3)
    return frames, times[idx], end


def sample_uniform(path, num_frames, size=None):
    """num_frames frames evenly over the video: frames (T, H, W, 3) uint8 and their times (T,) in seconds."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    frames, times, _ = decode_at(path, lambda duration: (np.arange(num_frames) + 0.5) * duration / num_frames, size)
    return frames, times


def fps_clip_starts(duration, fps, frames_per_clip, max_clips):
    """Start times of the clips: back to back from 0, or centred in max_clips equal parts of a long video."""
    clip_len = frames_per_clip / fps
    needed = max(1, math.ceil(duration / clip_len - 1e-9))
    if needed <= max_clips:
        return np.arange(needed) * clip_len
    part = duration / max_clips
    return (np.arange(max_clips) + 0.5) * part - clip_len / 2


def sample_fps(path, fps, frames_per_clip, max_clips, size=None):
    """Clips of frames_per_clip frames at `fps`: frames (T, H, W, 3) uint8, times (T,), clips [(start, end)].

    T = frames_per_clip * number of clips; clip k holds frames k*frames_per_clip .. (k+1)*frames_per_clip - 1.
    A video shorter than a clip repeats its last frame, which keeps its true time.
    """
    if fps <= 0 or frames_per_clip < 1 or max_clips < 1:
        raise ValueError(f"need fps > 0, frames_per_clip >= 1, max_clips >= 1; got {fps}, {frames_per_clip}, "
                         f"{max_clips}")
    def plan(duration):
        starts = fps_clip_starts(duration, fps, frames_per_clip, max_clips)  # (n_clips,)
        return (starts[:, None] + (np.arange(frames_per_clip)[None, :] + 0.5) / fps).reshape(-1)

    frames, times, duration = decode_at(path, plan, size)
    starts = fps_clip_starts(duration, fps, frames_per_clip, max_clips)
    clip_len = frames_per_clip / fps
    clips = [(float(max(s, 0.0)), float(min(s + clip_len, duration))) for s in starts]
    return frames, times, clips


def sample_clips(path, sampling, frames_per_clip, fps=1.0, max_clips=4, num_frames=16, size=None):
    """The video as a run samples it: frames (T, H, W, 3), their times (T,), and clips [(start, end)] of
    frames_per_clip frames each, by fps sampling or by uniform sampling cut into clips."""
    if sampling == "fps":
        return sample_fps(path, fps, frames_per_clip, max_clips, size)
    frames, times = sample_uniform(path, num_frames, size)
    t = times.reshape(-1, frames_per_clip)
    return frames, times, list(zip(t[:, 0].tolist(), t[:, -1].tolist()))


# ---------------------------------------------------------------------------------------------------------------
# What the model saw: a contact sheet of the sampled frames, each labelled with its time in seconds


def label(text, scale=2):
    """text (digits and '.') in the 3x5 font -> a bool mask (5 * scale, 4 * scale * len(text))."""
    glyphs = [np.array([[c == "1" for c in row] for row in FONT[ch].split()]) for ch in text]
    spaced = np.concatenate([np.pad(g, ((0, 0), (0, 1))) for g in glyphs], axis=1)  # (5, 4 * len)
    return np.kron(spaced, np.ones((scale, scale), bool))


def contact_sheet(frames, times, cols, scale=2):
    """frames (T, H, W, 3) uint8 and their times -> one uint8 image: the frames scale times bigger, cols to a
    row (a clip per row for fps sampling), each with its time in white on a dark strip beneath it."""
    T, H, W, _ = frames.shape
    h, w, strip = H * scale, W * scale, 7 * scale
    rows = math.ceil(T / cols)
    sheet = np.full((rows * (h + strip), cols * w, 3), 20, np.uint8)
    for i, (frame, t) in enumerate(zip(frames, times)):
        y, x = (i // cols) * (h + strip), (i % cols) * w
        sheet[y:y + h, x:x + w] = frame.repeat(scale, 0).repeat(scale, 1)
        mask = label(f"{t:.2f}", scale)[:, : w - 2 * scale]
        sheet[y + h + scale:y + h + scale + mask.shape[0], x + scale:x + scale + mask.shape[1]][mask] = 255
    return sheet


def write_png(path, image):
    """An (H, W, 3) uint8 image as PNG, through PyAV's encoder (no imaging library needed)."""
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv):
    """python sampling.py VIDEO [--fps=1 --frames_per_clip=4 --max_clips=4 | --uniform=16] [--out=sheet.png]"""
    opts = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 1:
        raise SystemExit(main.__doc__)
    if "uniform" in opts:
        frames, times = sample_uniform(paths[0], int(opts["uniform"]))
        cols, what = min(8, len(frames)), f"{len(frames)} frames uniformly"
    else:
        fps, per_clip = float(opts.get("fps", 1)), int(opts.get("frames_per_clip", 4))
        frames, times, clips = sample_fps(paths[0], fps, per_clip, int(opts.get("max_clips", 4)))
        cols, what = per_clip, f"{len(clips)} clips of {per_clip} frames at {fps:g} fps: " + \
            ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in clips)
    out = opts.get("out", os.path.splitext(os.path.basename(paths[0]))[0] + "_sheet.png")
    write_png(out, contact_sheet(frames, times, cols, int(opts.get("scale", 2))))
    print(f"{paths[0]}: {what}\nframe times (s): {' '.join(f'{t:.2f}' for t in times)}\nwrote {out}")
    return out


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except VideoError as e:
        sys.exit(f"error: {e}")
