"""
Video sampling: which frames of a video the model sees, and when each was shown (Apollo paper §4.1).

- `sample_uniform(path, num_frames)`: N frames spread evenly over the video, whatever its length.
- `sample_fps(path, fps, frames_per_clip, max_clips)`: frames at a fixed rate, grouped into clips of
  frames_per_clip. When the video needs more clips than max_clips, the *clips* are spread out (each centred
  in an equal part of the video); the frames inside a clip stay at the fixed rate. This is Apollo's choice.

Every frame carries its true presentation time in seconds from the start of the stream, read from the
container's timestamps, so variable frame rates and streams that start late come out right. Decoding takes
two passes: the first reads only the packets' timestamps (cheap), the second decodes until the last frame
needed and converts to RGB only the frames chosen. Anything unreadable raises VideoError naming the file.
"""
import math

import av
import numpy as np


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


def decode_at(path, plan):
    """Frames shown at the times plan(duration) asks for: (T, H, W, 3) uint8 RGB, their true times (T,), duration.

    A target time is served by the last frame whose presentation time is <= it (the first frame before it).
    """
    with open_video(path) as container:
        stream = container.streams.video[0]
        times, pts, end = frame_times(container, stream, path)
        targets = np.asarray(plan(end), dtype=np.float64)
        idx = np.clip(np.searchsorted(times, targets, side="right") - 1, 0, len(times) - 1)  # (T,)
        wanted = {int(p): None for p in pts[idx]}
        last = max(wanted)
        container.seek(0, stream=stream)  # back to the start after the packet pass
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if frame.pts in wanted:
                    wanted[frame.pts] = frame.to_ndarray(format="rgb24")
                if frame.pts is not None and frame.pts >= last:
                    break
        except av.error.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed ({e})") from None
    missing = [p for p, f in wanted.items() if f is None]
    if missing:
        raise VideoError(f"{path}: {len(missing)} frames listed in the container could not be decoded (truncated?)")
    frames = np.stack([wanted[int(p)] for p in pts[idx]])  # (T, H, W, 3)
    return frames, times[idx], end


def sample_uniform(path, num_frames):
    """num_frames frames evenly over the video: frames (T, H, W, 3) uint8 and their times (T,) in seconds."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    frames, times, _ = decode_at(path, lambda duration: (np.arange(num_frames) + 0.5) * duration / num_frames)
    return frames, times


def fps_clip_starts(duration, fps, frames_per_clip, max_clips):
    """Start times of the clips: back to back from 0, or centred in max_clips equal parts of a long video."""
    clip_len = frames_per_clip / fps
    needed = max(1, math.ceil(duration / clip_len - 1e-9))
    if needed <= max_clips:
        return np.arange(needed) * clip_len
    part = duration / max_clips
    return (np.arange(max_clips) + 0.5) * part - clip_len / 2


def sample_fps(path, fps, frames_per_clip, max_clips):
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

    frames, times, duration = decode_at(path, plan)
    starts = fps_clip_starts(duration, fps, frames_per_clip, max_clips)
    clip_len = frames_per_clip / fps
    clips = [(float(max(s, 0.0)), float(min(s + clip_len, duration))) for s in starts]
    return frames, times, clips
