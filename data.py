"""
The synthetic video world: mini-Apollo's embedded default data (Apollo paper §2, ApolloBench categories).

No data set can be downloaded, so we make our own. Each video is a scene script (what happens, and when),
rendered with numpy and written as a real H.264 mp4 through PyAV. From the same script we write multiple-
choice questions in the five ApolloBench categories and a caption. Planted *shortcut* questions (answerable
from the text alone, or from any single frame) are marked, so that the benchmark filter has something to find.

    python data.py --out_dir=data/world --n_train=200     # make (or reuse) a world and print a sample

On disk: videos/*.mp4, scenes.jsonl (the scripts), {train,val,test}.jsonl (multiple choice, like lmms-eval),
captions_{train,val,test}.jsonl (conversations, like LLaVA-Video). Generation is seeded and cached.
"""
import hashlib
import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass

import av
import numpy as np

from sampling import FONT

CATEGORIES = ["temporal_ocr", "egocentric", "spatial", "perception", "reasoning"]
LETTERS = "ABCD"
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 255), "yellow": (240, 220, 40),
          "magenta": (220, 50, 220), "cyan": (40, 220, 230), "orange": (255, 140, 20), "white": (245, 245, 245)}
SHAPES = ["circle", "square", "triangle", "cross"]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
RELATIONS = ["left of", "right of", "above", "below"]
COUNTS = ["0", "1", "2", "3", "4"]
ABSURD = ["a banana", "the moon", "a violin", "Tuesday", "a whale", "nobody", "a teapot", "the ocean"]
PHYS_HZ = 100  # the physics is stepped at 100 Hz, whatever the video's frame rate
GLYPHS = "0123456789ACEHLPTUX"  # the characters that flash in the videos (bitmaps: sampling.FONT)


class DataError(ValueError):
    """A data file that cannot be used: the message names the file and the line."""


@dataclass
class WorldConfig:
    seed: int = 0               # everything below is drawn from this seed
    n_train: int = 600          # videos per split
    n_val: int = 60
    n_test: int = 120
    questions_per_video: int = 5  # val and test: the benchmark's questions per video
    train_questions: int = 12   # a training video gets up to this many: every question it supports is more to learn
                                # from the one decoding and encoding of the video
    size: int = 64              # frame height and width in pixels
    min_seconds: float = 3.0    # video durations are uniform in [min_seconds, max_seconds]
    max_seconds: float = 20.0
    min_fps: int = 10           # each video has its own native frame rate in [min_fps, max_fps]
    max_fps: int = 30
    shortcut_share: float = 0.15  # share of questions planted as text-only shortcuts (frame shortcuts come on top)


# ---------------------------------------------------------------------------------------------------------------
# The scene script: everything that happens, with times


def make_scene(rng, cfg, name):
    duration = round(float(rng.uniform(cfg.min_seconds, cfg.max_seconds)), 2)
    fps = int(rng.integers(cfg.min_fps, cfg.max_fps + 1))
    textured = rng.random() < 0.7
    background = {"kind": "texture" if textured else "plain", "seed": int(rng.integers(1 << 30)),
                  "color": [int(c) for c in rng.integers(10, 60, 3)]}
    camera = []  # panning needs a texture to be seen
    if textured:
        dirs = rng.permutation(list(DIRECTIONS))
        n_seg = 1 if rng.random() < 0.5 else 2
        cut = round(float(rng.uniform(0.35, 0.65)) * duration, 2) if n_seg == 2 else duration
        speed = float(rng.uniform(6, 12))  # pixels per second
        camera.append({"direction": str(dirs[0]), "start": 0.0, "end": cut, "speed": speed})
        if n_seg == 2:
            camera.append({"direction": str(dirs[1]), "start": cut, "end": duration, "speed": speed})
    n_obj = int(rng.integers(1, 5))
    shapes = rng.permutation(SHAPES)[:n_obj]
    colors = rng.permutation(list(COLORS))[: n_obj + 1]  # one spare colour for a colour change
    speeds = rng.permutation([6.0, 11.0, 18.0, 28.0])[:n_obj] * rng.uniform(0.9, 1.1)  # far apart: "fastest"
    objects = []
    for i in range(n_obj):
        radius = int(rng.choice([5, 7]))
        angle = rng.uniform(0, 2 * np.pi)
        obj = {"shape": str(shapes[i]), "color": str(colors[i]), "radius": radius,
               "appear": 0.0 if rng.random() < 0.5 else round(float(rng.uniform(0, 0.5 * duration)), 2),
               "x0": float(rng.uniform(radius, cfg.size - radius)), "y0": float(rng.uniform(radius, cfg.size - radius)),
               "vx": float(speeds[i] * np.cos(angle)), "vy": float(speeds[i] * np.sin(angle)),
               "stop": round(float(rng.uniform(0.5, 0.9) * duration), 2) if rng.random() < 0.5 else None,
               "color_change": None}
        if i == 0 and rng.random() < 0.3 and duration - obj["appear"] > 3:
            obj["color_change"] = {"time": round(float(rng.uniform(obj["appear"] + 1, duration - 1)), 2),
                                   "color": str(colors[n_obj])}
        obj["bounces"] = [round(t, 2) for t in simulate(obj, duration, cfg.size)[1]]
        objects.append(obj)
    glyphs, t = [], float(rng.uniform(0.2, 1.0))
    chars = rng.permutation(list(GLYPHS))
    for c in chars[: int(rng.choice(5, p=[0.1, 0.15, 0.3, 0.3, 0.15]))]:
        length = float(rng.uniform(1.2, 2.0))
        if t + length > duration - 0.2:
            break
        x, y = int(rng.integers(2, cfg.size - 13)), int(rng.integers(2, cfg.size - 19))
        glyphs.append({"char": str(c), "start": round(t, 2), "end": round(t + length, 2), "x": x, "y": y})
        t += length + float(rng.uniform(0.3, 1.5))
    return {"name": name, "duration": duration, "fps": fps, "size": cfg.size, "background": background,
            "camera": camera, "objects": objects, "glyphs": glyphs}


def simulate(obj, duration, size):
    """Positions (N, 2) at PHYS_HZ from t=0 to duration (frozen before `appear` and after `stop`), bounce times."""
    n = int(duration * PHYS_HZ) + 2
    pos = np.zeros((n, 2))
    x, y, vx, vy, r = obj["x0"], obj["y0"], obj["vx"], obj["vy"], obj["radius"]
    bounces = []
    for i in range(n):
        t = i / PHYS_HZ
        moving = t > obj["appear"] and (obj["stop"] is None or t <= obj["stop"])
        if moving:
            x, y = x + vx / PHYS_HZ, y + vy / PHYS_HZ
            hit = False
            if not r <= x <= size - r:
                vx, x, hit = -vx, min(max(x, r), size - r), True
            if not r <= y <= size - r:
                vy, y, hit = -vy, min(max(y, r), size - r), True
            if hit:
                bounces.append(t)
        pos[i] = x, y
    return pos, bounces


def position_at(obj, t, duration, size):
    pos, _ = simulate(obj, duration, size)
    return pos[min(int(round(t * PHYS_HZ)), len(pos) - 1)]


def color_at(obj, t):
    change = obj["color_change"]
    return change["color"] if change and t >= change["time"] else obj["color"]


def camera_offset(camera, t):
    """Where the camera looks at time t, in texture pixels from its start."""
    off = np.zeros(2)
    for seg in camera:
        dt = min(max(t - seg["start"], 0.0), seg["end"] - seg["start"])
        off += np.array(DIRECTIONS[seg["direction"]]) * seg["speed"] * dt
    return off


def camera_direction_at(camera, t):
    return next(seg["direction"] for seg in camera if seg["start"] <= t <= seg["end"])


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
# Questions: five ApolloBench categories, several templates each, answers read off the script


def mc(rng, category, template, question, answer, pool, shortcut=None, first=()):
    """A multiple-choice question: the answer at a uniformly drawn letter among 3 distractors. Those in `first`
    (what the video also shows: another object's colour, another character) come before the rest of pool, so
    that a question cannot be answered by picking the one option the video shows."""
    near = [p for p in dict.fromkeys(first) if p != answer]
    rest = [p for p in dict.fromkeys(pool) if p != answer and p not in near]
    options = list(rng.permutation(near)[:3]) if near else []
    if len(options) < 3 and rest:
        options += list(rng.permutation(rest)[: 3 - len(options)])
    assert len(options) == 3, (template, answer, pool)
    k = int(rng.integers(4))
    options.insert(k, answer)
    return {"question": question, "options": [str(o) for o in options], "answer": LETTERS[k],
            "category": category, "template": template, "shortcut": shortcut}


def reading_drills(rng, n):
    """n short text-only drills that teach a from-scratch LM to read, before it must work out answers from a
    caption or a video (pretrained LMs bring these skills; ours learns them here, in the lm stage). Half are
    "Which option is blue?" among four options of one kind: find the word among the options and copy its letter
    (an induction step). Half are lookups in a short description written as captions are ("A red circle appears
    at 2 s. A blue cross appears at 0 s. What colour is the cross?"): find the thing asked about, read its
    attribute, the binding that perception questions need."""
    pools = [list(COLORS), SHAPES, list(DIRECTIONS), RELATIONS, COUNTS, list(GLYPHS), ABSURD]
    drills = []
    for _ in range(n):
        if rng.random() < 0.5:
            pool = pools[int(rng.integers(len(pools)))]
            word = str(pool[int(rng.integers(len(pool)))])
            drills.append(mc(rng, "drill", "which_option", f"Which option is {word}?", word, pool))
            continue
        k = int(rng.integers(2, 5))  # facts in the description; one is asked about
        shapes, colors = rng.permutation(SHAPES)[:k], rng.permutation(list(COLORS))[:k]
        times, counts, chars = rng.permutation(10)[:k], rng.integers(0, 4, k), rng.permutation(list(GLYPHS))[:k]
        kind, i = int(rng.integers(3)), int(rng.integers(k))
        if kind == 0:
            facts = [f"A{'n' if c[0] in 'aeiou' else ''} {c} {s} appears at {t} s."
                     for c, s, t in zip(colors, shapes, times)]
            drill = mc(rng, "drill", "lookup_color", f"What colour is the {shapes[i]}?", colors[i],
                       list(COLORS), first=colors)  # the other objects' colours first: the binding is the point
        elif kind == 1:
            facts = [f"The {s} bounces {c} time{'' if c == 1 else 's'}." for s, c in zip(shapes, counts)]
            drill = mc(rng, "drill", "lookup_bounces", f"How many times did the {shapes[i]} bounce off a wall?",
                       str(counts[i]), COUNTS[:4])
        else:
            facts = [f"The character {c} is shown at {t} s." for c, t in zip(chars, times)]
            drill = mc(rng, "drill", "lookup_char", f"Which character was on screen at second {times[i]}?", chars[i],
                       list(GLYPHS), first=chars)
        drill["description"] = " ".join(facts)
        drills.append(drill)
    return drills


def copy_drills(rng, n):
    """n (prompt, answer) texts that repeat a random run of the world's words at a random distance: the
    content-addressed copy (an induction head: find the current word earlier on, say what followed it) that
    reading is built from, and which our LM from scratch finds only after a long plateau (README, "The copy
    warm-up": given a warm-up of them, stage lm reads the caption better). The distance varies so that the copy
    must be found by content: at a fixed distance the LM learns to copy by position, which reads nothing."""
    words = list(dict.fromkeys(list(COLORS) + SHAPES + list(DIRECTIONS) + COUNTS + list(GLYPHS)))
    out = []
    for _ in range(n):
        run = list(rng.choice(words, int(rng.integers(4, 13)), replace=False))  # no word twice: one place to copy from
        before, between = (list(rng.choice(words, int(rng.integers(0, 7)))) for _ in range(2))
        out.append((" ".join(before + run + between + run[:1]), " " + " ".join(run[1:])))
    return out


def script_texts(cfg, n, seed=0):
    """n scenes that are never rendered, for the text-only lm stage: each one's caption and its questions. They are
    drawn from a seed stream of their own ([seed, 3, i]; the splits use 0, 1, 2), so no test scene is among them.
    Text is cheap where video is not (~2 ms a scene against ~0.1 s rendered and encoded): this is our stand-in for
    the mass of text an LLM reads before it ever sees a video."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 3, i])
        scene = make_scene(rng, cfg, f"text_{i:05d}")
        out.append((caption(scene), pick_questions(scene, rng, cfg, cfg.train_questions)))
    return out


def questions_for(scene, rng):
    """Every question this scene supports, by category."""
    D, size, objs, glyphs = scene["duration"], scene["size"], scene["objects"], scene["glyphs"]
    chars = [g["char"] for g in glyphs]
    qs = {c: [] for c in CATEGORIES}
    if len(glyphs) >= 2:
        qs["temporal_ocr"].append(mc(rng, "temporal_ocr", "first_char", "Which character appeared first?",
                                     chars[0], list(GLYPHS), first=chars))
        qs["temporal_ocr"].append(mc(rng, "temporal_ocr", "last_char", "Which character appeared last?",
                                     chars[-1], list(GLYPHS), first=chars))
        i = int(rng.integers(len(glyphs) - 1))
        qs["temporal_ocr"].append(mc(rng, "temporal_ocr", "char_after",
                                     f"Which character appeared right after the {chars[i]}?", chars[i + 1],
                                     [c for c in GLYPHS if c != chars[i]], first=[c for c in chars if c != chars[i]]))
    for g in glyphs:
        s = int(np.ceil(g["start"] + 0.2))
        if s <= g["end"] - 0.2 and len(glyphs) >= 2:
            qs["temporal_ocr"].append(mc(rng, "temporal_ocr", "char_at_second",
                                         f"Which character was on screen at second {s}?", g["char"], list(GLYPHS),
                                         first=chars))
            break
    if scene["camera"]:
        cam = scene["camera"]
        if len(cam) == 1:
            qs["egocentric"].append(mc(rng, "egocentric", "camera_direction", "Which way did the camera move?",
                                       cam[0]["direction"], DIRECTIONS))
        else:
            qs["egocentric"].append(mc(rng, "egocentric", "camera_first", "Which way did the camera move first?",
                                       cam[0]["direction"], DIRECTIONS))
            qs["egocentric"].append(mc(rng, "egocentric", "camera_end",
                                       "Which way was the camera moving at the end?", cam[-1]["direction"], DIRECTIONS))
    shapes = [o["shape"] for o in objs]
    if len(objs) >= 2:
        for when, t, label in [("end", D, "At the end of the video"), ("glyph", None, None)]:
            if when == "glyph":
                if not glyphs:
                    continue
                g = glyphs[int(rng.integers(len(glyphs)))]
                t, label = g["start"], f"When the {g['char']} appeared"
            a, b = rng.permutation(len(objs))[:2]
            if t < max(objs[a]["appear"], objs[b]["appear"]):
                continue
            rel = relation(position_at(objs[a], t, D, size), position_at(objs[b], t, D, size))
            if rel:
                qs["spatial"].append(mc(rng, "spatial", f"relation_{when}",
                                        f"{label}, where was the {shapes[a]} relative to the {shapes[b]}?",
                                        rel, RELATIONS))
        ys = [position_at(o, D, D, size)[1] for o in objs]
        top = int(np.argmin(ys))
        if sorted(ys)[1] - ys[top] >= 6:
            qs["spatial"].append(mc(rng, "spatial", "highest_end",
                                    "Which object was nearest the top of the frame at the end?", shapes[top],
                                    SHAPES, first=shapes))
    for o in objs:
        change = o["color_change"]
        if change is None:
            frame = o["appear"] == 0.0
            qs["perception"].append(mc(rng, "perception", "color", f"What colour is the {o['shape']}?", o["color"],
                                       list(COLORS), shortcut="frame" if frame else None,
                                       first=[p["color"] for p in objs]))
        else:
            qs["perception"].append(mc(rng, "perception", "color_start",
                                       f"What colour was the {o['shape']} when it appeared?", o["color"],
                                       list(COLORS), first=[change["color"]]))
            qs["perception"].append(mc(rng, "perception", "color_end",
                                       f"What colour was the {o['shape']} at the end?", change["color"],
                                       list(COLORS), first=[o["color"]]))
    all_at_start = all(o["appear"] == 0.0 for o in objs)
    qs["perception"].append(mc(rng, "perception", "count_objects", "How many objects appeared in the video?",
                               str(len(objs)), COUNTS[1:], shortcut="frame" if all_at_start else None))
    qs["perception"].append(mc(rng, "perception", "count_chars", "How many characters were shown?",
                               str(len(glyphs)), COUNTS))
    if len(objs) >= 2:
        speeds = [np.hypot(o["vx"], o["vy"]) for o in objs]
        qs["reasoning"].append(mc(rng, "reasoning", "fastest", "Which object moved fastest?",
                                  shapes[int(np.argmax(speeds))], SHAPES, first=shapes))
        appear = sorted((o["appear"], o["shape"]) for o in objs)
        if appear[1][0] - appear[0][0] >= 1.0:
            qs["reasoning"].append(mc(rng, "reasoning", "appeared_first", "Which object appeared first?",
                                      appear[0][1], SHAPES, first=shapes))
    for o in objs:
        if len(o["bounces"]) <= 3:
            qs["reasoning"].append(mc(rng, "reasoning", "bounces",
                                      f"How many times did the {o['shape']} bounce off a wall?",
                                      str(len(o["bounces"])), COUNTS[:4]))
        if o["stop"] is not None:
            s = int(round(o["stop"]))
            near = [str(v) for v in range(max(int(np.ceil(D)) + 2, 9)) if abs(v - s) >= 2]
            qs["reasoning"].append(mc(rng, "reasoning", "stop_second", f"At what second did the {o['shape']} stop?",
                                      str(s), near))
    return qs


def relation(pa, pb, margin=6.0):
    """Where a is relative to b, in image coordinates (y grows downwards); None when not clear-cut."""
    dx, dy = pa - pb
    if abs(dx) >= max(margin, 1.5 * abs(dy)):
        return "right of" if dx > 0 else "left of"
    if abs(dy) >= max(margin, 1.5 * abs(dx)):
        return "below" if dy > 0 else "above"
    return None


def pick_questions(scene, rng, cfg, n):
    """Up to n questions, categories taken round-robin; some planted as text shortcuts."""
    by_cat = questions_for(scene, rng)
    for qs in by_cat.values():
        rng.shuffle(qs)
    picked, order = [], list(rng.permutation(CATEGORIES))
    while len(picked) < n and any(by_cat.values()):
        for cat in order:
            if by_cat[cat] and len(picked) < n:
                picked.append(by_cat[cat].pop())
    for q in picked:
        if q["shortcut"] is None and rng.random() < cfg.shortcut_share:
            # bad distractors, a flaw real benchmarks have: only one option is of the right kind
            answer = q["options"][LETTERS.index(q["answer"])]
            q.update(mc(rng, q["category"], q["template"], q["question"], answer, ABSURD, shortcut="text"))
    return picked


def caption(scene):
    """A dense, timed description written from the script: what the alignment stages learn to say."""
    parts = []
    for o in sorted(scene["objects"], key=lambda o: o["appear"]):
        article = "An" if o["color"][0] in "aeiou" else "A"
        parts.append(f"{article} {o['color']} {o['shape']} appears at {o['appear']:.0f} s.")
    for i, seg in enumerate(scene["camera"]):
        parts.append(f"The camera pans {seg['direction']}" + (f" from {seg['start']:.0f} s." if i else "."))
    for g in scene["glyphs"]:
        parts.append(f"The character {g['char']} is shown at {g['start']:.0f} s.")
    for o in scene["objects"]:
        n = len(o["bounces"])
        parts.append(f"The {o['shape']} bounces {n} time{'' if n == 1 else 's'}"
                     + (f" and stops at {o['stop']:.0f} s." if o["stop"] is not None else "."))
        if o["color_change"]:
            parts.append(f"The {o['shape']} turns {o['color_change']['color']} at {o['color_change']['time']:.0f} s.")
    return " ".join(parts)


def describe_span(scene, t0, t1):
    """A short caption of what one frame (t0 == t1) or one clip [t0, t1] shows, for contrastive pretraining:
    each object present (colour, shape, where; in a clip, which way it moves), the camera's pan, the characters
    on screen. Written from the script like everything else."""
    size, tm, parts = scene["size"], (t0 + t1) / 2, []
    for o in scene["objects"]:
        if o["appear"] > t1:
            continue
        path, _ = simulate(o, scene["duration"], size)
        at = lambda t: path[min(int(round(t * PHYS_HZ)), len(path) - 1)]  # noqa: E731
        x, y = at(tm)
        where = ["top", "middle", "bottom"][min(int(3 * y / size), 2)] + " " + \
            ["left", "centre", "right"][min(int(3 * x / size), 2)]
        text = f"{color_at(o, tm)} {o['shape']} {where}"
        if t1 > t0:
            dx, dy = at(t1) - at(max(t0, o["appear"]))
            if max(abs(dx), abs(dy)) >= 3:
                text += " moving " + (("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else
                                      ("down" if dy > 0 else "up"))
        parts.append(text)
    if t1 > t0 and scene["camera"]:
        parts.append(f"camera pans {camera_direction_at(scene['camera'], min(tm, scene['duration']))}")
    parts += [f"character {g['char']}" for g in scene["glyphs"] if g["start"] <= t1 and g["end"] >= t0]
    return ". ".join(parts) + "." if parts else "nothing."


# ---------------------------------------------------------------------------------------------------------------
# The world on disk: generate once, reuse after


WORLD_FORMAT = 4  # part of the cache key: bump it when the same config would now give other bytes


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


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    root = args.pop("out_dir", "data")
    cfg = WorldConfig(**{k: type(getattr(WorldConfig, k))(v) for k, v in args.items()})
    d = make_world(cfg, root)
    print(d)
    print(json.dumps(load_jsonl(os.path.join(d, "train.jsonl"))[0], indent=1))
