"""
Scoring a trained model on multiple choice, per ApolloBench category (Apollo paper §2): the one evaluation routine
that `train.py` runs on the test split and `bench.py` in every mode.

A question is answered by the option whose answer the model finds likeliest (apollo.answer_mc). The headline leaves
out the questions planted as shortcuts; every score also says what the model answers without the video (no visual
tokens: its priors and the question alone) and with the video's caption as text in its place (perfect perception:
what the LM makes of what it would see). The gaps between the three are what watching adds and what seeing loses.
"""
import dataclasses
import os

import numpy as np
import torch

from apollo import answer_mc, visual_spread
from data import DataError
from questions import CATEGORIES
from samples import Samples, collate, described_items, mc_item, split_rows, to_device


@torch.no_grad()
def predict(model, dataset, cfg, env):
    """The model's choice (0-based option) on each multiple-choice item of dataset."""
    model.eval()
    choices = []
    for lo in range(0, len(dataset), cfg.eval_batch_size):
        batch = to_device(collate([dataset[i] for i in range(lo, min(lo + cfg.eval_batch_size, len(dataset)))]),
                          env["device"])
        with env["autocast"]():
            choices += answer_mc(model, batch["ids"], batch["lengths"], batch["frames"], batch["option_ids"]).tolist()
    model.train()
    return choices


def score(items, right):
    """Accuracy overall and per category (items' "category"; right: one bool per item): the headline leaves the
    shortcut questions out, "with_shortcuts" counts them all."""
    def part(keep):
        rows = [(it["category"], r) for it, r in zip(items, right) if keep(it)]
        cats = sorted({c for c, _ in rows}, key=lambda c: CATEGORIES.index(c) if c in CATEGORIES else 99)
        return {"overall": round(float(np.mean([r for _, r in rows])), 4) if rows else None,
                "categories": {c: round(float(np.mean([r for k, r in rows if k == c])), 4) for c in cats},
                "n": len(rows), "chance": round(float(np.mean([1 / it["n_options"] for it in items])), 4)}

    result = part(lambda it: not it.get("shortcut"))
    result["with_shortcuts"] = part(lambda it: True)
    return result


def evaluate(model, dataset, cfg, env):
    """Accuracy of the model's letter choices on multiple-choice items, overall and per category, and the letters
    ("choices": one per item)."""
    choices = [chr(65 + c) for c in predict(model, dataset, cfg, env)]
    return dict(score(dataset.items, [c == it["answer"] for c, it in zip(choices, dataset.items)]), choices=choices)


def spread_of(model, dataset, env, n=64):
    """apollo.visual_spread over the first clip of (up to) n of dataset's videos, in its cache after warm: whether the
    connector's tokens still tell one video from another (a collapsed connector's rank is near 1)."""
    used = {it.get("video") for it in dataset.items}
    paths = sorted(p for p, v in dataset.frames.items() if p in used and isinstance(v, tuple))[:n]
    if len(paths) < 2:
        return None
    model.eval()
    with env["autocast"]():
        spread = visual_spread(model, torch.stack([dataset.frames[p][0][0] for p in paths]).to(env["device"]))
    model.train()
    return spread


def spread_text(spread):
    """spread_of's result as the line train.py logs after a connector stage and bench.py eval prints."""
    share = f", {100 * spread['share']:.3g}% of their energy differs between videos" if "share" in spread else ""
    return (f"visual tokens: effective rank {spread['tokens']} across {spread['videos']} videos{share} "
            f"(projected grids: {spread['grid']})")


def score_test_split(model, world, tok, cfg, env):
    """The test split of world scored three ways: with the video (the headline), without it, with the caption;
    "answers" holds each question's letter in each way (train.py writes them to answers.jsonl, eval.json the rest).
    Two runs on one world answer the same questions, so their answers compare question by question."""
    test = [dict(mc_item(q, world), eval=True) for q in split_rows(world, "test")[0]]
    if not test:
        raise DataError(f"{world}/test.jsonl: no multiple-choice questions to score (the file is missing or holds "
                        "none)")
    test_cfg = dataclasses.replace(cfg, sampling=cfg.eval_sampling or cfg.sampling)
    test = Samples(test, tok, test_cfg, model.tokens_per_clip)
    skipped = test.warm(env["workers"], cfg.max_bad_share, env["log"])
    result = dict(evaluate(model, test, cfg, env), skipped_videos=skipped, visual_spread=spread_of(model, test, env))

    chosen = {"with_video": result.pop("choices")}

    def asked(items, mode):  # the headline's accuracy on another form of the same questions
        r = evaluate(model, Samples(items, tok, cfg, model.tokens_per_clip), cfg, env)
        chosen[mode] = r["choices"]
        return {"overall": r["overall"], "categories": r["categories"]}
    # without the video (no visual tokens): what the model answers from the text and its priors alone; the gap
    # to "overall" is what watching the video adds
    result["without_video"] = asked([dict(it, video=None) for it in test.items], "without_video")
    # with the video's caption, as text, in its place: perfect perception, so what the LM makes of what it sees;
    # the gap to "overall" is what the vision side loses (where every test video has a caption, as in our world)
    told = described_items(test.items, world)
    if told:
        result["with_caption"] = asked(told, "with_caption")
    result["answers"] = [{"id": it.get("id"), "video": os.path.relpath(it["video"], world), "category": it["category"],
                          "shortcut": it.get("shortcut"), "answer": it["answer"],
                          **{mode: letters[k] for mode, letters in chosen.items()}} for k, it in enumerate(test.items)]
    return result


def summary(result):
    """score_test_split's result (with the run's minutes) as the line train.py prints last."""
    cats = " ".join(f"{k} {v:.3f}" for k, v in result["categories"].items())
    told = f"; {result['with_caption']['overall']:.3f} with the caption instead" if "with_caption" in result else ""
    return (f"test accuracy {result['overall']:.3f} (chance {result['chance']:.2f}, n={result['n']}; "
            f"{result['with_shortcuts']['overall']:.3f} with shortcuts; "
            f"{result['without_video']['overall']:.3f} without the video{told}) | {cats} | {result['minutes']} min")
