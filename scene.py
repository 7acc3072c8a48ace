"""
The scene script of the synthetic world (Apollo paper §2): what happens in a video, and when.

A scene is a plain dict, drawn from a seed: a background (plain, or a texture the camera pans across), one to
four objects (shape, colour, size) that move, bounce off the walls, appear late, stop or change colour, and
characters that flash at known times. The physics is stepped at a fixed rate, so a position at any time can be
read off the script. Everything else is written from it: the frames (data.py), the questions and captions
(questions.py).
"""
from dataclasses import dataclass

import numpy as np

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 255), "yellow": (240, 220, 40),
          "magenta": (220, 50, 220), "cyan": (40, 220, 230), "orange": (255, 140, 20), "white": (245, 245, 245)}
SHAPES = ["circle", "square", "triangle", "cross"]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PHYS_HZ = 100  # the physics is stepped at 100 Hz, whatever the video's frame rate
GLYPHS = "0123456789ACEHLPTUX"  # the characters that flash in the videos (bitmaps: sampling.FONT)


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
