"""
ApolloBench in miniature (Apollo §2): evaluate a model three ways, and build a benchmark that needs the video.

    python bench.py eval --ckpt=out/sft.pt         # our test split: video, centre frame, text only, caption as text
    python bench.py eval --ckpt=out/sft.pt --jsonl=my/test.jsonl --modes=video,text   # a user's multiple choice
    python bench.py eval --ckpt=out/lm.pt --modes=writing   # the loss of the test captions: can it write them?
    python bench.py eval --ckpt=out/lm.pt --modes=drills    # fresh reading drills of stage lm: can it read?
    python bench.py build --zoo=results/runs --pool_videos=300 --top=30

`build` asks every model of a zoo (each folder under --zoo holding a trained sft.pt) every question of a fresh
candidate pool (a world of its own seed, new to every model) three ways: with the video, with the centre
frame only (repeated to fill one clip, the way the paper feeds images), and with the text alone (no visual
tokens). Then, as the paper did:
  1. drop a question that more than --text_max of the models answer right from the text alone, or more than
     --frame_max from one frame: it does not test video understanding;
  2. drop one that more than --easy_max answer right with the video: it tells no model from another;
  3. rank the rest by the entropy of the models' answers (most disagreement first), keep --top per category.
It writes the benchmark (JSONL, video paths relative to it) and a report: what each rule removed per
category, how many of the world's planted shortcuts were caught (and at other thresholds), the cost of the
benchmark against the pool, the spread of the zoo's scores, and the Spearman correlation of the zoo's ranking on
the benchmark against the pool and against the rest of the pool; beside them, the same figures for random
benchmarks of the same size, and the pool's agreement with itself (two random halves), which bounds them.
The filter and the report's figures are pure functions in apollobench.py.
Each model's answers are kept under --out/asked/: a stopped build resumes, and another --top asks no model again.
"""
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

import evaluate
import samples
import train
from apollo import ADDED_KEYS, Apollo
from apollobench import MODES, build, report_text
from config import Config, model_config, setup
from data import load_jsonl, make_world, write_jsonl
from integrate import IGNORE, Tokenizer
from questions import reading_drills
from sampling import VideoError, sample_uniform

EVAL_MODES = MODES + ["caption"]  # eval also: the video's caption as text in its place (perfect perception)


# ---------------------------------------------------------------------------------------------------------------
# Asking a model in three modes


class ModeSamples(samples.Samples):
    """Samples whose visual input is the video (as in training), its centre frame only, or nothing."""

    def __init__(self, items, tok, cfg, tokens_per_clip, mode):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        items = [dict(it, video=None) for it in items] if mode == "text" else items
        super().__init__(items, tok, cfg, tokens_per_clip)
        self.mode = mode

    def clips_of(self, path):
        if self.mode != "frame":
            return super().clips_of(path)
        if path not in self.frames:  # one clip: the centre frame, repeated (the paper's path for an image)
            try:
                frame, (t,) = sample_uniform(path, 1, size=self.cfg.image_size)
            except VideoError as e:
                self.frames[path] = e
            else:
                frame = torch.from_numpy(frame)  # (1, S, S, 3)
                self.frames[path] = (frame[None].expand(1, self.cfg.frames_per_clip, *frame.shape[1:]).contiguous(),
                                     [(float(t), float(t))])
        if isinstance(self.frames[path], VideoError):
            raise self.frames[path]
        return self.frames[path]

    def warm(self, workers, max_bad_share=1.0, log=print):
        """Samples.warm, whose decoding would cache the whole video: in frame mode the centre frames are cached
        first (in this process: one frame a video), and a bad video is dropped as there."""
        if self.mode == "frame":
            for path in sorted({it["video"] for it in self.items if it.get("video")}):
                try:
                    self.clips_of(path)
                except VideoError:
                    pass  # kept in the cache: warm drops its items
        return super().warm(workers, max_bad_share, log)


def load_run(ckpt, device="auto"):
    """A trained model from its checkpoint and the run's config.json and tokenizer.json beside it."""
    run_dir = os.path.dirname(os.path.abspath(ckpt))
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = {**ADDED_KEYS, **json.load(f)}  # a run from before a key was added: what it trained with
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in saved.items() if k in known})
    cfg = dataclasses.replace(cfg, device=device, out_dir=run_dir)
    env = setup(cfg)
    tok = Tokenizer.load(os.path.join(run_dir, "tokenizer.json"))
    model = Apollo(model_config(cfg, tok.vocab_size))
    model.load_state_dict(train.load_checkpoint(ckpt, cfg)["model"])
    return model.to(env["device"]), tok, cfg, env


def ask(model, tok, cfg, env, items, mode):
    """The model's choice on each item in one mode: a list of 0-based options."""
    return evaluate.predict(model, ModeSamples(items, tok, cfg, model.tokens_per_clip, mode), cfg, env)


def mc_items(jsonl):
    """Multiple-choice items of a JSONL file (ours or a user's), videos relative to it."""
    root = os.path.dirname(os.path.abspath(jsonl))
    return [dict(samples.mc_item(q, root), eval=True) for q in load_jsonl(jsonl)]


def evaluate_modes(ckpt, jsonl=None, modes=EVAL_MODES, device="auto", log=print):
    """Accuracy in each mode; "caption" needs every video's caption (captions_NAME.jsonl beside NAME.jsonl, as our
    world writes them, or conversations in NAME.jsonl): without them it is left out, with a note."""
    model, tok, cfg, env = load_run(ckpt, device)
    if jsonl is None:
        jsonl = os.path.join(make_world(samples.world_config(cfg), cfg.data_dir, log=lambda *a: None), "test.jsonl")
    items = mc_items(jsonl)
    out = {"ckpt": ckpt, "jsonl": jsonl}
    root, split = os.path.split(os.path.splitext(os.path.abspath(jsonl))[0])  # captions_{split}.jsonl beside it
    for mode in modes:
        if mode == "writing":  # not a multiple-choice score: how well the model writes the split's captions
            wrote = writing(model, tok, cfg, env, root, split)
            if wrote is None:
                log(f"writing: left out: {jsonl} has no captions beside it")
            else:
                out[mode] = wrote
            continue
        if mode == "drills":  # per kind of drill, in "categories"
            out[mode] = drills(model, tok, cfg, env)
            continue
        if mode == "caption":
            told = samples.described_items(items, root, split)
            if told is None:
                log(f"caption: left out: not every video of {jsonl} has a caption")
                continue
            choices = evaluate.predict(model, samples.Samples(told, tok, cfg, model.tokens_per_clip), cfg, env)
        elif mode == "video":  # and whether the connector's tokens still tell the videos apart (evaluate.spread_of)
            asked = ModeSamples(items, tok, cfg, model.tokens_per_clip, mode)
            choices = evaluate.predict(model, asked, cfg, env)
            out["visual_spread"] = evaluate.spread_of(model, asked, env)
        elif mode in MODES:
            choices = ask(model, tok, cfg, env, items, mode)
        else:
            raise SystemExit(f"error: unknown mode {mode!r}; choose from {EVAL_MODES + ['writing', 'drills']}")
        out[mode] = evaluate.score(items, [c == ord(it["answer"]) - 65 for c, it in zip(choices, items)])
    return out


def drills(model, tok, cfg, env, n=400, seed=12345):
    """Accuracy on n fresh reading drills (questions.reading_drills, drawn from the stream [seed, 7], which no run
    trains on: a stage draws its own from [run seed, stage index < 5]), per kind: which_option (find a word among
    the options), lookup_color, lookup_bounces, lookup_char (look a fact up in a short description). Whether the
    LM learned what stage lm drills it in, apart from the world's captions."""
    qs = reading_drills(np.random.default_rng([seed, 7]), n)
    items = [dict(samples.drill_item(q), video=None, options=q["options"], answer=q["answer"], eval=True,
                  subject=q.get("subject"), n_options=len(q["options"]), category=q["template"], shortcut=None)
             for q in qs]
    result = evaluate.evaluate(model, samples.Samples(items, tok, cfg, model.tokens_per_clip), cfg, env)
    return {k: v for k, v in result.items() if k != "choices"}


def writing(model, tok, cfg, env, root, split):
    """How well the model writes a split's captions, which is all that align and vision train on: the mean loss per
    caption token given the video, given the same prompt without it, and as plain text with no prompt (as stage
    lm wrote them before it learned them after align's prompt). An LM that cannot write captions leaves align
    nothing to align to. None where the split has no captions."""
    items = [samples.caption_item(c, root) for c in samples.split_rows(root, split)[1] if samples.turns_of(c)]
    if not items:
        return None
    forms = {"with_video": items, "without_video": [dict(it, video=None) for it in items],
             "plain_text": [{"turns": [("", it["turns"][0][1])]} for it in items]}
    out = {"n": len(items)}
    model.eval()
    for name, its in forms.items():
        data, total, count = samples.Samples(its, tok, cfg, model.tokens_per_clip), 0.0, 0
        for lo in range(0, len(data), cfg.eval_batch_size):
            batch = samples.collate([data[i] for i in range(lo, min(lo + cfg.eval_batch_size, len(data)))])
            batch = samples.to_device(batch, env["device"])
            with env["autocast"]():
                _, loss = model(batch["ids"], batch["frames"], batch["labels"])
            n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the loss is a mean over these targets
            total, count = total + loss.float().item() * n, count + n
        out[name] = round(total / count, 4)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The commands


def find_zoo(roots, stages=("sft",)):
    """Checkpoints under the roots: every <stage>.pt beside a config.json, sorted."""
    found = []
    for root in roots:
        for folder, _, files in os.walk(root):
            if "config.json" in files:
                found += [os.path.join(folder, f"{s}.pt") for s in stages if f"{s}.pt" in files]
    return sorted(found)


def run_build(opts, log=print):
    zoo = find_zoo(opts["zoo"].split(","), opts.get("stages", "sft").split(","))
    if len(zoo) < 2:
        raise SystemExit(f"error: found {len(zoo)} trained models under {opts['zoo']}; the filter needs a zoo")
    out = opts.get("out", "results/bench")
    _, _, cfg0, _ = load_run(zoo[0], "cpu")
    pool_cfg = samples.world_config(cfg0, seed=int(opts.get("pool_seed", 1000)), n_train=0, n_val=0,
                                  n_test=int(opts.get("pool_videos", 300)))
    world = make_world(pool_cfg, cfg0.data_dir)
    items = mc_items(os.path.join(world, "test.jsonl"))
    right = np.zeros((len(zoo), len(items), len(MODES)), bool)
    choices = np.zeros((len(zoo), len(items)), int)
    seconds = np.zeros(len(zoo))
    for m, ckpt in enumerate(zoo):
        # each model's answers are kept under out/asked/ while its checkpoint and the pool stay the same: a build
        # stopped halfway resumes, and another filter (--top, the thresholds) asks no model again
        kept = os.path.join(out, "asked", os.path.relpath(os.path.abspath(ckpt), "/").replace(os.sep, "__") + ".npz")
        stamp = np.array([os.path.abspath(world), str(len(items)), str(os.path.getsize(ckpt)),
                          str(os.path.getmtime(ckpt))])
        hit = False
        if os.path.exists(kept):
            with np.load(kept) as f:
                hit = np.array_equal(f["stamp"], stamp)
                if hit:
                    right[m], choices[m], seconds[m] = f["right"], f["choices"], f["seconds"]
        if not hit:
            model, tok, cfg, env = load_run(ckpt, opts.get("device", "auto"))
            for k, mode in enumerate(MODES):
                t0 = time.perf_counter()
                picked = ask(model, tok, cfg, env, items, mode)
                if mode == "video":
                    seconds[m], choices[m] = time.perf_counter() - t0, picked
                right[m, :, k] = [c == ord(it["answer"]) - 65 for c, it in zip(picked, items)]
            os.makedirs(os.path.dirname(kept), exist_ok=True)
            np.savez(kept + ".tmp.npz", right=right[m], choices=choices[m], seconds=seconds[m], stamp=stamp)
            os.replace(kept + ".tmp.npz", kept)
        log(f"{ckpt}: video {right[m, :, 0].mean():.3f} frame {right[m, :, 1].mean():.3f} "
            f"text {right[m, :, 2].mean():.3f}{' (kept from an earlier build)' if hit else ''}")
    chosen, rep = build(right, choices, items, float(opts.get("text_max", 0.5)), float(opts.get("frame_max", 0.5)),
                        float(opts.get("easy_max", 0.9)), int(opts.get("top", 30)))
    rep["zoo"] = zoo
    rep["cost_ratio"] = len(items) / max(1, len(chosen))  # evaluation time scales with the questions asked
    rep["zoo_video_seconds_on_pool"] = float(seconds.sum())
    os.makedirs(out, exist_ok=True)
    qs = {q["id"]: q for q in load_jsonl(os.path.join(world, "test.jsonl"))}
    rows = [dict(qs[items[q]["id"]], video=os.path.relpath(items[q]["video"], out)) for q in chosen]
    write_jsonl(os.path.join(out, "bench.jsonl"), rows)
    np.savez(os.path.join(out, "answers.npz"), right=right, choices=choices)
    with open(os.path.join(out, "report.json"), "w") as f:  # strict JSON: an undefined figure is null, not NaN
        json.dump(json.loads(json.dumps(rep), parse_constant=lambda c: None), f, indent=1)
    log(report_text(rep))
    return rep


OPTIONS = {"eval": ["ckpt", "jsonl", "modes", "device", "json"],
           "build": ["zoo", "stages", "out", "pool_seed", "pool_videos", "device", "text_max", "frame_max", "easy_max",
                     "top"]}


def main(argv):
    if not argv or argv[0] not in ("eval", "build"):
        print(__doc__)
        return None
    known = OPTIONS[argv[0]]
    for a in argv[1:]:  # a mistyped option is an error, not a default silently used
        key = a[2:].partition("=")[0] if a.startswith("--") else ""
        if key not in known:
            raise SystemExit(f"error: bench.py {argv[0]}: unknown option {a!r}; it takes --" + ", --".join(known))
    opts = dict(a[2:].partition("=")[::2] for a in argv[1:])
    if argv[0] == "eval":
        if "ckpt" not in opts:
            raise SystemExit("error: bench.py eval needs --ckpt=PATH (a run's sft.pt)")
        result = evaluate_modes(opts["ckpt"], opts.get("jsonl"), opts.get("modes", ",".join(EVAL_MODES)).split(","),
                                opts.get("device", "auto"))
        for mode in EVAL_MODES + ["drills"]:
            if mode in result:
                r = result[mode]
                cats = " ".join(f"{k} {v:.3f}" for k, v in r["categories"].items())
                print(f"{mode:>7}: {r['overall']:.3f} (chance {r['chance']:.2f}, n={r['n']}) | {cats}")
        if "writing" in result:
            w = result["writing"]
            print(f"writing: caption loss per token {w['with_video']:.3f} with the video, {w['without_video']:.3f} "
                  f"without it, {w['plain_text']:.3f} as plain text (n={w['n']} captions)")
        if result.get("visual_spread"):
            print(evaluate.spread_text(result["visual_spread"]))
        if "json" in opts:
            with open(opts["json"], "w") as f:
                json.dump(result, f, indent=1)
        return result
    if "zoo" not in opts:
        raise SystemExit("error: bench.py build needs --zoo=DIR[,DIR...] (folders of trained runs)")
    return run_build(opts)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(sys.argv[1:])
