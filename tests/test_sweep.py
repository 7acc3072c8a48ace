"""sweep.py: a study's runs over seeds share a stage lm and a stage encoders per seed, are cached, and end in a table.

    pytest tests/test_sweep.py
"""
import os

import pytest

import report
import sweep


def test_a_tiny_study_runs_caches_and_reports(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.STUDIES, "tiny", {
        "what": "two connectors at the smoke preset",
        "variants": {"perceiver": ["--resampler=perceiver"], "mlp_pool": ["--resampler=mlp_pool"]},
        "paper": {"perceiver": 55.5, "mlp_pool": 53.2}})
    root = str(tmp_path)
    results = sweep.run_study("tiny", seeds=2, preset="smoke", root=root, log=lambda *a: None)
    assert {v: len(r) for v, r in results.items()} == {"perceiver": 2, "mlp_pool": 2}
    assert sorted(os.listdir(tmp_path / "runs" / "lm")) == ["smoke-default-s0", "smoke-default-s1"]  # one per seed
    pretrained = ["smoke-default-default-s0", "smoke-default-default-s1"]  # one encoders stage per seed, shared
    assert sorted(os.listdir(tmp_path / "runs" / "pretrained")) == pretrained
    for seed in (0, 1):  # every variant of a seed started from that seed's LM and its pretrained encoders
        shared = (tmp_path / "runs" / "pretrained" / f"smoke-default-default-s{seed}" / "encoders.pt").read_bytes()
        for variant in ("perceiver", "mlp_pool"):
            rows = (tmp_path / "runs" / "tiny" / f"{variant}-s{seed}" / "metrics.jsonl").read_text()
            assert '"stage": "lm"' not in rows and '"stage": "encoders"' not in rows and '"stage": "sft"' in rows
            assert (tmp_path / "runs" / "tiny" / f"{variant}-s{seed}" / "encoders.pt").read_bytes() == shared
    stamp = os.path.getmtime(tmp_path / "runs" / "tiny" / "perceiver-s0" / "eval.json")
    # another study whose variant is the same configuration by other flags (the default connector): not trained again
    monkeypatch.setitem(sweep.STUDIES, "twin", {"what": "the default twice", "paper": {},
                                                "variants": {"default": [], "plain": ["--integration=plain"]}})
    lm_dir = os.path.join(root, "runs", "lm", "smoke-default-s1")
    args = ["--preset=smoke", "--seed=1", f"--data_dir={os.path.join(root, 'data')}", f"--lm_from={lm_dir}"]
    assert sweep.same_run(args, os.path.join(root, "runs", "twin", "default-s1"), root) == os.path.join(
        root, "runs", "tiny", "perceiver-s1")
    assert sweep.same_run([*args, "--integration=plain"], os.path.join(root, "runs", "twin", "plain-s1"), root) is None
    monkeypatch.setitem(sweep.STUDIES["twin"], "variants", {"default": []})
    twin = sweep.run_study("twin", seeds=2, preset="smoke", root=root, log=lambda *a: None)
    assert not (tmp_path / "runs" / "twin").exists()
    assert [r["run"] for r in twin["default"]] == ["runs/tiny/perceiver-s0", "runs/tiny/perceiver-s1"]
    assert twin["default"] == results["perceiver"]
    assert "trained once: default: runs/tiny/perceiver-s0, runs/tiny/perceiver-s1." in report.report(
        "twin", sweep.STUDIES["twin"], report.summarise(twin), 2, "smoke")
    again = sweep.run_study("tiny", seeds=2, preset="smoke", root=root, log=lambda *a: None)
    assert again == results and os.path.getmtime(tmp_path / "runs" / "tiny" / "perceiver-s0" / "eval.json") == stamp
    monkeypatch.setattr(sweep, "code_version", lambda: "changed")  # as if a component had been edited
    assert sweep.same_run(args, os.path.join(root, "runs", "twin", "default-s1"), root) is None  # not of other code
    sweep.run_study("tiny", seeds=1, preset="smoke", root=root, log=lambda *a: None)
    assert os.path.getmtime(tmp_path / "runs" / "tiny" / "perceiver-s0" / "eval.json") > stamp
    assert (tmp_path / "runs" / "tiny" / "perceiver-s0.old" / "eval.json").exists()
    assert (tmp_path / "runs" / "lm" / "smoke-default-s0.old").exists()  # the shared LM was trained again too
    summary = report.summarise(results)
    mean, std = summary["perceiver"]["overall"]
    scores = [r["overall"] for r in results["perceiver"]]
    assert mean == pytest.approx(sum(scores) / 2) and std == pytest.approx(abs(scores[0] - scores[1]) / 2 ** 0.5)
    text = report.report("tiny", sweep.STUDIES["tiny"], summary, 2, "smoke")
    assert "| perceiver |" in text and "| 55.5 |" in text and "Best here" in text and "without the video" in text
    ranks = [r["visual_spread"]["tokens"] for r in results["perceiver"]]  # has the connector collapsed
    assert summary["perceiver"]["tokens_rank"][0] == pytest.approx(sum(ranks) / 2)
    assert f"| {sum(ranks) / 2:.2f} +- " in text
    shares = [r["visual_spread"]["share"] for r in results["perceiver"]]  # has the video faded behind a common part
    assert summary["perceiver"]["tokens_share"][0] == pytest.approx(sum(shares) / 2)
    mean, std = summary["perceiver"]["tokens_share"]
    row = next(line for line in text.splitlines() if line.startswith("| perceiver |")).split(" | ")
    header = next(line for line in text.splitlines() if line.startswith("| variant |")).split(" | ")
    assert row[header.index("tokens share")] == f"{100 * mean:.1f} +- {100 * std:.1f}"  # in its own column, in %
    blind = [r["without_video"]["overall"] for r in results["perceiver"]]
    assert summary["perceiver"]["without_video"][0] == pytest.approx(sum(blind) / 2)


def test_paired_differences_cancel_what_a_seed_shares(monkeypatch):
    """Two variants whose seeds' scores swing together by 0.04 but differ by 0.01 on every seed: unpaired, the gap is
    under the seeds' std; paired by seed, it is exact. The video's share is each run's score less its own blind one."""
    def run(overall, blind):
        return {"overall": overall, "categories": {}, "without_video": {"overall": blind}, "visual_spread": None}
    results = {"first": [run(0.30, 0.29), run(0.26, 0.26), run(0.34, 0.30)],
               "second": [run(0.31, 0.30), run(0.27, 0.26), run(0.35, 0.31)]}
    summary = report.summarise(results)
    assert summary["second"]["overall"][1] == pytest.approx(0.04)  # the unpaired std swamps the 0.01 gap
    assert summary["second"]["vs_first"] == pytest.approx((0.01, 0.0)) and summary["first"]["vs_first"] == (0, 0)
    assert summary["first"]["video_adds"][0] == pytest.approx((0.01 + 0.0 + 0.04) / 3)
    monkeypatch.setitem(sweep.STUDIES, "pair", dict(sweep.STUDIES["resampler"], variants={"first": [], "second": []},
                                                    paper={}))
    text = report.report("pair", sweep.STUDIES["pair"], summary, 3, "study")
    assert "vs first (paired)" in text and "| 1.0 +- 0.0 |" in text and "the video adds (paired)" in text
    assert "Paired by seed" not in text  # no spread to measure a difference against: no ratio printed


def test_per_template_scores_join_each_run_to_its_own_world(tmp_path, monkeypatch):
    """Two seeds' worlds reuse question ids (q0 is colour in one, count in the other): each run's answers are read
    against its own world's templates, shortcut questions are left out, and the report prints the pooled table."""
    import dataclasses
    import json

    from config import Config
    from data import world_dir
    from samples import world_config
    worlds = {0: {"q0": "color", "q1": "count", "q2": "color"}, 1: {"q0": "count", "q1": "color", "q2": "count"}}
    answers = {0: [("q0", "A", "A", "B", "A"), ("q1", "B", "C", "B", "B"), ("q2", "C", "C", "C", "C")],
               1: [("q0", "A", "A", "A", "C"), ("q1", "D", "D", "D", "D"), ("q2", "B", "B", "B", "B")]}
    runs = []
    for seed, templates in worlds.items():
        cfg = dataclasses.replace(Config(), seed=seed, data_dir=str(tmp_path / "data"))
        world = world_dir(world_config(cfg), cfg.data_dir)
        os.makedirs(world)
        with open(os.path.join(world, "test.jsonl"), "w") as f:
            f.writelines(json.dumps({"id": q, "template": t, "video": "videos/v.mp4", "question": "?", "answer": "A",
                                    "options": ["a", "b", "c", "d"], "category": "perception"}) + "\n"
                         for q, t in templates.items())
        run = tmp_path / "runs" / "x" / f"v-s{seed}"
        os.makedirs(run)
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        (run / "answers.jsonl").write_text("".join(json.dumps(
            {"id": q, "answer": a, "with_video": v, "without_video": b, "with_caption": c,
             "shortcut": "text" if q == "q2" else None}) + "\n" for q, a, v, b, c in answers[seed]))
        runs.append(f"runs/x/v-s{seed}")
    got = report.per_template(runs, str(tmp_path))
    assert got == {"color": {"n": 2, "video": 1.0, "text": 0.5, "caption": 1.0},
                   "count": {"n": 2, "video": 0.5, "text": 1.0, "caption": 0.5}}
    run = {"overall": 0.3, "categories": {}, "without_video": {"overall": 0.3}, "visual_spread": None}
    summary = report.summarise({"v": [dict(run, run=r) for r in runs]}, str(tmp_path))
    monkeypatch.setitem(sweep.STUDIES, "x", dict(sweep.STUDIES["resampler"], variants={"v": []}, paper={}))
    text = report.report("x", sweep.STUDIES["x"], summary, 2, "study")
    assert "| template | n | v |" in text and "| count | 2 | 0.50 / 1.00 / 0.50 |" in text


def test_the_scaling_variants_are_distinct_configurations():
    """Each of the scaling study's points is its own configuration at each LM size (the R^2 would count twice a
    point that two names give: the resampler study's perceiver is integration's timestamp and schedule's 3 stages)."""
    for size in sweep.LM_SIZES:
        configs = [sweep.asdict(sweep.config_from_args(["--preset=study", *sweep.STUDIES["scaling"]["variants"][
            f"{v} @ {size}"]])) for v in sweep.SCALING_VARIANTS]
        assert all(a != b for i, a in enumerate(configs) for b in configs[i + 1:]), size


def test_correlation_and_its_permutation_p_of_known_lists():
    """R^2 is the square of r, blind to a reversed ranking; r and the permutation p are not."""
    assert report.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert report.pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)  # R^2 1, the order reversed
    assert report.pearson([1, 2, 3, 4], [1, -1, -1, 1]) == pytest.approx(0.0)
    assert report.permutation_p([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1 / 24)  # only the order itself
    assert report.permutation_p([1, 2, 3, 4], [8, 6, 4, 2]) == 1.0  # every order does as well as the reversed one
    many = list(range(10))  # over 8 scores: 20,000 drawn orderings, of which about none is the order itself
    assert report.permutation_p(many, many) < 0.001


def test_code_version_ignores_comments_and_docstrings_not_code(tmp_path):
    for name in sweep.SOURCES:
        with open(os.path.join(sweep.HERE, name)) as f:
            (tmp_path / name).write_text(f.read())
    version = sweep.code_version(str(tmp_path))
    assert version == sweep.code_version()
    layers = tmp_path / "layers.py"
    text = layers.read_text()
    reworded = text.replace('"""Pre-norm transformer block', '"""A pre-norm block, reworded', 1)
    reworded = reworded.replace("class RMSNorm(nn.Module):", "class RMSNorm(nn.Module):  # a new comment", 1)
    assert reworded != text
    layers.write_text(reworded)
    assert sweep.code_version(str(tmp_path)) == version  # the same code: the runs are kept
    layers.write_text(text.replace("eps=1e-6", "eps=1e-5", 1))
    assert sweep.code_version(str(tmp_path)) != version  # a default changed: the runs are trained again


@pytest.mark.parametrize("name", ["tokens", "scaling", "resampler"])
def test_each_kind_of_plot_is_drawn(tmp_path, name):
    """The optional figure (matplotlib is not a requirement: skipped without it): the fps x tokens heatmap, the scaling
    scatter, per-category lines for the rest."""
    pytest.importorskip("matplotlib")
    summary = {v: {"overall": (0.3 + 0.01 * i, 0.01), **{c: (0.3, 0.01) for c in report.CATEGORIES}}
               for i, v in enumerate(sweep.STUDIES[name]["variants"])}
    path = report.plot(name, sweep.STUDIES[name], summary, str(tmp_path / f"{name}.png"))
    assert path and os.path.getsize(path) > 1000


def test_rescore_scores_a_run_on_more_test_videos_of_its_own_seed(tmp_path, monkeypatch):
    """--test_videos=N: a finished run is scored again, without training, on N test videos of its seed; the first of
    them are its own test videos (same bytes, same questions), the score is kept until the checkpoint changes, and
    the report names the larger split and the binomial error of one score."""
    import json
    import types

    from data import load_jsonl, world_dir
    from samples import world_config
    monkeypatch.setitem(sweep.STUDIES, "one", {"what": "the default connector", "paper": {},
                                               "variants": {"perceiver": ["--resampler=perceiver"]}})
    root = str(tmp_path)
    monkeypatch.chdir(tmp_path)  # main writes its report under --root
    sweep.main(["one", "--seeds=1", "--preset=smoke", f"--root={root}"])
    run = tmp_path / "runs" / "one" / "perceiver-s0"
    own = json.loads((run / "eval.json").read_text())
    sweep.main(["one", "--seeds=1", "--preset=smoke", f"--root={root}", "--test_videos=12"])
    again = json.loads((run / "eval-test12.json").read_text())
    assert again["n"] > own["n"] and (tmp_path / "one-test12.md").exists()
    cfg = types.SimpleNamespace(**json.loads((run / "config.json").read_text()))
    mine = world_dir(world_config(cfg), cfg.data_dir)
    bigger = world_dir(report.test_world(cfg, 12), cfg.data_dir)
    assert sorted(os.listdir(os.path.join(bigger, "videos")))[-1] == "test_00011.mp4"  # no training video made
    questions, more = load_jsonl(os.path.join(mine, "test.jsonl")), load_jsonl(os.path.join(bigger, "test.jsonl"))
    assert more[:len(questions)] == questions and len(more) > len(questions)
    for name in {q["video"] for q in questions}:  # the run's own test videos, the same bytes
        assert open(os.path.join(mine, name), "rb").read() == open(os.path.join(bigger, name), "rb").read()
    rows = (run / "answers-test12.jsonl").read_text().splitlines()
    assert len(rows) == len(more) and again["with_shortcuts"]["n"] == len(more)
    text = (tmp_path / "one-test12.md").read_text()
    assert "--test_videos=12`" in text and "Each run is scored on 12 test videos of its seed" in text
    templates = report.per_template(["runs/one/perceiver-s0"], root, 12)
    assert sum(t["n"] for t in templates.values()) == again["n"]  # the larger split's answers, joined to its world
    stamp = os.path.getmtime(run / "eval-test12.json")
    assert sweep.rescore(str(run), 12, log=lambda *a: None)["overall"] == again["overall"]
    assert os.path.getmtime(run / "eval-test12.json") == stamp  # kept: the same checkpoint
    os.utime(run / "sft.pt", (stamp + 5, stamp + 5))  # as if trained again
    sweep.rescore(str(run), 12, log=lambda *a: None)
    assert os.path.getmtime(run / "eval-test12.json") > stamp
    with pytest.raises(SystemExit, match="unknown option --test_video;"):
        sweep.main(["one", "--test_video=12"])
    with pytest.raises(SystemExit, match="--test_videos takes a number"):
        sweep.main(["one", "--test_videos=lots"])
