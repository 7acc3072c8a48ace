"""
Train mini-Apollo end to end on the synthetic video world, then score it per ApolloBench category.
Apollo paper §5 and Appendix C (the training stages); DESIGN.md (the contracts).

    python train.py                          # the whole pipeline, preset fitted to the device (cpu or gpu)
    python train.py --preset=smoke           # every stage on a handful of videos, in well under a minute
    python train.py --preset=cpu --sft_steps=600 --out_dir=out/longer   # any config field as --key=value
    python train.py --stage=sft --resume     # one stage; --resume continues it from its last checkpoint
    python train.py --help                   # every field, its default and what it does
    python train.py --data=my_videos         # your own videos and JSONL (see the README) instead of the world
    torchrun --nproc_per_node=4 train.py     # DDP: each process takes its share of every global batch

Stages, in order (a stage whose checkpoint is in out_dir is reused, not re-run):
    encoders  the vision encoders against a text tower on frame- and clip-caption pairs (SigLIP or CLIP loss; or
            masked video for the video encoder); val retrieval -> retrieval.json (--encoders_steps=0 skips it)
    lm      the decoder LM learns the language: captions (after align's prompt), questions and answers, reading drills
    align   connector (projector + Perceiver) only; encoders and LM frozen; video captions   (Apollo stage 1)
    vision  encoders + connector; LM frozen; video captions                                 (Apollo stage 2)
    sft     connector + LM; encoders frozen; multiple choice + captions + text-only mixed     (Apollo stage 3)
(--schedule=2 drops vision, --schedule=1 also align, their steps going to the stage that replaces them.)
Then the test split is scored: eval.json holds overall and per-category accuracy. The headline counts only
questions not marked as shortcuts; eval.json carries the score with shortcuts too.
Each run writes into out_dir: config.json, metrics.jsonl, tokenizer.json, one checkpoint per stage, eval.json,
answers.jsonl (each test question's letter with the video, without it, with the caption).
Every field of a run, the presets and the command line are in config.py.
"""
import contextlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from apollo import Apollo
from config import (ENCODER_KEYS, LM_KEYS, PRESETS, SCHEDULES, STAGES, Config, ConfigError, barrier,
                    config_from_args, load_checkpoint, model_config, save_checkpoint, setup, stage_steps)
from data import DataError, make_world
from encoders import Pretraining
from evaluate import score_test_split, spread_of, spread_text, summary
from integrate import IGNORE, PAD
from samples import (Samples, TrainingError, batches, by_length, collate, get_tokenizer, split_rows, stage_items,
                     to_device, turns_of, world_config)
from sampling import VideoError


def trainable(model, stage, sft_lm=True):
    """Which parts learn in each stage (the rest is frozen); sft_lm=False keeps the LM frozen in sft too."""
    if stage == "encoders":  # model is the Pretraining module: everything in it learns
        return [p.requires_grad_(True) for p in model.parameters()]
    parts = {"lm": [model.lm], "align": [model.projector, model.resampler],
             "vision": [*model.encoders(), model.projector, model.resampler],
             "sft": [model.projector, model.resampler] + ([model.lm] if sft_lm else [])}[stage]
    for p in model.parameters():
        p.requires_grad_(False)
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------------------
# One training loop for every stage, one evaluation routine


def lr_at(step, steps, base, warmup):
    """Linear warm-up, then cosine decay to 10% of base."""
    w = max(1, int(warmup * steps))
    if step < w:
        return base * (step + 1) / w
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


def shard(order, rank, world, grad_accum):
    """This process's micro-batches of each global batch from order: its share (every world-th sample from rank),
    cut into grad_accum pieces. One process with grad_accum 1 takes the global batch whole."""
    for indices in order:
        mine = indices[rank::world]
        for m in range(grad_accum):
            yield mine[m::grad_accum]


def global_sum(x, env):
    """x summed over the processes of a torchrun (x itself in a single process)."""
    x = torch.as_tensor(x, dtype=torch.float32, device=env["device"]).clone()
    if env["world"] > 1:
        dist.all_reduce(x)
    return x


def train_stage(model, stage, dataset, cfg, env):
    steps, base_lr = stage_steps(cfg, stage), getattr(cfg, f"{stage}_lr")
    params = trainable(model, stage, cfg.sft_lm)
    decay = [p for p in params if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=base_lr, betas=(0.9, 0.95), fused=env["device"].type == "cuda")
    start, last_path = 0, os.path.join(cfg.out_dir, f"{stage}_last.pt")
    if os.path.exists(last_path):
        if cfg.resume:
            ckpt = load_checkpoint(last_path, cfg)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            start = ckpt["step"]
            env["log"](f"[{stage}] resuming from step {start}")
        else:
            env["log"](f"[{stage}] {last_path} exists; starting the stage afresh (pass --resume to continue it)")
    saved_step, saved_at = start, time.perf_counter()  # the stage's last checkpoint: its step, and when
    model.train()
    net = model  # under torchrun, DDP averages the gradients of the processes during backward
    if env["world"] > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env["device"].index] if env["device"].type == "cuda" else None,
            find_unused_parameters=stage == "sft")  # in sft a text-only batch leaves the connector unused
    frozen = stage != "encoders" and not any(p.requires_grad for e in model.encoders() for p in e.parameters())
    grids = {}  # the encoders are frozen: each video is encoded once

    def grids_of(videos, frames):
        """The fused grids of a batch's videos [(path, clips)], frames (C, T, H, W, 3) of them all: those not seen
        before encoded together in one call (one at a time, the first epoch of align on a GPU ran at 0.48 s a step)."""
        parts = dict(zip([path for path, _ in videos], frames.split([n for _, n in videos])))
        new = [path for path in parts if path not in grids]
        if new:
            with torch.no_grad(), env["autocast"]():
                fresh = model.encode_frames(torch.cat([parts[path] for path in new]))  # (C', T, h, w, Dv)
            grids.update(zip(new, fresh.split([len(parts[path]) for path in new])))
        return torch.cat([grids[path] for path, _ in videos])  # (C, T, h, w, Dv)
    skipped = dataset.warm(env["workers"], cfg.max_bad_share, env["log"])
    kinds = sorted({it.get("kind", "") for it in dataset.items})  # "copy", "drill" (lm stage) or "" (the rest)
    pools = [[i for i, it in enumerate(dataset.items) if it.get("kind", "") == k] for k in kinds]
    short = sum(len(p) for k, p in zip(kinds, pools) if k)  # drills and copies: drill_share of the steps, by number
    shares = ([len(p) / short * cfg.drill_share if k else 1 - cfg.drill_share for k, p in zip(kinds, pools)]
              if len(kinds) > 1 else [1.0])
    first = (kinds.index("copy"), cfg.copy_steps) if "copy" in kinds else (0, 0)  # lm: the copy warm-up first
    if stage == "sft":  # (in stage lm, whose items differ far more, batches of like length made a worse LM once)
        pools, shares = by_length(pools, shares, [dataset.size(i) for i in range(len(dataset))], cfg.batch_size,
                                  cfg.length_buckets)
    seed = cfg.seed * 1000 + (STAGES.index(stage) if stage in STAGES else len(STAGES))
    order = shard(batches(pools, cfg.batch_size, seed, start, shares, first), env["rank"], env["world"], cfg.grad_accum)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=collate,
                                              num_workers=env["workers"], pin_memory=env["device"].type == "cuda"))
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, dynamic_ncols=True, disable=not env["main"])
    t0, tokens, waited, logged = time.perf_counter(), 0, 0.0, start
    for step in bar:
        t_wait = time.perf_counter()
        micro = [next(loader) for _ in range(cfg.grad_accum)]
        # each micro-batch's loss is a mean over its targets (answer tokens, or pairs); weighting it by its share
        # of all the step's targets, in every process, makes the step's gradient that of the global batch
        # (counted on the CPU, before the move, so that the count costs the GPU no sync)
        counts = [len(b["pixels"]) if stage == "encoders" else int((b["labels"][:, 1:] != IGNORE).sum())
                  for b in micro]
        micro = [to_device(b, env["device"]) for b in micro]
        waited += time.perf_counter() - t_wait
        for g in opt.param_groups:  # lm: the copy warm-up, a 20-step ramp to a constant rate (a decay stalls it)
            g["lr"] = (cfg.copy_lr * min(1.0, (step + 1) / 20) if step < first[1]
                       else lr_at(step - first[1], steps - first[1], base_lr, cfg.warmup))
        total = global_sum(sum(counts), env)
        step_loss = 0.0
        for m, b in enumerate(micro):
            if frozen and b["frames"] is not None:
                b["grid"] = grids_of(b["videos"], b["frames"])
            last = m == len(micro) - 1
            with (contextlib.nullcontext() if last or net is model else net.no_sync()), env["autocast"]():
                if stage == "encoders":
                    loss = net(b["pixels"], b["clip_ids"], b["frame_ids"])
                else:
                    _, loss = net(b["ids"], None if frozen else b["frames"], b["labels"], grid=b.get("grid"))
            if loss.requires_grad:  # (not a text-only batch of sft with the LM frozen: nothing of it learns)
                (loss * (counts[m] * env["world"] / total)).backward()
            step_loss = step_loss + loss.detach().float() * counts[m] / total
        step_loss = global_sum(step_loss, env)
        if not torch.isfinite(step_loss):  # stop before the bad step touches the weights or a checkpoint
            kept = f"{last_path} (step {saved_step})" if saved_step else "no checkpoint of this stage yet"
            raise TrainingError(f"[{stage}] step {step + 1}: the loss is {step_loss.item()}; last good checkpoint: "
                                f"{kept}")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += env["world"] * sum(b["ids"].numel() if "ids" in b else b["clip_ids"].numel() for b in micro)
        if env["main"] and ((step + 1) % cfg.log_every == 0 or step + 1 == steps):
            if env["device"].type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row = {"stage": stage, "step": step + 1, "loss": round(step_loss.item(), 4),
                   "lr": opt.param_groups[0]["lr"], "tokens_per_s": round(tokens / dt),
                   "ms_per_step": round(1000 * dt / (step + 1 - logged), 1),
                   "data_wait": round(waited / dt, 4),  # share of the time spent waiting for batches
                   "skipped_videos": skipped}
            if step + 1 == steps and stage in ("align", "vision", "sft"):  # has the connector collapsed?
                row["visual_spread"] = spread_of(model, dataset, env)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=row["tokens_per_s"], wait=f"{row['data_wait']:.0%}")
            with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            t0, tokens, waited, logged = time.perf_counter(), 0, 0.0, step + 1
        late = cfg.ckpt_minutes > 0 and time.perf_counter() - saved_at > 60 * cfg.ckpt_minutes
        if env["main"] and ((step + 1) % cfg.ckpt_every == 0 or late) and step + 1 < steps:
            save_checkpoint(last_path, model, opt, stage, step + 1, cfg)
            saved_step, saved_at = step + 1, time.perf_counter()
        spent = env["deadline"] is not None and time.perf_counter() > env["deadline"]  # --max_minutes
        if env["deadline"] is not None and env["world"] > 1:  # every process stops at the same step: they vote
            spent = bool(global_sum(spent, env) > 0)
        if spent and step + 1 < steps:
            env["stopped"] = {"stage": stage, "step": step + 1, "steps": steps}
            env["log"](f"[{stage}] --max_minutes={cfg.max_minutes} spent at step {step + 1} of {steps}: the stage "
                       f"stops here ({last_path}; --resume continues it), the stages after it are skipped")
            if env["main"]:
                save_checkpoint(last_path, model, opt, stage, step + 1, cfg)
            barrier(env)
            return
    if env["main"]:
        spread = row.get("visual_spread") if steps > start else None
        if spread:
            env["log"](f"[{stage}] {spread_text(spread)}")
        save_checkpoint(os.path.join(cfg.out_dir, f"{stage}.pt"), model, opt, stage, steps, cfg)
        if os.path.exists(last_path):
            os.remove(last_path)
    barrier(env)


def pretrain_encoders(model, world, tok, cfg, env, cache):
    """Stage encoders: the vision encoders against a text tower (or masked video) on clip- and frame-caption
    pairs from the training videos; then caption <-> clip retrieval on the val split, saved as retrieval.json."""
    module = Pretraining(model.image_encoder, model.video_encoder, tok.vocab_size, PAD, loss=cfg.contrastive_loss,
                         video_objective=cfg.video_objective).to(env["device"])
    done = os.path.join(cfg.out_dir, "encoders.pt")
    if os.path.exists(done) and cfg.stage == "all":
        module.load_state_dict(load_checkpoint(done, cfg, ENCODER_KEYS)["model"])
        env["log"](f"[encoders] reusing {done}")
        return
    scenes = {}  # our world's scripts describe each clip and frame; a user's videos have their captions only
    if os.path.exists(os.path.join(world, "scenes.jsonl")):
        with open(os.path.join(world, "scenes.jsonl")) as f:
            scenes = {s["name"]: s for s in map(json.loads, f)}

    def pairs(split, clips_per_video):
        return [{"video": os.path.join(world, c["video"]), "clip": k,
                 "scene": scenes.get(os.path.splitext(os.path.basename(c["video"]))[0]), "caption": turns_of(c)[0][1]}
                for c in split_rows(world, split)[1] if turns_of(c) for k in range(clips_per_video)]
    train_stage(module, "encoders", Samples(pairs("train", cfg.max_clips), tok, cfg, 0, cache), cfg, env)
    if not env["main"]:
        return None
    val = Samples(pairs("val", 1), tok, cfg, 0, cache)
    val.warm(0, cfg.max_bad_share, env["log"])
    if not val.items:
        env["log"](f"[encoders] no val captions in {world}: no retrieval to measure")
        return None
    batch = to_device(collate([val[i] for i in range(len(val))]), env["device"])
    module.eval()
    result = module.retrieval(batch["pixels"], batch["clip_ids"], batch["frame_ids"])
    result = json.loads(json.dumps(result), parse_float=lambda x: round(float(x), 4))  # 4 decimals throughout
    module.train()
    result["n"], result["chance_r1"] = len(val), round(1 / len(val), 4)
    with open(os.path.join(cfg.out_dir, "retrieval.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"[encoders] val retrieval (n={len(val)}, chance R@1 {1 / len(val):.3f}): {json.dumps(result)}")
    return result


def load_lm(model, cfg):
    """--lm_from: the LM of another run's lm.pt (its vision side may differ: only the LM's weights are taken)."""
    path = os.path.join(cfg.lm_from, "lm.pt")
    if not os.path.exists(path):
        raise ConfigError(f"--lm_from={cfg.lm_from}: no lm.pt there (run its stage lm first)")
    ckpt = load_checkpoint(path, cfg, LM_KEYS)
    model.lm.load_state_dict({k[3:]: v for k, v in ckpt["model"].items() if k.startswith("lm.")})


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + inspect.getsource(Config) + "\npresets: " + json.dumps(PRESETS, indent=1))
        return None
    cfg = config_from_args(argv)
    env = setup(cfg)
    try:
        result = run(cfg, env)
        # under torchrun, process 0 evaluates alone while the rest are done: they wait for it, so that every process
        # leaves the group together (a gloo process leaving while its peer is busy can abort at exit)
        barrier(env)
        return result
    finally:
        if env["world"] > 1:
            dist.destroy_process_group()


def run(cfg, env):
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    world_cfg = world_config(cfg)
    if env["main"]:  # under torchrun, process 0 makes the world, the tokenizer and the files; the rest wait
        os.makedirs(cfg.out_dir, exist_ok=True)
        saved = os.path.join(cfg.out_dir, "config.json")
        if cfg.resume and os.path.exists(saved):  # show what the interrupted run was, and what now differs
            with open(saved) as f:
                before = json.load(f)
            changed = {k: (before.get(k), v) for k, v in asdict(cfg).items() if k != "resume" and before.get(k) != v}
            print(f"resuming the run configured in {saved}: " + ", ".join(f"{k}={v}" for k, v in before.items()))
            if changed:
                print("changed since: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        with open(saved, "w") as f:
            json.dump(asdict(cfg), f, indent=1)
        get_tokenizer(cfg, cfg.data or make_world(world_cfg, cfg.data_dir))
    barrier(env)
    world = cfg.data or make_world(world_cfg, cfg.data_dir)
    tok = get_tokenizer(cfg, world)
    model = Apollo(model_config(cfg, tok.vocab_size)).to(env["device"])
    env["log"](f"device {env['device']}, bf16 {env['bf16']}, compile {env['compile']}, preset {cfg.preset}, "
               f"{env['world']} process(es), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
               f"world {world}")
    if env["compile"]:
        for part in (*model.encoders(), model.resampler, model.lm):
            part.compile()
    cache, schedule = {}, SCHEDULES[cfg.schedule]
    stages = (["encoders"] if cfg.encoders_steps > 0 else []) + schedule if cfg.stage == "all" else [cfg.stage]
    for stage in stages:
        if env["stopped"]:  # --max_minutes spent
            break
        if stage == "encoders":
            retrieval = pretrain_encoders(model, world, tok, cfg, env, cache)
            if cfg.stage == "encoders":
                return retrieval
            continue
        done = os.path.join(cfg.out_dir, f"{stage}.pt")
        if os.path.exists(done) and cfg.stage == "all":
            model.load_state_dict(load_checkpoint(done, cfg)["model"])
            env["log"](f"[{stage}] reusing {done}")
            continue
        if stage == "lm" and cfg.lm_from:
            load_lm(model, cfg)
            continue
        if cfg.stage != "all" and stage in schedule and schedule.index(stage) > 0:
            prev = os.path.join(cfg.out_dir, f"{schedule[schedule.index(stage) - 1]}.pt")
            if os.path.exists(prev):
                model.load_state_dict(load_checkpoint(prev, cfg)["model"])
        if stage == schedule[1]:  # the connector's first stage: its tokens start at the scale of the LM's words
            model.match_visual_scale()
        # each stage draws its data from its own seed: a stage reused or skipped leaves the others' draws alone
        items = stage_items(stage, world, cfg, np.random.default_rng([cfg.seed, STAGES.index(stage)]))
        train_stage(model, stage, Samples(items, tok, cfg, model.tokens_per_clip, cache), cfg, env)
    if not env["main"]:
        return None
    result = score_test_split(model, world, tok, cfg, env)
    result["minutes"] = round((time.perf_counter() - t_start) / 60, 2)
    if env["stopped"]:
        result["stopped_early"] = env["stopped"]  # the run's --max_minutes ended this stage at this step
    with open(os.path.join(cfg.out_dir, "answers.jsonl"), "w") as f:  # each test question's letter, each way
        f.writelines(json.dumps(row) + "\n" for row in result.pop("answers"))
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(summary(result))
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, VideoError, TrainingError) as e:
        sys.exit(f"error: {e}")
