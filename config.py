"""
The run's configuration: every field of a run with its default, the presets, and the command line that sets them
(`python train.py --key=value`; DESIGN.md, the CLI contract). Apollo paper §5 and Appendix C for the stages and their
schedules; the other fields name the paper's design choices (§4), each a knob `sweep.py` turns. Also the run's
environment (device, bf16, compile, torchrun processes) and its checkpoints, each refused by a run of another config.

    from config import config_from_args
    cfg = config_from_args(["--preset=cpu", "--sft_steps=600"])   # a Config; unknown keys name the close matches
"""
import ctypes
import dataclasses
import difflib
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from apollo import ADDED_KEYS, VISIONS, config_from_flat
from data import cpu_count
from integrate import INTEGRATIONS
from resampler import RESAMPLERS, TOKEN_NORMS

STAGES = ["lm", "align", "vision", "sft"]
SCHEDULES = {3: STAGES, 2: ["lm", "align", "sft"], 1: ["lm", "sft"]}


def stage_steps(cfg, stage):
    """A stage's steps: a shorter schedule gives the steps of the stages it drops to the stage that takes their
    place, so that every schedule trains for as many steps."""
    steps = getattr(cfg, f"{stage}_steps") + (cfg.copy_steps if stage == "lm" else 0)
    if stage == "align" and cfg.schedule == 2:
        steps += cfg.vision_steps
    if stage == "sft" and cfg.schedule == 1:
        steps += cfg.align_steps + cfg.vision_steps
    return steps


@dataclass
class Config:
    preset: str = ""            # smoke | cpu | gpu; empty: gpu on CUDA, cpu elsewhere
    out_dir: str = "out"        # where the run writes config, metrics, checkpoints, eval.json
    data_dir: str = "data"      # where generated worlds are cached
    data: str = ""              # a folder of your own: videos + train.jsonl and test.jsonl (either format) instead
    device: str = "auto"        # auto | cpu | cuda | mps
    stage: str = "all"          # all, or one of lm, align, vision, sft
    resume: bool = False        # continue an interrupted stage from its last checkpoint
    seed: int = 0
    # the world (scene.py, questions.py, data.py)
    n_train: int = 600          # videos per split, each with a caption
    n_val: int = 60
    n_test: int = 120
    questions_per_video: int = 5  # val and test: the benchmark's questions per video
    train_questions: int = 12   # a training video: up to this many, every question it supports (see questions.py)
    min_seconds: float = 3.0
    max_seconds: float = 20.0
    # sampling (sampling.py)
    sampling: str = "fps"       # fps | uniform
    fps: float = 1.0            # fps sampling: frames per second inside a clip
    frames_per_clip: int = 4
    max_clips: int = 4          # a longer video gets its clips spread out
    num_frames: int = 16        # uniform sampling: frames over the whole video (a multiple of frames_per_clip)
    # the model (encoders.py, resampler.py, integrate.py, apollo.py)
    image_size: int = 64
    patch_size: int = 8
    vit_dim: int = 64
    vit_layers: int = 3
    vit_heads: int = 4
    vision: str = "image+video"  # image | video | image+video: the encoders (both: grids fused, Apollo §4.2)
    motion: bool = True         # the video encoder also gets motion costs (encoders.motion_costs, a correlation layer)
    motion_stream: bool = False  # the motion costs also join the fused grid beside the towers' (Apollo.encode_frames)
    tokens_per_frame: int = 8
    resampler: str = "perceiver"  # perceiver | mlp_pool | conv_pool (Table 1's connector comparison)
    resampler_layers: int = 2
    token_norm: str = "batch"   # batch | rms: the connector's last step; rms lets the video fade (resampler.py)
    lm_dim: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_smear: bool = True       # smeared keys (layers.Attention): an induction head, so a lookup, forms early (README)
    vocab_size: int = 512       # byte-level BPE: 256 bytes + 6 special tokens + learned merges
    integration: str = "timestamp"  # plain | start_end | timestamp | timestamp_start_end
    # training (Apollo: AdamW, clip 1, 3% warm-up, cosine decay)
    batch_size: int = 32
    schedule: int = 3           # Apollo's 3 stages (align, vision, sft); 2: align (with vision's steps), sft;
                                # 1: one sft stage with every step and every caption. The lm stage comes first in all
    eval_sampling: str = ""     # fps | uniform: test with other sampling than training (empty: the same)
    lm_from: str = ""           # a run's out_dir: start from its lm.pt's LM and its tokenizer, skipping stage lm
    encoders_steps: int = 400   # stage encoders (contrastive pretraining of the towers); 0 skips it
    encoders_lr: float = 3e-3
    contrastive_loss: str = "siglip"  # siglip | clip
    video_objective: str = "contrastive"  # contrastive | masked (VideoMAE-style, the self-supervised alternative)
    lm_steps: int = 800         # the cpu preset's steps fit 15 minutes on a 2-core CPU like CI's; 300 steps did
                                # not find the caption's lookups (README, "Facts as keys")
    align_steps: int = 40
    vision_steps: int = 40      # the encoders come pretrained: a short unfreezing
    sft_steps: int = 200
    lm_lr: float = 1e-3
    align_lr: float = 2e-3
    vision_lr: float = 1e-3
    sft_lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.03        # share of a stage's steps spent warming up
    grad_clip: float = 1.0
    drills: int = 20000         # lm stage: short reading drills (questions.reading_drills), in batches of their own
    copy_drills: int = 0        # lm stage: copy drills (questions.copy_drills), the induction that reading is built on
    copy_steps: int = 0         # lm stage: its first steps take copy drills only, before lm_steps of the whole mix
    copy_lr: float = 1e-3       # their constant rate (README "The copy warm-up": 10000, 800, 1e-3 and --lm_lr=1e-3)
    drill_share: float = 0.8    # share of lm steps that take a batch of drills (they are ~10x cheaper)
    lm_scenes: int = 5000       # lm stage: scenes scripted but never rendered, read as caption + questions (text)
    sft_caption_share: float = 0.3  # share of the training captions that sft keeps beside the questions
    text_share: float = 0.15    # share of text-only samples in sft (Apollo: some text is essential)
    sft_drill_share: float = 0.0  # share of reading drills (and copies, by copy_drills) in sft, lest it unlearn them
    sft_lm: bool = True         # sft trains the LM too (Apollo); false: the connector only, the LM as stage lm left it
    length_buckets: int = 8     # sft: its samples cut into this many pools of like length, a batch from one (1: off)
    grad_accum: int = 1         # micro-batches per step (each process takes batch_size / processes / grad_accum)
    workers: int = -1           # DataLoader worker processes; -1: 0 on CPU, min(12, cores) on CUDA
    max_bad_share: float = 0.05  # videos that cannot be sampled are skipped with a warning, up to this share
    eval_batch_size: int = 64
    log_every: int = 10
    ckpt_every: int = 100
    ckpt_minutes: float = 0.0   # also write <stage>_last.pt once this many minutes pass since the last (0: off)
    max_minutes: float = 0.0    # the run's time budget (0: none): once spent, the stage in progress stops (saving
                                # <stage>_last.pt, which --resume continues), the rest are skipped, the test is scored
    compile: str = "auto"       # auto (on for CUDA only) | true | false
    dtype: str = "auto"         # auto (bf16 on CUDA if supported) | float32 | bfloat16


PRESETS = {
    "smoke": dict(n_train=24, n_val=4, n_test=8, max_seconds=6.0, vit_dim=32, vit_layers=1, lm_dim=32,
                  lm_layers=1, tokens_per_frame=2, resampler_layers=1, vocab_size=300, batch_size=8,
                  encoders_steps=2, lm_steps=3, drills=64, lm_scenes=16, align_steps=2, vision_steps=2, sft_steps=3,
                  max_clips=2, log_every=1, ckpt_every=2),
    "cpu": dict(max_seconds=12.0),
    "study": dict(n_train=300, n_val=40, n_test=80, max_seconds=12.0, batch_size=16, lm_steps=1600, align_steps=40,
                  vision_steps=40, sft_steps=300, encoders_steps=300),  # sweep.py: a run in ~4 min on 2 CPU cores;
    # lm: the default's samples (800 batches of 32), which find the caption's lookups (800 of 16 did not: README);
    # sft: where the LM learns to read the video (the frozen LM of align and vision does not: README, "Align's prompt")
    "gpu": dict(n_train=2500, n_val=200, n_test=300, max_seconds=12.0, fps=2.0, image_size=64, vit_dim=192,
                vit_layers=6, vit_heads=6, resampler_layers=3, lm_dim=512, lm_layers=8, lm_heads=8, vocab_size=1024,
                batch_size=64, encoders_steps=600, lm_steps=3000, align_steps=200, vision_steps=200, sft_steps=600,
                lm_lr=1e-3, align_lr=1e-3, vision_lr=3e-4, sft_lr=3e-4, encoders_lr=1e-3, ckpt_every=200,
                ckpt_minutes=2.0),  # sized to finish within one 10-minute call on an H200 (README, "On a GPU")
}


# ---------------------------------------------------------------------------------------------------------------
# Config from the command line: --key=value for any field; no exec, and booleans parsed as words


class ConfigError(ValueError):
    pass



def parse_value(name, text, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}: expected true or false, got {text!r}")
    try:
        return type(default)(text)
    except ValueError:
        raise ConfigError(f"--{name}: expected {type(default).__name__}, got {text!r}") from None


def config_from_args(argv):
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    given = {}
    for arg in argv:
        key, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not key:
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            raise ConfigError(f"unknown config key --{key}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        given[key] = parse_value(key, text, fields[key]) if eq else parse_value(key, "true", fields[key])
    preset = given.get("preset") or ("gpu" if pick_device(given.get("device", "auto")).type == "cuda" else "cpu")
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {list(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], **given, "preset": preset})
    check_config(cfg)
    return cfg


def check_config(cfg):
    if cfg.stage not in ["all", "encoders"] + STAGES:
        raise ConfigError(f"--stage: {cfg.stage!r} is not one of {['all', 'encoders'] + STAGES}")
    if cfg.sampling not in ("fps", "uniform") or cfg.eval_sampling not in ("", "fps", "uniform"):
        raise ConfigError(f"--sampling / --eval_sampling: {cfg.sampling!r} / {cfg.eval_sampling!r}: use fps or uniform")
    if cfg.schedule not in (1, 2, 3):
        raise ConfigError(f"--schedule={cfg.schedule}: Apollo compares 1, 2 and 3 stages")
    if cfg.integration not in INTEGRATIONS:
        raise ConfigError(f"--integration: {cfg.integration!r} is not one of {INTEGRATIONS}")
    if cfg.sampling == "uniform" and cfg.num_frames % cfg.frames_per_clip:
        raise ConfigError(f"--num_frames={cfg.num_frames} must be a multiple of frames_per_clip={cfg.frames_per_clip}")
    if cfg.resampler not in RESAMPLERS:
        raise ConfigError(f"--resampler: {cfg.resampler!r} is not one of {RESAMPLERS}")
    if cfg.token_norm not in TOKEN_NORMS:
        raise ConfigError(f"--token_norm: {cfg.token_norm!r} is not one of {TOKEN_NORMS}")
    if cfg.contrastive_loss not in ("siglip", "clip") or cfg.video_objective not in ("contrastive", "masked"):
        raise ConfigError("--contrastive_loss must be siglip|clip and --video_objective contrastive|masked")
    if cfg.vision not in VISIONS:
        raise ConfigError(f"--vision: {cfg.vision!r} is not one of {VISIONS}")
    if "video" in cfg.vision and cfg.frames_per_clip % 2:
        raise ConfigError(f"--frames_per_clip={cfg.frames_per_clip} must be even for the video encoder (tubelets of 2)")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"--image_size={cfg.image_size} must be a multiple of --patch_size={cfg.patch_size}")
    if cfg.copy_steps and not cfg.copy_drills:
        raise ConfigError(f"--copy_steps={cfg.copy_steps} needs copy drills to take: --copy_drills is 0")
    if cfg.compile not in ("auto", "true", "false") or cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError("--compile must be auto|true|false and --dtype auto|float32|bfloat16")


def model_config(cfg, vocab_size):
    return config_from_flat(asdict(cfg), vocab_size)



def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# The run's environment: the device, bf16 and compile choices, the processes of a torchrun


def keep_freed_memory():
    """Let glibc keep freed memory in the process. By default it hands every freed block of more than a few MiB
    (most activations here) back to the OS, and the next step faults the same pages in again, zeroed by the kernel:
    on a 2-core CPU the eager sft step ran 1.5x faster kept (README, Speed; PyTorch's CPU tuning guide suggests
    jemalloc or tcmalloc for the same reason). Linux with glibc only; elsewhere nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    big = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # older glibc: 32 MiB
    return bool(big and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def fixed_blas_threads():
    """Make MKL's matmuls (torch's CPU BLAS on x86) give the same bits from one run to the next. By default MKL may
    change how many threads a matmul uses from one call to the next (MKL_DYNAMIC), and a matmul split another way
    rounds its sums another way: two runs of one config part in the last bits, and training grows that into other
    weights (README, "Speed"). Intel's conditions for repeatable results (oneMKL developer guide, "Reproducibility
    Conditions") are met here: dynamic threading off, and strict CNR (MKL_CBWR=AUTO,STRICT), under which a matmul
    gives the same bits at any thread count. MKL reads MKL_CBWR when it first runs: setup calls this before the model
    is built. No MKL in this torch (ARM, macOS): nothing to set, False."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # (a user's own setting stands)
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        lib.MKL_Set_Dynamic(0)
        return lib.mkl_serv_get_dynamic() == 0
    except (OSError, AttributeError):  # no such library, or no MKL in it
        return False


def setup(cfg):
    """The device, bf16 and compile choices, and the processes of a torchrun (RANK and WORLD_SIZE in the environment;
    one process otherwise): env, handed to everything that trains."""
    keep_freed_memory()
    fixed_blas_threads()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg.device)
    if device.type == "cuda":  # TF32 for the fp32 matmuls autocast leaves; without it Inductor skips fusing attention
        torch.set_float32_matmul_precision("high")  # into Flash (its warning in the H200 run's log)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(f"--batch_size={cfg.batch_size} must divide into {world} processes x --grad_accum="
                          f"{cfg.grad_accum} micro-batches")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"
                                          and torch.cuda.is_bf16_supported())
    workers = cfg.workers if cfg.workers >= 0 else (min(12, cpu_count()) if device.type == "cuda" else 0)
    env = {"device": device, "bf16": use_bf16, "rank": rank, "world": world, "main": rank == 0, "workers": workers,
           "autocast": lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16),
           "log": print if rank == 0 else (lambda *a, **k: None)}
    env["compile"] = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    env["deadline"] = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else None  # --max_minutes
    env["stopped"] = None  # where the time budget stopped the run, if it did
    return env


def barrier(env):
    if env["world"] > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: plain state dicts (no compile prefix), refused when they come from another model config


def save_checkpoint(path, model, opt, stage, step, cfg):
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "stage": stage, "step": step,
                "config": asdict(cfg)}, tmp)
    os.replace(tmp, path)


# the config keys a checkpoint must share with the run that loads it; the rest (steps, rates, paths) may differ
MODEL_KEYS = ["vision", "motion", "motion_stream", "image_size", "patch_size", "vit_dim", "vit_layers", "vit_heads",
              "tokens_per_frame", "resampler", "resampler_layers", "token_norm", "lm_dim", "lm_layers", "lm_heads",
              "lm_smear", "vocab_size", "frames_per_clip"]
# encoders.pt holds the towers and their text tower only: a run with another connector or LM may start from it
ENCODER_KEYS = ["vision", "motion", "image_size", "patch_size", "vit_dim", "vit_layers", "vit_heads", "vocab_size",
                "frames_per_clip", "contrastive_loss", "video_objective"]
LM_KEYS = ["lm_dim", "lm_layers", "lm_heads", "lm_smear", "vocab_size"]  # lm.pt, for --lm_from


def load_checkpoint(path, cfg, keys=MODEL_KEYS):
    """A checkpoint, refused by name when one of keys differs from cfg's (an old run lacks a key added since:
    apollo.ADDED_KEYS gives what it trained with)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = {**ADDED_KEYS, **ckpt["config"]}
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in keys if saved.get(k) != getattr(cfg, k)}
    if diff:
        raise ConfigError(f"{path} was trained with another model config: " +
                          ", ".join(f"{k}={a} there, {b} here" for k, (a, b) in diff.items()))
    return ckpt
