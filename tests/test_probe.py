"""probe.py: linear probes of the scene's facts, from a run's pixels, encoder grid and connector tokens.

    pytest tests/test_probe.py
"""
import json

import pytest
import torch

import probe
import train
from apollo import Apollo
from config import config_from_args, model_config
from integrate import Tokenizer, build_sample, format_mc, video_tokens


def test_linear_probe_reads_a_linear_fact_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=gen)
    y = (x[:, :4] @ torch.randn(4, 4, generator=gen)).argmax(1)  # four classes, each the largest of four linear maps
    guess = probe.linear_probe(x[:300], y[:300], x[300:])
    assert (guess == y[300:]).float().mean() > 0.75  # the commonest class: 0.35
    noise = torch.randint(0, 4, (400,), generator=gen)  # labels that x says nothing of
    guess = probe.linear_probe(x[:300], noise[:300], x[300:])
    assert (guess == noise[300:]).float().mean() < 0.45


def test_probe_run_scores_every_fact_from_every_feature_set(tmp_path):
    out = tmp_path / "out"
    train.main(["--preset=smoke", f"--out_dir={out}", f"--data_dir={tmp_path / 'data'}"])
    result = probe.main([f"--ckpt={out / 'sft.pt'}", f"--json={tmp_path / 'probe.json'}"])
    assert result["videos"] == {"train": 24, "test": 8}
    for fact in probe.FACTS:
        assert set(result[fact]) == {"commonest", *probe.FEATURES}
        assert all(0 <= v <= 1 for v in result[fact].values())
    scenes = [json.loads(line) for line in next((tmp_path / "data").glob("world-*/scenes.jsonl")).open()]
    counts = [len(s["objects"]) for s in scenes if s["name"].startswith("train")]
    common = max(sorted(set(counts), key=str), key=counts.count)  # the baseline: the commonest training answer
    test = [len(s["objects"]) for s in scenes if s["name"].startswith("test")]
    assert result["objects"]["commonest"] == round(test.count(common) / len(test), 3)
    assert result["asked"] and set(result["asked"]) <= set(probe.ASKED)  # the LM's state where it starts to answer
    for r in result["asked"].values():
        assert {"n", "commonest", "tokens", "answer 0"} <= set(r) and all(0 <= r[k] <= 1 for k in r if k != "n")
    objects = result["asked"]["objects"]  # every video is asked how many objects it showed: the script's answer
    assert objects["n"] == 8 and objects["commonest"] == result["objects"]["commonest"]
    assert json.loads((tmp_path / "probe.json").read_text()) == result
    with pytest.raises(SystemExit, match="unknown option --ckpts"):
        probe.main([f"--ckpts={out / 'sft.pt'}"])


def test_features_are_the_models_own_padded_with_zeros_to_max_clips():
    cfg = config_from_args(["--preset=smoke", "--device=cpu"])
    torch.manual_seed(0)
    model = Apollo(model_config(cfg, cfg.vocab_size)).eval()
    frames = torch.randint(0, 256, (1, cfg.frames_per_clip, 64, 64, 3), dtype=torch.uint8)  # one clip of max_clips=2
    out = probe.features(model, frames, max_clips=2)
    with torch.no_grad():
        tokens = model.encode_video(frames).flatten()
    assert set(out) == set(probe.FEATURES)
    assert torch.allclose(out["tokens"][:len(tokens)], tokens) and not out["tokens"][len(tokens):].any()
    assert len(out["tokens"]) == 2 * len(tokens)
    assert len(out["grid"]) == 2 * cfg.frames_per_clip * 2 * cfg.vit_dim * 4  # both towers' channels, 2x2 a frame
    assert len(out["pixels"]) == 2 * cfg.frames_per_clip * 3 * 8 * 8 and out["pixels"][:len(out["pixels"]) // 2].any()
    assert len(out["motion"]) == 2 * cfg.frames_per_clip // 2 * 13  # 13 shifts a pair of frames


def test_motion_costs_read_the_camera_pan_where_pixels_do_not():
    """The motion features are what make a pan linear: a blocky texture seen by a camera panning one of four ways,
    each clip a new texture, is told apart from them, not from the pixels."""
    gen = torch.Generator().manual_seed(0)
    cfg = config_from_args(["--preset=smoke", "--device=cpu"])
    model = Apollo(model_config(cfg, cfg.vocab_size)).eval()
    ways = [(8, 0), (-8, 0), (0, 8), (0, -8)]
    rows, labels = [], []
    for i in range(160):
        texture = torch.randint(0, 256, (3, 14, 14), generator=gen).repeat_interleave(8, 1).repeat_interleave(8, 2)
        dx, dy = ways[i % 4]
        frames = torch.stack([texture[:, 24 + k * dy:88 + k * dy, 24 + k * dx:88 + k * dx]
                              for k in range(cfg.frames_per_clip)]).permute(0, 2, 3, 1)  # (T, 64, 64, 3)
        rows.append(probe.features(model, frames[None].to(torch.uint8), max_clips=2))
        labels.append(i % 4)
    y = torch.tensor(labels)
    score = {}
    for name in ("pixels", "motion"):
        x = torch.stack([r[name] for r in rows])
        score[name] = float((probe.linear_probe(x[:120], y[:120], x[120:]) == y[120:]).float().mean())
    assert score["motion"] == 1.0 and score["pixels"] < 0.6, score


def test_answer_states_are_what_the_lm_answers_from():
    """The last block's state at the prompt's end is the one the LM's head turns into its first answer token."""
    cfg = config_from_args(["--preset=smoke", "--device=cpu"])
    torch.manual_seed(0)
    model = Apollo(model_config(cfg, cfg.vocab_size)).eval()
    tok = Tokenizer.train(["Which way did the camera move? left right up down (A) (B)"], cfg.vocab_size)
    frames = torch.randint(0, 256, (2, cfg.frames_per_clip, 64, 64, 3), dtype=torch.uint8)  # two clips
    clips = [(0.0, 3.0), (3.0, 6.0)]
    question = {"question": "Which way did the camera move?", "options": ["left", "right", "up", "down"]}
    states = probe.answer_states(model, tok, cfg, frames, clips, question)
    assert list(states) == [f"answer {k}" for k in range(cfg.lm_layers)]
    video = video_tokens(tok, clips, model.tokens_per_clip, cfg.integration)
    ids = build_sample(tok, [(format_mc(question["question"], question["options"]), "")], video)[0][:-1]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), frames)[0][0, -1]
        mine = model.lm.head(model.lm.norm(states[f"answer {cfg.lm_layers - 1}"]))
    assert torch.allclose(mine, logits, atol=1e-5)
