"""
Speed: how fast the parts of mini-Apollo run on this machine, each measured beside its reference in one run
(the paper does not time things; this is ours, for issue 4). Timings are noisy, so read the ratios.

    python speed.py                           # the shapes of the preset fitted to the device (gpu or cpu)
    python speed.py --preset=gpu --json=speed.json
    python speed.py --only=attention,decode   # parts: attention, step, decode

- attention: forward + backward of the one hand-written attention (layers.attention) eager, the same under
  torch.compile, and torch's fused scaled_dot_product_attention as the oracle, at the model's real shapes:
  the ViT over frames, the video encoder over tubelets, the Perceiver's cross attention, the causal LM. It
  also counts how many times Inductor rewrote our attention into the fused kernel ("fuse_attention").
- step: one whole sft training step (forward, backward, AdamW) eager and compiled: tokens/s, FLOPs counted by
  torch's FlopCounterMode, MFU against the GPU's bf16 peak (a small table; 'unknown' elsewhere), peak memory.
- decode: the frames at 2 fps of a 2-minute 640x360 video (made on first use, then cached) through
  sampling.sample_fps, a plain PyAV loop that decodes and converts every frame, and the ffmpeg command line
  where it is installed.
"""
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

import av
import numpy as np
import torch
import torch.nn.functional as F

from apollo import Apollo
from config import ConfigError, config_from_args, model_config, setup
from data import write_mp4
from integrate import IGNORE, PAD, VIDEO
from layers import attention, causal_mask
from sampling import sample_fps

# bf16 dense peak FLOP/s from NVIDIA's data sheets (no sparsity); matched against torch.cuda.get_device_name()
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup=3, reps=10):
    """Median seconds of fn() over reps calls, after warmup calls (which also trigger compilation)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ---------------------------------------------------------------------------------------------------------------
# Attention at the model's shapes


def lm_seq_len(cfg):
    """A typical sft sequence: every clip's tokens and timestamp text, then a question with options and answer."""
    per_clip = cfg.tokens_per_frame * cfg.frames_per_clip + 12
    return int(math.ceil((cfg.max_clips * per_clip + 120) / 64) * 64)


def attention_shapes(cfg):
    """name -> (batch, heads, queries, keys, head dim, causal) for each place the model calls attention."""
    clips = cfg.batch_size * cfg.max_clips  # a batch of videos, each cut into up to max_clips clips
    grid = (cfg.image_size // cfg.patch_size) ** 2  # patches per frame
    hd_vit, hd_lm = cfg.vit_dim // cfg.vit_heads, cfg.lm_dim // cfg.lm_heads
    latents = cfg.tokens_per_frame * cfg.frames_per_clip
    S = lm_seq_len(cfg)
    return {
        "vit (frames)": (clips * cfg.frames_per_clip, cfg.vit_heads, grid, grid, hd_vit, False),
        "video (tubelets)": (clips, cfg.vit_heads, grid * cfg.frames_per_clip // 2, grid * cfg.frames_per_clip // 2,
                             hd_vit, False),
        "perceiver (cross)": (clips, cfg.lm_heads, latents, grid * cfg.frames_per_clip + latents, hd_lm, False),
        "lm (causal)": (cfg.batch_size, cfg.lm_heads, S, S, hd_lm, True),
    }


def bench_attention(cfg, device, dtype):
    from torch._dynamo.utils import counters
    rows = []
    torch._inductor.config.force_disable_caches = True  # a cached graph would skip the rewrite and its count
    compiled = torch.compile(attention, dynamic=False)
    for name, (B, H, Tq, Tk, hs, causal) in attention_shapes(cfg).items():
        q = torch.randn(B, H, Tq, hs, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, H, Tk, hs, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, H, Tk, hs, device=device, dtype=dtype, requires_grad=True)
        mask = causal_mask(Tq, device=device, dtype=dtype) if causal else None
        grad = torch.randn(B, H, Tq, hs, device=device, dtype=dtype)

        def run(fn):
            return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
        fused_before = counters["inductor"]["fuse_attention"]
        t_eager = timed(run(lambda q, k, v: attention(q, k, v, mask)), device)
        t_comp = timed(run(lambda q, k, v: compiled(q, k, v, mask)), device)
        fused = counters["inductor"]["fuse_attention"] - fused_before
        t_sdpa = timed(run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), device)
        rows.append({"shape": name, "B,H,Tq,Tk,hs": f"{B},{H},{Tq},{Tk},{hs}", "eager_ms": 1e3 * t_eager,
                     "compiled_ms": 1e3 * t_comp, "sdpa_ms": 1e3 * t_sdpa, "fused_by_inductor": fused,
                     "eager/compiled": t_eager / t_comp, "compiled/sdpa": t_comp / t_sdpa})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# A whole training step


def sft_batch(cfg, device):
    """A batch shaped like an sft batch: every video max_clips clips long, its visual tokens first, then text."""
    L = cfg.tokens_per_frame * cfg.frames_per_clip
    S, n_visual = lm_seq_len(cfg), cfg.max_clips * L
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(PAD + 10, cfg.vocab_size, (cfg.batch_size, S), generator=g)
    ids[:, :n_visual] = VIDEO
    labels = ids.masked_fill(ids == VIDEO, IGNORE)
    frames = torch.randint(0, 256, (cfg.batch_size * cfg.max_clips, cfg.frames_per_clip, cfg.image_size,
                                    cfg.image_size, 3), dtype=torch.uint8, generator=g)
    return ids.to(device), frames.to(device), labels.to(device)


def train_step(model, opt, batch, env):
    ids, frames, labels = batch
    with env["autocast"]():
        _, loss = model(ids, frames, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_step(cfg, device, env):
    from torch.utils.flop_counter import FlopCounterMode
    batch = sft_batch(cfg, device)
    ids, frames, _ = batch
    rows, flops = [], None
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = Apollo(model_config(cfg, cfg.vocab_size)).to(device)
        if mode == "compiled":
            for part in (*model.encoders(), model.resampler, model.lm):
                part.compile()
        params = [p.requires_grad_(True) for p in model.parameters()]  # every part learns: the costliest step
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        train_step(model, opt, batch, env)  # the first step compiles
        sync(device)
        first = time.perf_counter() - t0
        t = timed(lambda: train_step(model, opt, batch, env), device, warmup=2, reps=5)
        if flops is None:
            with FlopCounterMode(display=False) as counter:
                train_step(model, opt, batch, env)
            flops = counter.get_total_flops()
        peak = peak_flops(device)
        rows.append({"mode": mode, "ms_per_step": 1e3 * t, "first_step_s": first, "tokens_per_s": ids.numel() / t,
                     "frames_per_s": frames.shape[0] * frames.shape[1] / t, "flops_per_step": flops,
                     "mfu": flops / t / peak if peak else "unknown",
                     "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)})
    rows[1]["speedup"] = rows[0]["ms_per_step"] / rows[1]["ms_per_step"]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def long_video(root, seconds=120, width=640, height=360, fps=30):
    """A 2-minute 640x360 H.264 video with motion everywhere (a drifting pattern and moving blocks), made once."""
    path = os.path.join(root, f"speed_{seconds}s_{width}x{height}_{fps}fps.mp4")
    if os.path.exists(path):
        return path
    os.makedirs(root, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    def frames():
        for i in range(seconds * fps):
            t = i / fps
            img = np.empty((height, width, 3), np.float32)
            img[..., 0] = 128 + 100 * np.sin(xx / 37 + t)
            img[..., 1] = 128 + 100 * np.sin(yy / 23 - 0.7 * t)
            img[..., 2] = 128 + 100 * np.sin((xx + yy) / 51 + 0.3 * t)
            for b in range(4):
                x0, y0 = int((80 * t + 150 * b) % (width - 60)), int((45 * t * (b + 1)) % (height - 60))
                img[y0:y0 + 60, x0:x0 + 60] = (60 * b, 255 - 60 * b, 40)
            yield img.astype(np.uint8)
    print(f"making {path} ({seconds} s, {width}x{height}, {fps} fps) once")
    write_mp4(path, frames(), fps)
    return path


def plain_pyav(path, fps, threads=False):
    """The plain way: decode every frame, convert each to RGB, keep the first frame at or after each 1/fps tick."""
    kept, next_t = [], 0.0
    with av.open(path) as container:
        stream = container.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            img = frame.to_ndarray(format="rgb24")
            if frame.time is not None and frame.time + 1e-9 >= next_t:
                kept.append(img)
                next_t += 1.0 / fps
    return np.stack(kept)


def ffmpeg_cli(path, fps):
    w, h = 640, 360
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-vf", f"fps={fps}", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "pipe:"], check=True, capture_output=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, h, w, 3)


def bench_decode(root, fps=2.0):
    path = long_video(root)
    cpu = torch.device("cpu")
    ways = {"sampling.sample_fps": lambda: sample_fps(path, fps, 4, 10**6)[0],
            "plain PyAV loop": lambda: plain_pyav(path, fps),
            "plain PyAV loop, threaded decoder": lambda: plain_pyav(path, fps, threads=True)}
    if shutil.which("ffmpeg"):
        ways["ffmpeg command line"] = lambda: ffmpeg_cli(path, fps)
    rows = []
    for name, fn in ways.items():
        n = len(fn())
        t = timed(fn, cpu, warmup=1, reps=3)
        rows.append({"way": name, "frames": n, "seconds": t, "frames_per_s": n / t})
    base = next(r["seconds"] for r in rows if r["way"] == "plain PyAV loop")
    for r in rows:
        r["speedup_vs_plain"] = base / r["seconds"]
    return rows


# ---------------------------------------------------------------------------------------------------------------


def table(rows):
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv):
    opts = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    only = opts.pop("only", "attention,step,decode").split(",")
    out = opts.pop("json", "")
    cfg = config_from_args([f"--{k}={v}" for k, v in opts.items()])
    env = setup(cfg)
    device = env["device"]
    dtype = torch.bfloat16 if env["bf16"] else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result = {"device": name, "preset": cfg.preset, "dtype": str(dtype), "torch": torch.__version__}
    print(f"device {name}, preset {cfg.preset}, {dtype}, torch {torch.__version__}")
    if "attention" in only:
        result["attention"] = bench_attention(cfg, device, dtype)
        print("\nattention, forward + backward\n" + table(result["attention"]))
    if "step" in only:
        result["step"] = bench_step(cfg, device, env)
        print("\ntraining step (sft shapes, all weights learning)\n" + table(result["step"]))
    if "decode" in only:
        result["decode"] = bench_decode(os.path.join(cfg.data_dir, "speed"))
        print("\ndecoding the frames at 2 fps of a 2-minute 640x360 video\n" + table(result["decode"]))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
