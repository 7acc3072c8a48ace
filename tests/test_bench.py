"""bench.py: the filter's pure functions on hand-made matrices, and a model asked in each mode.

    pytest tests/test_bench.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import apollobench
import bench
import samples
import train
from data import load_jsonl, write_jsonl
from integrate import VIDEO

V, F, T = 0, 1, 2  # the modes' columns: video, frame, text


def matrix(rows):
    """rows: per model, a string per question of three characters (video, frame, text), 1 = right."""
    return np.array([[[c == "1" for c in q] for q in m.split()] for m in rows], bool)


def test_blind_and_easy_rules():
    # 4 models x 4 questions; q0 right from text by 3 of 4, q1 from one frame by 3 of 4, q2 right with video by all,
    # q3 right with video by half, never without it
    right = matrix(["101 110 100 100", "101 110 100 100", "101 110 100 000", "000 000 100 000"])
    blind = apollobench.blind_rules(right, text_max=0.5, frame_max=0.5)
    assert blind["text"].tolist() == [True, False, False, False]
    assert blind["frame"].tolist() == [False, True, False, False]
    assert apollobench.easy_rule(right, easy_max=0.9).tolist() == [False, False, True, False]
    blind = apollobench.blind_rules(right, text_max=0.75, frame_max=0.8)
    assert blind["text"].tolist() == [False] * 4  # 3/4 is not > 3/4


def test_entropy_selection_and_ranking():
    choices = np.array([[0, 0, 1, 2], [0, 1, 1, 3], [0, 2, 1, 0], [0, 3, 1, 1]])  # 4 models x 4 questions
    h = apollobench.answer_entropy(choices, np.array([4, 4, 4, 4]))
    assert h.tolist() == pytest.approx([0.0, 2.0, 0.0, 2.0])  # all agree: 0 bits; all differ: log2(4)
    assert apollobench.answer_entropy(np.array([[0], [0], [1], [1]]), np.array([4])).tolist() == pytest.approx([1.0])
    keep = np.array([True, True, True, False])
    assert apollobench.select_top(h, ["a", "a", "b", "b"], keep, top=1) == [1, 2]  # q3 dropped by keep
    assert apollobench.select_top(h, ["a", "a", "a", "a"], np.ones(4, bool), top=2) == [1, 3]
    assert apollobench.ranks([10, 30, 20, 20]).tolist() == [1, 4, 2.5, 2.5]
    assert apollobench.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert apollobench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert apollobench.recall_precision([1, 1, 0, 0], [1, 0, 1, 0]) == (0.5, 0.5)


def test_build_on_a_known_matrix():
    """Six questions, two categories: the text shortcut and the frame shortcut go, the easy one goes, and of the
    rest the most disputed one per category stays."""
    right = matrix(["111 100 101 100 100 100", "111 110 101 100 000 100", "101 110 101 100 000 000"])
    choices = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 2, 1]])
    items = [{"category": c, "n_options": 4, "shortcut": s} for c, s in
             [("a", "text"), ("a", "frame"), ("b", None), ("a", None), ("b", None), ("b", None)]]
    chosen, rep = apollobench.build(right, choices, items, text_max=0.5, frame_max=0.5, easy_max=0.9, top=1)
    # q0 text (3/3 right without video), q1 frame (2/3), q2 text too (3/3); q3 easy (all right with video)
    assert chosen == [4]  # b: q4 (3 different answers) beats q5; a: nothing left
    assert rep["removed"]["a"] == {"pool": 3, "text": 1, "frame": 1, "easy": 1, "kept": 0}
    assert rep["removed"]["b"] == {"pool": 3, "text": 1, "frame": 0, "easy": 0, "kept": 1}
    assert rep["shortcut_recall"] == 1.0 and rep["shortcut_precision"] == pytest.approx(2 / 3)
    assert rep["shortcut_recall_by_kind"] == {"frame": 1.0, "text": 1.0}


def test_the_figures_that_say_whether_a_ranking_holds():
    """Held-out Spearman, the pool's split halves, random benchmarks of the same size, the thresholds' sweep."""
    # 3 models, 8 questions: model 0 right on all, model 1 on the even ones, model 2 on none: any questions rank them
    video = np.array([[1] * 8, [1, 0] * 4, [0] * 8], bool)
    assert apollobench.heldout_spearman(video, [0, 1]) == pytest.approx(1.0)
    assert apollobench.split_half(video, draws=20) == pytest.approx(1.0)
    assert np.isnan(apollobench.split_half(video[:, :1], draws=20))  # one question has no halves
    # q0-q5 rank the models the reverse of q6-q9, and outweigh them in the pool: q0-q5 agree with the pool (+1,
    # their own questions) and disagree with the rest (-1)
    flip = np.array([[1, 1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 1, 1, 0, 0], [0] * 6 + [1] * 4], bool)
    assert apollobench.spearman(flip.mean(1), flip[:, :6].mean(1)) == pytest.approx(1.0)
    assert apollobench.heldout_spearman(flip, list(range(6))) == pytest.approx(-1.0)
    assert np.isnan(apollobench.heldout_spearman(flip, list(range(10))))  # no rest to hold it against
    categories = ["a", "a", "a", "a", "b", "b", "b", "b"]
    draws = apollobench.random_benchmarks(categories, [0, 1, 4], draws=50, seed=3)
    assert all(len(d) == 3 and sum(q < 4 for q in d) == 2 and len(set(d)) == 3 for d in draws)  # 2 of a, 1 of b
    assert len({tuple(d) for d in draws}) > 1 and draws[0].tolist() == apollobench.random_benchmarks(
        categories, [0, 1, 4], draws=50, seed=3)[0].tolist()  # random, and the same for the same seed
    only = [True, True, False, False, True, False, False, False]  # drawn among these: the only set there is
    assert all(d.tolist() == [0, 1, 4] for d in apollobench.random_benchmarks(categories, [0, 1, 4], 5, among=only))
    base = apollobench.baseline(video, [np.array([0, 1]), np.array([2, 3])])
    assert base["draws"] == 2 and base["spearman_heldout"]["mean"] == pytest.approx(1.0)
    # q0 a text shortcut (right from the text by 2 of 3), q1 a frame shortcut right from a frame by 1 of 3 (caught
    # only under 0.3), q2 unmarked but right from a frame by 1 of 3, q3 unmarked and never right without the video
    right = matrix(["101 110 110 100", "101 100 100 100", "100 100 100 100"])
    sweep = apollobench.threshold_sweep(right, [True, True, False, False], [0.3, 0.5])
    assert sweep[0] == {"max": 0.3, "removed": 3, "recall": 1.0, "precision": pytest.approx(2 / 3)}
    assert sweep[1] == {"max": 0.5, "removed": 1, "recall": 0.5, "precision": 1.0}
    assert apollobench.mean_range([1, 2, 3, float("nan")])["mean"] == pytest.approx(2.0)
    assert np.isnan(apollobench.mean_range([])["mean"])


def test_a_model_asked_in_each_mode(tmp_path, tiny_world):
    world, _ = tiny_world
    out = tmp_path / "run"
    train.main(["--preset=smoke", f"--out_dir={out}", f"--data_dir={tmp_path / 'data'}"])
    model, tok, cfg, env = bench.load_run(str(out / "sft.pt"), "cpu")
    items = bench.mc_items(f"{world}/test.jsonl")
    frame = bench.ModeSamples(items, tok, cfg, model.tokens_per_clip, "frame")[0]
    assert frame["frames"].shape[0] == 1 and torch.equal(frame["frames"][0, 0], frame["frames"][0, -1])
    # warmed first, frame mode still gives one frame (Samples.warm alone would cache the whole video), and a bad video
    # is dropped with a warning, not asked
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    warmed = bench.ModeSamples(items + [dict(items[0], video=str(bad))], tok, cfg, model.tokens_per_clip, "frame")
    warned = []
    assert warmed.warm(0, 0.5, warned.append) == 1 and "bad.mp4" in warned[0] and len(warmed) == len(items)
    assert all(warmed[i]["frames"].shape[0] == 1 for i in range(len(warmed)))
    text = bench.ModeSamples(items, tok, cfg, model.tokens_per_clip, "text")[0]
    assert text["frames"] is None and VIDEO not in text["ids"]  # no visual tokens at all
    told = samples.Samples(samples.described_items(items, world), tok, cfg, model.tokens_per_clip)[0]  # mode caption
    assert told["frames"] is None and VIDEO not in told["ids"]
    caption = [c for c in load_jsonl(f"{world}/captions_test.jsonl") if c["video"] in items[0]["video"]]
    assert tok.decode(told["ids"][1:]).startswith(f"Description: {caption[0]['conversations'][1]['value']}\n")
    result = bench.evaluate_modes(str(out / "sft.pt"), f"{world}/test.jsonl", device="cpu")
    for mode in bench.EVAL_MODES:
        assert result[mode]["with_shortcuts"]["n"] == len(items) and 0 <= result[mode]["overall"] <= 1
    videos = len({it["video"] for it in items})  # asked with the video: how far its tokens tell the videos apart
    assert result["visual_spread"]["videos"] == videos and 1.0 <= result["visual_spread"]["tokens"] <= videos
    # a user's JSONL whose videos have no captions: the caption mode is left out, with a note
    lone = tmp_path / "lone.jsonl"
    write_jsonl(str(lone), [dict(q, video=os.path.join(world, q["video"])) for q in load_jsonl(f"{world}/test.jsonl")])
    notes = []
    result = bench.evaluate_modes(str(out / "sft.pt"), str(lone), ["caption", "text"], "cpu", log=notes.append)
    assert "caption" not in result and "text" in result and "lone.jsonl" in notes[0]
    # writing: the loss of the split's captions, given the video, the prompt alone, and as plain text
    wrote = bench.evaluate_modes(str(out / "sft.pt"), f"{world}/test.jsonl", ["writing"], "cpu")["writing"]
    assert wrote["n"] == len(load_jsonl(f"{world}/captions_test.jsonl"))
    assert all(0 < wrote[k] < 20 for k in ("with_video", "without_video", "plain_text"))
    assert wrote["with_video"] != wrote["without_video"]  # the visual tokens are there, and change what it predicts
    assert "writing" not in bench.evaluate_modes(str(out / "sft.pt"), str(lone), ["writing"], "cpu", log=notes.append)
    assert notes[-1].startswith("writing: left out")
    # drills: fresh reading drills of stage lm (the same every call), scored per kind
    read = bench.evaluate_modes(str(out / "sft.pt"), f"{world}/test.jsonl", ["drills"], "cpu")["drills"]
    assert set(read["categories"]) == {"which_option", "lookup_color", "lookup_bounces", "lookup_char"}
    assert read["n"] == 400 and read["chance"] == 0.25 and 0 <= read["overall"] <= 1
    assert bench.drills(model, tok, cfg, env) == read
    # asking the trained model about one video from the command line (apollo.py)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    video = items[0]["video"]
    run = subprocess.run([sys.executable, "apollo.py", f"--ckpt={out / 'sft.pt'}", video, "What colour is the circle?",
                          "--options=red,blue,green,white"], cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "clip 0: 0.00-" in run.stdout and " s, frames at " in run.stdout
    assert any(f"answer: {c} ({chr(65 + k)})" in run.stdout for k, c in enumerate(["red", "blue", "green", "white"]))
    free = subprocess.run([sys.executable, "apollo.py", f"--ckpt={out / 'sft.pt'}", video, "Describe the video."],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert free.returncode == 0 and "answer: " in free.stdout
    bad = subprocess.run([sys.executable, "apollo.py", f"--ckpt={out / 'sft.pt'}", str(tmp_path / "none.mp4"), "Why?"],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "none.mp4: no such file" in bad.stderr and "Traceback" not in bad.stderr


def test_build_writes_a_benchmark_from_a_zoo(tmp_path):
    """bench.py build end to end on a zoo of two smoke runs (4 checkpoints with --stages=vision,sft) and a pool
    world of its own seed: a benchmark JSONL whose videos resolve from its folder, and a strict-JSON report."""
    import json
    for seed in (0, 1):
        train.main(["--preset=smoke", f"--seed={seed}", f"--out_dir={tmp_path / 'zoo' / str(seed)}",
                    f"--data_dir={tmp_path / 'data'}"])
    out = tmp_path / "bench"
    rep = bench.main(["build", f"--zoo={tmp_path / 'zoo'}", "--pool_videos=4", "--top=2", f"--out={out}",
                      "--stages=vision,sft", "--device=cpu"])
    assert len(rep["zoo"]) == 4 and rep["bench_questions"] == sum(r["kept"] for r in rep["removed"].values())
    rows = load_jsonl(str(out / "bench.jsonl"))
    assert len(rows) == rep["bench_questions"] and all((out / r["video"]).exists() for r in rows)
    json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert {"spearman_heldout", "pool_split_half", "bench_split_half", "random", "random_kept", "thresholds"} <= set(
        rep)
    # built again with another --top: no model is asked again; a checkpoint that changed is (the same answers)
    first = np.load(out / "answers.npz")["right"]
    os.utime(rep["zoo"][0], (1, 1))
    said = []
    again = bench.run_build({"zoo": str(tmp_path / "zoo"), "pool_videos": "4", "top": "1", "out": str(out),
                             "stages": "vision,sft", "device": "cpu"}, log=said.append)
    asked = [line for line in said if line.startswith(str(tmp_path / "zoo"))]
    assert len(asked) == 4 and [line.endswith("(kept from an earlier build)") for line in asked] == [False, True,
                                                                                                     True, True]
    assert np.array_equal(np.load(out / "answers.npz")["right"], first) and again["zoo_on_pool"] == rep["zoo_on_pool"]


def test_an_unknown_option_is_named():
    """A mistyped option stops bench.py with its name, where it was once ignored and the default used."""
    with pytest.raises(SystemExit, match="unknown option '--out=x'; it takes --ckpt"):
        bench.main(["eval", "--ckpt=a/sft.pt", "--out=x"])
    with pytest.raises(SystemExit, match="unknown option 'extra'"):
        bench.main(["build", "--zoo=z", "extra"])
