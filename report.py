"""
The studies' report (Apollo §3-4): what sweep.py writes once a study's runs are done. Each variant's mean +- std
over seeds per ApolloBench category, beside the paper's numbers; the differences paired by seed, the noise a
difference has to clear; per question template, where the video is read; for the scaling study, the R^2 between
the two LM sizes (the paper's scaling consistency) and its permutation p; and, where matplotlib is installed, the
paper's figure (the fps x tokens heatmap, the scaling scatter, per-category lines).

    python sweep.py resampler            # runs the study (or takes its cached runs), then writes this report
"""
import collections
import itertools
import json
import os
import types

import numpy as np

from data import load_jsonl, world_dir
from questions import CATEGORIES
from samples import world_config

HERE = os.path.dirname(os.path.abspath(__file__))  # where train.py ran: a run's data_dir is relative to it


def test_world(cfg, test_videos=None):
    """The world a run is scored on: its own (test_videos None) or a test split of test_videos videos from its seed,
    nothing else generated. A video and its questions come from (seed, split, index) alone (data.make_video), so the
    first n_test of them are the run's own test videos, and none is a training video."""
    return world_config(cfg) if test_videos is None else world_config(cfg, n_train=0, n_val=0, n_test=test_videos)


def scored_on(test_videos):
    """The suffix of what a run scored on test_videos test videos writes (eval-test1000.json, answers-test1000.jsonl,
    resampler-test1000.md); "" for its own test split (eval.json)."""
    return "" if test_videos is None else f"-test{test_videos}"


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


WAYS = {"video": "with_video", "text": "without_video", "caption": "with_caption"}  # answers.jsonl's choices


def per_template(runs, root, test_videos=None):
    """Each question template's accuracy with the video, without it and with the caption, pooled over runs (their
    answers.jsonl joined by id to their world's test.jsonl; shortcut questions left out): where the video is read and
    where it is not, which a category's mean over its templates hides. {template: {"n", "video", "text", "caption"}}"""
    counts = collections.defaultdict(collections.Counter)
    answers = f"answers{scored_on(test_videos)}.jsonl"  # the run's own, or rescore's
    for run in (os.path.join(root, r) for r in runs if r):
        if not os.path.exists(os.path.join(run, answers)):
            continue
        cfg = types.SimpleNamespace(**json.load(open(os.path.join(run, "config.json"))))  # the run's config
        world = world_dir(test_world(cfg, test_videos), os.path.join(HERE, cfg.data_dir))  # (train.py ran in HERE)
        template = {q["id"]: q["template"] for q in load_jsonl(os.path.join(world, "test.jsonl"))}
        for a in map(json.loads, open(os.path.join(run, answers))):  # (not questions: load_jsonl would refuse)
            if not a["shortcut"]:
                counts[template[a["id"]]].update(n=1, **{way: a[key] == a["answer"] for way, key in WAYS.items()})
    return {t: {"n": c["n"], **{way: c[way] / c["n"] for way in WAYS}} for t, c in sorted(counts.items())}


def summarise(results, root="results", test_videos=None):
    """variant -> {"overall": (mean, std), category: (mean, std), "n_seeds": n, ...}. Two are paired: "video_adds",
    each run's score less its own score without the video; "vs_first", each seed's score less the first variant's
    on that seed. A seed's variants share its world and its LM, so what varies from world to world cancels in the
    difference, and its std over seeds is the noise a difference between variants has to clear."""
    out, first = {}, next(iter(results.values()), [])
    for variant, runs in results.items():  # each variant's runs in seed order
        spreads = [r.get("visual_spread") or {} for r in runs]  # eval.json's visual_spread (older runs: none)
        row = {"overall": mean_std([r["overall"] for r in runs]), "n_seeds": len(runs),
               "without_video": mean_std([r.get("without_video", {}).get("overall") for r in runs]),
               "video_adds": mean_std([round(r["overall"] - r["without_video"]["overall"], 4) for r in runs
                                       if "without_video" in r]),  # (4 decimals, as eval.json's scores)
               "vs_first": mean_std([round(r["overall"] - f["overall"], 4) for r, f in zip(runs, first)]),
               "tokens_rank": mean_std([sp.get("tokens") for sp in spreads]),
               "tokens_share": mean_std([sp.get("share") for sp in spreads]), "runs": [r.get("run") for r in runs],
               "templates": per_template([r.get("run") for r in runs], root, test_videos),
               "n": [r.get("n") for r in runs]}
        for c in CATEGORIES:
            row[c] = mean_std([r["categories"].get(c) for r in runs])
        out[variant] = row
    return out


def pearson(x, y):
    """The Pearson correlation of two score lists; its square is the paper's scaling-consistency R^2, which alone
    cannot tell a ranking kept from one reversed."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def permutation_p(x, y):
    """How often pairing x with a shuffle of y correlates at least as well as x with y itself: the chance that the small
    model's ranking holds at the larger this well if the two had nothing to do with each other (one-sided; every
    ordering of up to 8 scores, else 20,000 drawn)."""
    r, y = pearson(x, y), np.asarray(y, float)
    orders = (itertools.permutations(range(len(y))) if len(y) <= 8
              else (np.random.default_rng(0).permutation(len(y)) for _ in range(20000)))
    hits = [pearson(x, y[list(order)]) >= r - 1e-12 for order in orders]
    return float(np.mean(hits))


def scaling_pairs(summary, variants, which=0):
    """Each scaling variant's (small LM, large LM) overall score: its mean over seeds (which=0) or their std (1)."""
    return [(summary[f"{v} @ small"]["overall"][which], summary[f"{v} @ large"]["overall"][which]) for v in variants]


def report(name, study, summary, seeds, preset, test_videos=None):
    """The study's report in markdown; study: what it is ("what", "paper"; the scaling study's "pairs")."""
    first = next(iter(summary), "")
    scored = "" if test_videos is None else f" --test_videos={test_videos}"

    def cell(ms):
        return "-" if ms[0] is None else f"{100 * ms[0]:.1f} +- {100 * ms[1]:.1f}"
    lines = [f"# Study `{name}`: {study['what']}", "",
             f"`python sweep.py {name} --seeds={seeds} --preset={preset}{scored}`; accuracy in %, mean +- std over "
             f"{seeds} seeds (the headline score: shortcut questions left out); without the video: the same model and "
             "questions, no visual tokens (what the text and the model's priors give); tokens rank: the effective "
             "rank, across test videos, of the connector's tokens (eval.json's visual_spread; near 1: the connector "
             "has collapsed, the LM gets nearly the same tokens whatever the video); tokens share: the share, in %, of "
             "the tokens' energy that differs from video to video (near 0: one part common to every video dwarfs what "
             "tells them apart, which the rank cannot see; README, \"The video fades\"); paper: ApolloBench overall. "
             "Paired, in points: the video adds: each run's score less its own without the video; vs the first: each "
             f"seed's score less {first}'s on the same seed (same world, same LM), whose std is the noise a "
             "difference between variants has to clear.", "",
             "| variant | overall | " + " | ".join(CATEGORIES) + " | without the video | the video adds (paired) | "
             f"vs {first} (paired) | tokens rank | tokens share | paper |",
             "|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|---|---|---|"]
    for variant, row in summary.items():
        paper, rank, share = study["paper"].get(variant), row["tokens_rank"], row["tokens_share"]
        lines.append(f"| {variant} | **{cell(row['overall'])}** | " + " | ".join(cell(row[c]) for c in CATEGORIES)
                     + f" | {cell(row['without_video'])} | {cell(row['video_adds'])} | {cell(row['vs_first'])} | "
                     + ("-" if rank[0] is None else f"{rank[0]:.2f} +- {rank[1]:.2f}") + " | "
                     + ("-" if share[0] is None else cell(share))
                     + f" | {paper if paper is not None else ''} |")
    n = [k for row in summary.values() for k in row.get("n", []) if k]
    if n:  # the noise of one score on n questions, which the seed std carries too
        p = summary[first]["overall"][0]
        where = "its own test split" if test_videos is None else f"{test_videos} test videos of its seed (rescore)"
        lines += ["", f"Each run is scored on {where}: {min(n)} to {max(n)} questions, so its score alone is uncertain "
                  f"by about +- {100 * (p * (1 - p) / np.mean(n)) ** 0.5:.1f} points (the binomial standard error at "
                  f"{100 * p:.0f}%), part of every std here."]
    ranked = sorted(summary, key=lambda v: -summary[v]["overall"][0])
    gap = summary[ranked[0]]["overall"][0] - summary[ranked[-1]]["overall"][0]
    spread = np.mean([summary[v]["overall"][1] for v in summary])
    lines += ["", f"Best here: {ranked[0]}; worst: {ranked[-1]}; the gap, {100 * gap:.1f} points, is "
              f"{gap / spread if spread else float('inf'):.1f} times the mean seed std ({100 * spread:.1f})."]
    paired = [v for v in summary if v != first and summary[v]["vs_first"][1]]
    if paired:  # the same gap, paired by seed: measured against the noise of a difference, not of a score
        far = max(paired, key=lambda v: abs(summary[v]["vs_first"][0]) / summary[v]["vs_first"][1])
        d, s = summary[far]["vs_first"]
        lines.append(f"Paired by seed, the variant farthest from {first} is {far}: {100 * d:+.1f} +- {100 * s:.1f} "
                     f"points, {abs(d) / s:.1f} times the std of its per-seed differences.")
    own = os.path.join("runs", name, "")
    shared = {v: row["runs"] for v, row in summary.items() if any(r and not r.startswith(own) for r in row["runs"])}
    if shared:  # sweep.same_run: a configuration another study has run is not trained again
        lines.append("Runs of another study with the same configuration, trained once: " + "; ".join(
            f"{v}: {', '.join(r for r in runs if r)}" for v, runs in shared.items()) + ".")
    if study["paper"]:
        best_paper = max(study["paper"], key=study["paper"].get)
        lines.append(f"Best in the paper (of the variants run here): {best_paper}.")
    if "pairs" in study:
        pairs = scaling_pairs(summary, study["pairs"])
        r, p = pearson(*zip(*pairs)), permutation_p(*zip(*pairs))
        lines.append(f"R^2 between the two LM sizes' scores over {len(pairs)} variants: {r ** 2:.3f} (paper, 1.5B vs "
                     f"7B: 0.831); the correlation r = {r:+.3f} ({'the same order' if r > 0 else 'the order reversed'}"
                     f"); permutation p {p:.3f} (one-sided: the share of the orderings of the large LM's scores that "
                     "correlate with the small's as well or better).")
    templates = summary[first].get("templates") if first else None
    if templates:  # what the category means average away: which templates the video is read for
        lines += ["", "Per question template, pooled over the seeds (shortcut questions left out): accuracy with the "
                  f"video / without it / with the caption in its place. n: {first}'s questions.", "",
                  "| template | n | " + " | ".join(summary) + " |", "|---|---|" + "---|" * len(summary)]
        for t, c in templates.items():
            cells = [summary[v]["templates"].get(t) for v in summary]
            lines.append(f"| {t} | {c['n']} | " + " | ".join(
                "-" if x is None else f"{x['video']:.2f} / {x['text']:.2f} / {x['caption']:.2f}" for x in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(name, study, summary, path):
    """The paper's figure for the study, where matplotlib is installed (it is optional: nothing else needs it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if name == "tokens":  # the heatmap: fps x tokens per frame
        fpss, tpfs = (0.5, 1, 2), (2, 8, 16)
        grid = np.array([[summary[f"fps {f} x {t} tpf"]["overall"][0] for t in tpfs] for f in fpss])
        im = ax.imshow(100 * grid, cmap="viridis")
        for (i, j), value in np.ndenumerate(100 * grid):  # the numbers too: the colours stretch to any range
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w" if value < 100 * grid.mean() else "k")
        ax.set_xticks(range(len(tpfs)), [str(t) for t in tpfs])
        ax.set_yticks(range(len(fpss)), [str(f) for f in fpss])
        ax.set_xlabel("tokens per frame")
        ax.set_ylabel("fps")
        fig.colorbar(im, label="accuracy %")
    elif "pairs" in study:  # the scaling-consistency scatter: each variant's score at the small LM against the large
        pairs = 100 * np.array(scaling_pairs(summary, study["pairs"]))
        stds = 100 * np.array(scaling_pairs(summary, study["pairs"], 1))
        ax.errorbar(*pairs.T, xerr=stds[:, 0], yerr=stds[:, 1], fmt="o", capsize=2)  # mean +- std over seeds
        for v, (x, y) in zip(study["pairs"], pairs):
            ax.annotate(v, (x, y), fontsize=7)
        ax.set_xlabel("accuracy %, small LM")
        ax.set_ylabel("accuracy %, large LM")
        r = pearson(*pairs.T)
        ax.text(0.02, 0.95, f"R^2 {r ** 2:.2f}, r {r:+.2f}", transform=ax.transAxes)
    else:  # per-category lines, one per variant
        for variant, row in summary.items():
            ax.plot(CATEGORIES, [100 * (row[c][0] or 0) for c in CATEGORIES], marker="o", label=variant)
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=7)
    ax.set_title(f"mini-Apollo: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
