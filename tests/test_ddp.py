"""train.py under torchrun: two CPU processes (gloo) split each global batch and end where one process ends.

    pytest tests/test_ddp.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_take_the_steps_one_process_takes(tmp_path):
    """2 processes x 2 accumulated micro-batches of 2 vs 1 process (loading with 2 DataLoader workers) taking each
    batch of 8 whole: the same losses and the same weights after 3 lm steps."""
    common = ["train.py", "--preset=smoke", f"--data_dir={tmp_path / 'data'}", "--stage=lm", "--lm_steps=3",
              "--log_every=1"]
    one = subprocess.run([sys.executable, *common, f"--out_dir={tmp_path / 'one'}", "--workers=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *common, f"--out_dir={tmp_path / 'two'}", "--grad_accum=2", "--workers=0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and two.stdout.count("device ") == 1  # process 0 alone speaks

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses(tmp_path / "one")) == 3
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=2e-4)
    a = torch.load(tmp_path / "one" / "lm.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "lm.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for name in a:  # atol: 1/300 of one AdamW step at lr 3e-3, where Adam's division magnifies float noise of
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)  # a gradient near zero
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["data_wait"] <= 1 for r in rows)
