"""probe.py: linear probes of the scene's facts, from a run's pixels, encoder grid and connector tokens.

    pytest tests/test_probe.py
"""
import json

import pytest
import torch

import probe
import train


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
        assert set(result[fact]) == {"majority", *probe.FEATURES}
        assert all(0 <= v <= 1 for v in result[fact].values())
    assert json.loads((tmp_path / "probe.json").read_text()) == result
    with pytest.raises(SystemExit, match="unknown option --ckpts"):
        probe.main([f"--ckpts={out / 'sft.pt'}"])
