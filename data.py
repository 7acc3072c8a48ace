"""
The synthetic video world on disk: mini-Apollo's embedded default data (Apollo paper §2).

No data set can be downloaded, so we make our own. Each video is a scene script (scene.py: what happens, and
when), rendered here with numpy and written as a real H.264 mp4 through PyAV. From the same script come its
multiple-choice questions in the five ApolloBench categories and its caption (questions.py). This file also
loads JSONL, ours or a user's, and checks every line.

    python data.py --out_dir=data/world --n_train=200     # make (or reuse) a world and print a sample

On disk: videos/*.mp4, scenes.jsonl (the scripts), {train,val,test}.jsonl (multiple choice, like lmms-eval),
captions_{train,val,test}.jsonl (conversations, like LLaVA-Video). Generation is seeded and cached.
"""
import hashlib
import itertools
import json
import os
import sys
from dataclasses import asdict

import av
import numpy as np

from questions import caption, pick_questions
from sampling import FONT
from scene import COLORS, PHYS_HZ, WorldConfig, camera_offset, color_at, make_scene, simulate


class DataError(ValueError):
    """A data file that cannot be used: the message names the file and the line."""



# ---------------------------------------------------------------------------------------------------------------
# Rendering: the script, drawn frame by frame with numpy, written as H.264 through PyAV


def shape_mask(shape, cx, cy, r, yy, xx):
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # pointing up
        return (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r)) & (dy >= -r)
    if shape == "cross":
        return ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def make_texture(scene):
    """A blocky random texture big enough for the whole camera path, or None for a plain background."""
    if scene["background"]["kind"] != "texture":
        return None, np.zeros(2)
    size, rng = scene["size"], np.random.default_rng(scene["background"]["seed"])
    turns = [0.0] + [seg["end"] for seg in scene["camera"]]  # the path is straight between these
    path = np.array([camera_offset(scene["camera"], t) for t in turns])
    lo = np.minimum(path.min(0), 0).astype(int) - 1
    extent = (np.ceil(path.max(0)).astype(int) - lo + size + 2 + 7) // 8  # in 8-pixel blocks
    base = np.array(scene["background"]["color"])
    blocks = base + rng.integers(-10, 50, (extent[1], extent[0], 1)) * np.array([1.0, 0.9, 0.7])
    return np.kron(blocks, np.ones((8, 8, 1))).clip(0, 255), -lo


def render(scene):
    """All frames of a scene, (N, size, size, 3) uint8, frame i shown at i / fps seconds."""
    size, fps = scene["size"], scene["fps"]
    n = int(round(scene["duration"] * fps))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    texture, origin = make_texture(scene)
    paths = [simulate(o, scene["duration"], size)[0] for o in scene["objects"]]
    glyph_masks = {g["char"]: np.kron(np.array([[c == "1" for c in row] for row in FONT[g["char"]].split()]),
                                      np.ones((3, 3), bool)) for g in scene["glyphs"]}
    frames = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        t = i / fps
        if texture is None:
            img = np.empty((size, size, 3))
            img[:] = scene["background"]["color"]
        else:
            ox, oy = (camera_offset(scene["camera"], t) + origin).round().astype(int)
            img = texture[oy:oy + size, ox:ox + size].copy()
        for obj, path in zip(scene["objects"], paths):
            if t >= obj["appear"]:
                cx, cy = path[min(int(round(t * PHYS_HZ)), len(path) - 1)]
                img[shape_mask(obj["shape"], cx, cy, obj["radius"], yy, xx)] = COLORS[color_at(obj, t)]
        for g in scene["glyphs"]:
            if g["start"] <= t < g["end"]:
                img[g["y"]:g["y"] + 17, g["x"]:g["x"] + 11] = 0  # a dark plate keeps the glyph legible
                img[g["y"] + 1:g["y"] + 16, g["x"] + 1:g["x"] + 10][glyph_masks[g["char"]]] = 255
        frames[i] = img
    return frames


def write_mp4(path, frames, fps):
    """Encode uint8 RGB frames ((N, H, W, 3), or any iterable of (H, W, 3)) as H.264 at a constant frame rate,
    atomically."""
    frames = iter(frames)
    first = next(frames)
    tmp = path + ".tmp.mp4"
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = first.shape[1], first.shape[0], "yuv420p"
        # with x264's macroblock-tree rate control the same frames came out as different bytes from encode to
        # encode (7 byte strings in 25 encodes of one clip), so two generations of a world differed; without it
        # the bytes repeat (tests/test_data.py)
        stream.options = {"crf": "16", "preset": "veryfast", "x264-params": "mbtree=0"}
        for img in itertools.chain([first], frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The world on disk: generate once, reuse after


WORLD_FORMAT = 5  # part of the cache key: bump it when the same config would now give other bytes


def cpu_count():
    """The cores this process may use (all of them where the OS cannot say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def world_dir(cfg, root):
    key = hashlib.sha1(json.dumps([WORLD_FORMAT, asdict(cfg)], sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(root, f"world-{key}")


def make_world(cfg, root="data", workers=None, log=print):
    """Generate the world for cfg under root (or reuse it); return its directory."""
    out = world_dir(cfg, root)
    if os.path.exists(os.path.join(out, "done.json")):
        return out
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    jobs = [(split, i) for split, n in [("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)]
            for i in range(n)]
    workers = workers or min(cpu_count(), 8)
    log(f"generating {len(jobs)} videos into {out} with {workers} processes")
    if workers > 1:
        import multiprocessing as mp
        # fork where the OS has it: spawn would re-run a caller's script that lacks a __main__ guard
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            results = pool.starmap(make_video, [(cfg, out, s, i) for s, i in jobs], chunksize=8)
    else:
        results = [make_video(cfg, out, s, i) for s, i in jobs]
    for split in ("train", "val", "test"):
        rows = [r for (s, _), r in zip(jobs, results) if s == split]
        write_jsonl(os.path.join(out, f"{split}.jsonl"), [q for r in rows for q in r["questions"]])
        write_jsonl(os.path.join(out, f"captions_{split}.jsonl"), [r["caption"] for r in rows])
    write_jsonl(os.path.join(out, "scenes.jsonl"), [r["scene"] for r in results])
    with open(os.path.join(out, "done.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    return out


def make_video(cfg, out, split, i):
    """One video of the world: scene, mp4, questions and caption, all from the seed (split, i)."""
    rng = np.random.default_rng([cfg.seed, ["train", "val", "test"].index(split), i])
    name = f"{split}_{i:05d}"
    scene = make_scene(rng, cfg, name)
    video = f"videos/{name}.mp4"
    path = os.path.join(out, video)
    if not os.path.exists(path):
        write_mp4(path, render(scene), scene["fps"])
    n = cfg.train_questions if split == "train" else cfg.questions_per_video
    questions = [dict(id=f"{name}_q{k}", video=video, **q) for k, q in enumerate(pick_questions(scene, rng, cfg, n))]
    cap = {"id": f"{name}_cap", "video": video, "conversations": [
        {"from": "human", "value": "<video>\nDescribe the video."}, {"from": "gpt", "value": caption(scene)}]}
    return {"scene": scene, "questions": questions, "caption": cap}


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Loading JSONL: ours or a user's, in either format


def load_jsonl(path):
    """Records of a JSONL file, each checked; a bad line raises DataError naming the file and the line."""
    rows = []
    try:
        f = open(path, "rb")  # bytes: a line that is not UTF-8 is reported with its number
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            check_record(row, where)
            rows.append(row)
    return rows


def check_record(row, where):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("video"), str):
        raise DataError(f"{where}: missing key 'video' (a path relative to the JSONL file)")
    if "conversations" in row:
        conv = row["conversations"]
        if not (isinstance(conv, list) and conv and all(isinstance(t, dict) and "value" in t for t in conv)):
            raise DataError(f"{where}: 'conversations' must be a list of {{'from', 'value'}} turns")
        return
    for key in ("question", "options", "answer"):
        if key not in row:
            raise DataError(f"{where}: missing key {key!r} (multiple choice needs question, options, answer)")
    opts = row["options"]
    if not (isinstance(opts, list) and 2 <= len(opts) <= 26 and all(isinstance(o, str) for o in opts)):
        raise DataError(f"{where}: 'options' must be a list of 2 to 26 strings")
    letters = [chr(ord("A") + k) for k in range(len(opts))]
    if row["answer"] not in letters:
        raise DataError(f"{where}: 'answer' must be one of {letters}, got {row['answer']!r}")
    subject = row.get("subject")  # the fact's key that the answer restates (questions.mc): text, or absent
    if subject is not None and not (isinstance(subject, str) and subject.strip() and "\n" not in subject):
        raise DataError(f"{where}: 'subject' must be a non-empty one-line string (the key the answer restates, "
                        f"'cross blue'), got {subject!r}")


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    root = args.pop("out_dir", "data")
    cfg = WorldConfig(**{k: type(getattr(WorldConfig, k))(v) for k, v in args.items()})
    d = make_world(cfg, root)
    print(d)
    print(json.dumps(load_jsonl(os.path.join(d, "train.jsonl"))[0], indent=1))
