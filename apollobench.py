"""
ApolloBench's filter (Apollo §2), as pure functions over what a zoo of models answered: right (models, questions,
modes) bool, one column per mode in MODES, and choices (models, questions) int, the option each model chose with
the video. `bench.py build` asks the models and hands the matrices here; tests/test_bench.py checks each function
on hand-made matrices whose right output is known.

  1. blind_rules: drop a question more than text_max of the models answer right from the text alone, or more than
     frame_max from one frame (it does not test video understanding); easy_rule: more than easy_max with the video;
  2. answer_entropy, select_top: rank the rest by the entropy of the models' answers, keep the top per category;
  3. the report's figures: recall and precision against the planted shortcut marks (and at other thresholds), the
     spread of the zoo's scores, and whether its ranking holds: the Spearman against the pool and against the rest
     of it, each question set against itself (split halves), and the same for random benchmarks of the same size.
"""
import numpy as np

MODES = ["video", "frame", "text"]  # the columns of right: what build asks every model


def blind_rules(right, text_max=0.5, frame_max=0.5):
    """Questions too many models answer right without the video: {"text": mask, "frame": mask} over questions."""
    return {"text": right[:, :, MODES.index("text")].mean(0) > text_max,
            "frame": right[:, :, MODES.index("frame")].mean(0) > frame_max}


def easy_rule(right, easy_max=0.9):
    """Questions that more than easy_max of the models answer right with the video."""
    return right[:, :, MODES.index("video")].mean(0) > easy_max


def answer_entropy(choices, n_options):
    """Entropy (bits) of the models' answers to each question: 0 when all agree, log2(n) at most."""
    out = np.zeros(choices.shape[1])
    for q in range(choices.shape[1]):
        p = np.bincount(choices[:, q], minlength=int(n_options[q])) / choices.shape[0]
        p = p[p > 0]
        out[q] = float(-(p * np.log2(p)).sum())
    return out


def select_top(entropy, categories, keep, top):
    """Indices of the kept questions with the highest entropy, top per category (ties: the earlier question)."""
    chosen = []
    for c in sorted(set(categories)):
        idx = [q for q in range(len(categories)) if categories[q] == c and keep[q]]
        chosen += sorted(idx, key=lambda q: (-entropy[q], q))[:top]
    return sorted(chosen)


def ranks(x):
    """Ranks 1..n of x, ties sharing their mean rank."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(a, b):
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def heldout_spearman(video, chosen):
    """Spearman of the zoo's scores on the chosen questions against its scores on the rest of the pool (video: right,
    models x questions). Against the whole pool, a subset shares its own questions' luck with it, and that shared
    noise reads as agreement (a random tenth of a pool agrees with it more than with another tenth)."""
    rest = np.setdiff1d(np.arange(video.shape[1]), chosen)
    if len(chosen) == 0 or len(rest) == 0:
        return float("nan")
    return spearman(video[:, chosen].mean(1), video[:, rest].mean(1))


def random_benchmarks(categories, chosen, draws, seed=0, among=None):
    """draws random sets of questions, each with as many of every category as chosen has: a benchmark as cheap as the
    filter's, picked without it (the baseline the filter has to beat): from the whole pool, or only from the questions
    among marks (those the rules kept: then what the ranking by entropy adds)."""
    rng = np.random.default_rng(seed)
    categories = np.asarray(categories)
    among = np.ones(len(categories), bool) if among is None else np.asarray(among, bool)
    want = {c: int((categories[chosen] == c).sum()) for c in np.unique(categories[chosen])} if len(chosen) else {}
    return [np.sort(np.concatenate([rng.choice(np.flatnonzero((categories == c) & among), n, replace=False)
                                    for c, n in want.items()])) for _ in range(draws)]


def baseline(video, randoms):
    """The report's figures over randoms (sets of questions), each as mean_range: the spread of the zoo's scores, their
    agreement with themselves, and their Spearman against the pool and against the rest of it."""
    on_pool = video.mean(1)
    return {"draws": len(randoms), "spread": mean_range([video[:, r].mean(1).std() for r in randoms]),
            "split_half": mean_range([split_half(video[:, r], 10, seed=k) for k, r in enumerate(randoms)]),
            "spearman": mean_range([spearman(on_pool, video[:, r].mean(1)) for r in randoms]),
            "spearman_heldout": mean_range([heldout_spearman(video, r) for r in randoms])}


def split_half(video, draws, seed=0):
    """Mean Spearman of the zoo's rankings on two random halves of the pool: how far the pool's ranking is the models'
    and not its questions' (near 1: the ranking stands; near 0: another pool of its size would rank them anew)."""
    if video.shape[1] < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    halves = [rng.permutation(video.shape[1]) for _ in range(draws)]
    return mean_range([spearman(video[:, h[: len(h) // 2]].mean(1), video[:, h[len(h) // 2:]].mean(1))
                    for h in halves])["mean"]


def threshold_sweep(right, marked, values):
    """The blind rules with text_max = frame_max = v for each v: what they remove, and the recall and precision of
    that against the planted marks."""
    rows = []
    for v in values:
        blind = blind_rules(right, v, v)
        caught = blind["text"] | blind["frame"]
        recall, precision = recall_precision(caught, marked)
        rows.append({"max": float(v), "removed": int(caught.sum()), "recall": recall, "precision": precision})
    return rows


def mean_range(x):
    """Mean and 10th / 90th percentiles of a list of figures."""
    x = np.asarray(x, float)
    if not np.isfinite(x).any():
        return {"mean": float("nan"), "p10": float("nan"), "p90": float("nan")}
    return {"mean": float(np.nanmean(x)), "p10": float(np.nanpercentile(x, 10)), "p90": float(np.nanpercentile(x, 90))}


def recall_precision(caught, marked):
    """How many of the marked (planted) questions were caught, and how many caught ones were marked."""
    caught, marked = np.asarray(caught, bool), np.asarray(marked, bool)
    hits = (caught & marked).sum()
    return (float(hits / marked.sum()) if marked.sum() else float("nan"),
            float(hits / caught.sum()) if caught.sum() else float("nan"))


def build(right, choices, items, text_max=0.5, frame_max=0.5, easy_max=0.9, top=30, draws=200):
    """The whole filter: which questions it keeps and the report's figures, beside those of draws random benchmarks
    of the same size per category."""
    categories = [it["category"] for it in items]
    blind = blind_rules(right, text_max, frame_max)
    easy = easy_rule(right, easy_max)
    keep = ~blind["text"] & ~blind["frame"] & ~easy
    entropy = answer_entropy(choices, np.array([it["n_options"] for it in items]))
    chosen = select_top(entropy, categories, keep, top)
    frame_only, easy_only = blind["frame"] & ~blind["text"], easy & ~blind["text"] & ~blind["frame"]  # each rule's
    where = {c: np.asarray(categories) == c for c in sorted(set(categories))}  # own removals, in the order they run
    removed = {c: {"pool": int(m.sum()), "text": int((blind["text"] & m).sum()), "frame": int((frame_only & m).sum()),
                   "easy": int((easy_only & m).sum()), "kept": int(m[chosen].sum())} for c, m in where.items()}
    caught = blind["text"] | blind["frame"]
    marked = [bool(it.get("shortcut")) for it in items]
    recall, precision = recall_precision(caught, marked)
    by_kind = {k: recall_precision(caught, [it.get("shortcut") == k for it in items])[0]  # recall of each kind
               for k in sorted({it["shortcut"] for it in items if it.get("shortcut")})}
    video = right[:, :, MODES.index("video")]
    on_pool, on_bench = video.mean(1), video[:, chosen].mean(1) if chosen else np.full(len(video), np.nan)
    return chosen, {"removed": removed, "shortcut_recall": recall, "shortcut_precision": precision,
                    "shortcut_recall_by_kind": by_kind,
                    "pool_questions": len(items), "bench_questions": len(chosen),
                    "zoo_on_pool": on_pool.tolist(), "zoo_on_bench": on_bench.tolist(),
                    "spread_pool": float(on_pool.std()), "spread_bench": float(on_bench.std()),
                    "spearman": spearman(on_pool, on_bench), "spearman_heldout": heldout_spearman(video, chosen),
                    "pool_split_half": split_half(video, draws),
                    "bench_split_half": split_half(video[:, chosen], draws),
                    "random": baseline(video, random_benchmarks(categories, chosen, draws) if chosen else []),
                    "random_kept": baseline(video, random_benchmarks(categories, chosen, draws, among=keep)
                                            if chosen else []),
                    "thresholds": threshold_sweep(right, marked, [0.3, 0.35, 0.4, 0.45, 0.5])}


def report_text(rep):
    lines = ["| category | pool | removed: text | removed: one frame | removed: easy | kept |",
             "|---|---|---|---|---|---|"]
    for c, r in rep["removed"].items():
        lines.append(f"| {c} | {r['pool']} | {r['text']} | {r['frame']} | {r['easy']} | {r['kept']} |")
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in rep.get("shortcut_recall_by_kind", {}).items())
    lines += ["", f"planted shortcuts caught: recall {rep['shortcut_recall']:.2f} ({kinds}), precision "
              f"{rep['shortcut_precision']:.2f}",
              f"questions: pool {rep['pool_questions']}, benchmark {rep['bench_questions']} "
              f"({rep['cost_ratio']:.1f}x cheaper to evaluate)",
              f"spread (std) of the zoo's scores: pool {rep['spread_pool']:.3f}, benchmark {rep['spread_bench']:.3f}",
              f"Spearman correlation of the zoo's ranking, benchmark vs pool: {rep['spearman']:.3f}; "
              f"vs the rest of the pool (disjoint questions): {rep['spearman_heldout']:.3f}",
              f"each against itself (two random halves, mean Spearman): pool {rep['pool_split_half']:.3f}, "
              f"benchmark {rep['bench_split_half']:.3f} (how far its ranking is the models' and not its questions')"]
    def fig(r, k):
        return f"{r[k]['mean']:.3f} ({r[k]['p10']:.3f} to {r[k]['p90']:.3f})"
    for key, what in (("random", "the pool"), ("random_kept", "the questions the rules kept")):
        r = rep.get(key)
        if r and r["draws"]:
            lines += [f"{r['draws']} random benchmarks of the same size per category from {what} (mean, 10th to 90th "
                      f"percentile): spread {fig(r, 'spread')}, against itself {fig(r, 'split_half')}, Spearman vs "
                      f"pool {fig(r, 'spearman')}, vs the rest {fig(r, 'spearman_heldout')}"]
    lines += ["", "| text_max = frame_max | removed | recall | precision |", "|---|---|---|---|"]
    lines += [f"| {t['max']:.2f} | {t['removed']} | {t['recall']:.2f} | {t['precision']:.2f} |"
              for t in rep.get("thresholds", [])]
    return "\n".join(lines)
