"""
Questions, captions and drills, written from the scene script (Apollo paper §2, the five ApolloBench categories).

Each category has several templates; every answer is read off the script (scene.py), and its three distractors
come first from what the video also shows, so that no question is answered by picking the one option on screen.
Planted *shortcut* questions (answerable from the text alone, or from any single frame) are marked, so that the
benchmark filter (bench.py) has something to find. Besides the benchmark's questions: the dense caption the
alignment stages learn to say, short captions of one frame or clip for contrastive pretraining, and the
text-only material of stage lm (reading drills, copy drills, scenes scripted but never rendered).
"""
import numpy as np

from scene import (COLORS, DIRECTIONS, GLYPHS, PHYS_HZ, SHAPES, camera_direction_at, color_at, make_scene,
                   position_at, simulate)

CATEGORIES = ["temporal_ocr", "egocentric", "spatial", "perception", "reasoning"]  # ApolloBench's five
LETTERS = "ABCD"
RELATIONS = ["left of", "right of", "above", "below"]
COUNTS = ["0", "1", "2", "3", "4"]
ABSURD = ["a banana", "the moon", "a violin", "Tuesday", "a whale", "nobody", "a teapot", "the ocean"]  # shortcuts


# ---------------------------------------------------------------------------------------------------------------
# Questions: five ApolloBench categories, several templates each, answers read off the script


def mc(rng, category, template, question, answer, pool, shortcut=None, first=(), subject=None):
    """A multiple-choice question: the answer at a uniformly drawn letter among 3 distractors. Those in `first`
    (what the video also shows: another object's colour, another character) come before the rest of pool, so
    that a question cannot be answered by picking the one option the video shows. subject: the key of the fact
    asked about, as the caption writes it ("cross" of "cross blue, from 2 s."); the answer restates it
    (integrate.mc_answer), so that reading the answer off a caption is an induction step (README, "Facts as
    keys")."""
    near = [p for p in dict.fromkeys(first) if p != answer]
    rest = [p for p in dict.fromkeys(pool) if p != answer and p not in near]
    options = list(rng.permutation(near)[:3]) if near else []
    if len(options) < 3 and rest:
        options += list(rng.permutation(rest)[: 3 - len(options)])
    assert len(options) == 3, (template, answer, pool)
    k = int(rng.integers(4))
    options.insert(k, answer)
    q = {"question": question, "options": [str(o) for o in options], "answer": LETTERS[k],
         "category": category, "template": template, "shortcut": shortcut}
    return dict(q, subject=subject) if subject else q


def reading_drills(rng, n):
    """n short text-only drills that teach a from-scratch LM to read, before it must work out answers from a
    caption or a video (pretrained LMs bring these skills; ours learns them here, in the lm stage). Half are
    "Which option is blue?" among four options of one kind: find the word among the options and copy its letter
    (an induction step). Half are lookups in a short description written as captions are ("circle red, from 2 s.
    cross blue, from 0 s. What colour is the cross?"), the answer restating the key (" cross blue (C)"): find
    the key where the description writes it, say what follows, the binding that perception questions need."""
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
            facts = [f"{s} {c}, from {t} s." for c, s, t in zip(colors, shapes, times)]
            drill = mc(rng, "drill", "lookup_color", f"What colour is the {shapes[i]}?", colors[i], list(COLORS),
                       first=colors, subject=shapes[i])  # the other objects' colours first: the binding is the point
        elif kind == 1:
            facts = [f"{s} bounces {c}." for s, c in zip(shapes, counts)]
            drill = mc(rng, "drill", "lookup_bounces", f"How many times did the {shapes[i]} bounce off a wall?",
                       str(counts[i]), COUNTS[:4], subject=f"{shapes[i]} bounces")
        else:
            facts = [f"character {c} at {t} s." for c, t in zip(chars, times)]  # as the caption: the value first
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
                                       cam[0]["direction"], DIRECTIONS, subject="camera pans"))
        else:
            qs["egocentric"].append(mc(rng, "egocentric", "camera_first", "Which way did the camera move first?",
                                       cam[0]["direction"], DIRECTIONS, subject="camera pans"))
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
                                       first=[p["color"] for p in objs], subject=o["shape"]))
        else:
            qs["perception"].append(mc(rng, "perception", "color_start",
                                       f"What colour was the {o['shape']} when it appeared?", o["color"],
                                       list(COLORS), first=[change["color"]], subject=o["shape"]))
            qs["perception"].append(mc(rng, "perception", "color_end",
                                       f"What colour was the {o['shape']} at the end?", change["color"],
                                       list(COLORS), first=[o["color"]], subject=f"{o['shape']} turns"))
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
                                      str(len(o["bounces"])), COUNTS[:4], subject=f"{o['shape']} bounces"))
        if o["stop"] is not None:
            s = int(round(o["stop"]))
            near = [str(v) for v in range(max(int(np.ceil(D)) + 2, 9)) if abs(v - s) >= 2]
            qs["reasoning"].append(mc(rng, "reasoning", "stop_second", f"At what second did the {o['shape']} stop?",
                                      str(s), near, subject=f"{o['shape']} stops"))
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
    """A dense, timed description written from the script: what the alignment stages learn to say. Each fact is
    written key first, the value right after it ("cross blue, from 2 s.", "cross bounces 2."): a question about it
    names the key as its subject, which its answer restates (mc), so that a from-scratch LM finds the answer by an
    induction step (find the key's last token, say what follows it). "A blue cross appears" puts the colour before
    what it belongs to, a second hop that ours does not learn in a CPU budget, and so would "cross: blue", whose
    value follows a ":" that every fact shares (README, "Facts as keys")."""
    parts = []
    for o in sorted(scene["objects"], key=lambda o: o["appear"]):
        parts.append(f"{o['shape']} {o['color']}, from {o['appear']:.0f} s.")
    for i, seg in enumerate(scene["camera"]):
        parts.append(f"camera then pans {seg['direction']} from {seg['start']:.0f} s." if i else
                     f"camera pans {seg['direction']}.")
    for g in scene["glyphs"]:
        parts.append(f"character {g['char']} at {g['start']:.0f} s.")
    for o in scene["objects"]:
        parts.append(f"{o['shape']} bounces {len(o['bounces'])}.")
        if o["stop"] is not None:
            parts.append(f"{o['shape']} stops {o['stop']:.0f} s.")
        if o["color_change"]:
            parts.append(f"{o['shape']} turns {o['color_change']['color']} at {o['color_change']['time']:.0f} s.")
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
