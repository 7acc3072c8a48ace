"""
What reaches the LM: linear probes of the scene's facts from a trained run's features. A diagnostic beside Apollo
§4.2-4.3, which compare encoders and connectors by the whole model's score alone.

    python probe.py --ckpt=out/sft.pt                 # five facts, four feature sets, our world's train/test videos
    python probe.py --ckpt=out/sft.pt --json=probe.json

Each video of the run's world, sampled as the run samples it, gives four feature vectors: its pixels (each frame
average-pooled to 8x8), its motion costs (encoders.motion_costs of each pair of frames, parameter-free, averaged over
the frame: what a pan does to the whole picture), the encoders' fused grid (each frame's grid average-pooled to 2x2)
and the connector's tokens; videos with fewer clips are padded with zeros. For each fact, read from the scene
script, a linear classifier learns on the training videos and is scored on the test videos, beside the share of the
commonest answer. A fact the grid carries and the tokens do not was lost by the connector; one the pixels or the
motion costs carry and the grid does not, by the encoders; one that none carries linearly may still be there, in a
form a linear probe cannot read.

A second table asks: each video's benchmark question about four of the facts (as questions.questions_for draws
them), and the same kind of probe of its answer from the connector's tokens and from the LM's state at the position
where it starts to answer, after each block. A fact the tokens carry and that state does not, the LM did not read.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from bench import load_run
from data import make_world
from encoders import motion_costs, preprocess
from integrate import build_sample, format_mc, video_tokens
from questions import questions_for
from samples import decode_video, world_config
from sampling import VideoError

FACTS = {  # fact -> its value in a scene script
    "objects": lambda s: len(s["objects"]),                                          # how many objects (1-4)
    "camera": lambda s: s["camera"][0]["direction"] if s["camera"] else "still",     # the first pan, if any
    "colour": lambda s: s["objects"][0]["color"],                                    # the first object's colour
    "shape": lambda s: s["objects"][0]["shape"],                                     # ... and its shape
    "characters": lambda s: len(s["glyphs"]),                                        # how many characters flash
}
FEATURES = ["pixels", "motion", "grid", "tokens"]
ASKED = {  # fact -> the benchmark's questions that ask it (questions.questions_for's templates)
    "objects": ("count_objects",), "camera": ("camera_direction", "camera_first"), "colour": ("color",),
    "characters": ("count_chars",)}


def linear_probe(x_train, y_train, x_test, steps=200, weight_decay=1e-2, lr=1e-2, seed=0):
    """Multinomial logistic regression, full batch: x (N, F) float, y (N,) class ids -> the predicted class of each row
    of x_test. Features are standardised on the training rows."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(x_train.shape[1], int(y_train.max()) + 1, generator=gen) * 1e-3).requires_grad_(True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(x_train @ w + b, y_train) + weight_decay * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (x_test @ w + b).argmax(1)


@torch.no_grad()
def features(model, frames, max_clips):
    """frames (C, T, H, W, 3) uint8 of one video -> {name: (F,) vector}, the clips past C zero-padded to max_clips."""
    C, T, size = *frames.shape[:2], model.cfg.encoder.image_size
    x = preprocess(frames.flatten(0, 1), size)  # (C*T, 3, S, S)
    pixels = F.adaptive_avg_pool2d(x, 8)  # (C*T, 3, 8, 8)
    motion = motion_costs(x.view(C, T, *x.shape[1:]), model.cfg.encoder.patch_size, model.cfg.tubelet)
    motion = motion.mean((2, 3))  # (C, T / tubelet, K): over the frame
    grid = model.encode_frames(frames)  # (C, T, h, w, Dv)
    pooled = F.adaptive_avg_pool2d(grid.flatten(0, 1).permute(0, 3, 1, 2), 2)  # (C*T, Dv, 2, 2)
    tokens = model.encode_video(grid=grid)  # (C, L, D)
    out = {}
    for name, x in (("pixels", pixels), ("motion", motion), ("grid", pooled), ("tokens", tokens)):
        x = x.reshape(C, -1).float()
        out[name] = torch.cat([x, x.new_zeros(max_clips - C, x.shape[1])]).flatten()  # (max_clips * F,)
    return out


def scores(data):
    """data {"train"|"test": [(answer, {feature: (F,) vector})]} -> {"commonest": the test share of the commonest
    training answer, feature: test accuracy of a linear probe fitted on the training rows, ...}."""
    classes = sorted({a for rows in data.values() for a, _ in rows})
    y = {k: torch.tensor([classes.index(a) for a, _ in rows]) for k, rows in data.items()}
    answers = {k: [a for a, _ in rows] for k, rows in data.items()}
    common = max(classes, key=answers["train"].count)  # the commonest training answer, said of every test row
    out = {"commonest": round(answers["test"].count(common) / len(answers["test"]), 3)}
    for name in data["train"][0][1]:
        x = {k: torch.stack([f[name] for _, f in rows]).cpu() for k, rows in data.items()}
        out[name] = round(float((linear_probe(x["train"], y["train"], x["test"]) == y["test"]).float().mean()), 3)
    return out


@torch.no_grad()
def answer_states(model, tok, cfg, frames, clips, question):
    """The LM's state where it starts to answer question (a benchmark question dict) about a video, after each
    block: {"answer L": (D,)}. A fact the tokens carry and these states do not, the LM did not read."""
    video = video_tokens(tok, clips, model.tokens_per_clip, cfg.integration)
    ids = build_sample(tok, [(format_mc(question["question"], question["options"]), "")], video)[0][:-1]
    states = []
    hooks = [block.register_forward_hook(lambda m, a, out: states.append(out[0, -1])) for block in model.lm.blocks]
    try:
        model(torch.tensor([ids], device=frames.device), frames)
    finally:
        for h in hooks:
            h.remove()
    return {f"answer {k}": x.float() for k, x in enumerate(states)}


def probe_answers(model, tok, cfg, rows, seed):
    """{fact: {"n": test questions, "commonest": share, "tokens": acc, "answer 0": acc, ...}}: each video's question
    of ASKED[fact] (drawn as the world draws them), its answer read from the connector's tokens and from the LM's
    state at the answer's first position after each block, fitted on the training videos' questions."""
    data = {fact: {"train": [], "test": []} for fact in ASKED}
    for split, videos in rows.items():
        for i, (s, f, frames, clips) in enumerate(videos):
            drawn = [q for qs in questions_for(s, np.random.default_rng([seed, 7, i])).values() for q in qs]
            for fact, templates in ASKED.items():
                q = next((q for q in drawn if q["template"] in templates), None)
                if q is not None:
                    states = answer_states(model, tok, cfg, frames, clips, q)
                    data[fact][split].append((q["options"][ord(q["answer"]) - 65], {"tokens": f["tokens"], **states}))
    return {fact: {"n": len(d["test"]), **scores(d)} for fact, d in data.items() if d["train"] and d["test"]}


def probe_run(ckpt, device="cpu", log=print):
    """{fact: {"commonest": share, feature: test accuracy, ...}, "videos": {"train": n, "test": n}} for a run."""
    model, tok, cfg, env = load_run(ckpt, device)
    model.eval()
    if cfg.data:
        raise SystemExit(f"error: {ckpt} was trained on {cfg.data}: probing needs our world's scene scripts")
    world = make_world(world_config(cfg), cfg.data_dir, log=lambda *a: None)
    with open(os.path.join(world, "scenes.jsonl")) as f:
        scenes = [json.loads(line) for line in f]
    max_clips = cfg.max_clips if cfg.sampling == "fps" else cfg.num_frames // cfg.frames_per_clip
    rows = {"train": [], "test": []}
    for s in scenes:
        split = s["name"].split("_")[0]
        if split not in rows:
            continue
        try:
            frames, clips = decode_video(os.path.join(world, "videos", s["name"] + ".mp4"), cfg)
        except VideoError as e:
            log(f"warning: skipping {e}")
            continue
        frames = frames.to(env["device"])
        rows[split].append((s, features(model, frames, max_clips), frames, clips))
    log(f"probing {len(rows['train'])} training and {len(rows['test'])} test videos of {world}")
    result = {"videos": {k: len(v) for k, v in rows.items()}}
    for fact, value_of in FACTS.items():
        result[fact] = scores({k: [(str(value_of(s)), f) for s, f, *_ in v] for k, v in rows.items()})
    result["asked"] = probe_answers(model, tok, cfg, rows, cfg.seed)
    return result


def table(result):
    lines = ["| fact | commonest answer | " + " | ".join(FEATURES) + " |", "|---|---|" + "---|" * len(FEATURES)]
    for fact in FACTS:
        r = result[fact]
        lines.append(f"| {fact} | {r['commonest']:.3f} | " + " | ".join(f"{r[n]:.3f}" for n in FEATURES) + " |")
    asked = result.get("asked") or {}
    if asked:
        names = [n for n in next(iter(asked.values())) if n not in ("n", "commonest")]
        lines += ["", "| asked (test questions) | commonest answer | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for fact, r in asked.items():
            lines.append(f"| {fact} ({r['n']}) | {r['commonest']:.3f} | " + " | ".join(f"{r[n]:.3f}" for n in names)
                         + " |")
    return "\n".join(lines)


def main(argv):
    opts = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    unknown = set(opts) - {"ckpt", "json", "device"}
    if unknown or "ckpt" not in opts or len(opts) != len(argv):
        raise SystemExit(__doc__ + (f"\nerror: unknown option --{sorted(unknown)[0]}" if unknown else ""))
    if not os.path.exists(opts["ckpt"]):
        raise SystemExit(f"error: {opts['ckpt']}: no such checkpoint")
    result = probe_run(opts["ckpt"], opts.get("device", "cpu"))
    print(table(result))
    if "json" in opts:
        with open(opts["json"], "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
