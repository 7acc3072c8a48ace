"""
What each training stage reads, as token ids, labels and frames: from the world's files (DESIGN.md's formats)
to the samples of the stages of Apollo §5 and Appendix C, and the multiple-choice items evaluation scores.

- `Samples`: a dataset of items (a prompt and an answer, or several, about a video); a video is sampled once
  (sampling.py) at the model's input size and cached as uint8 for every later epoch and stage.
- `collate`, `batches`: batches of one kind each (short drills apart from long conversations), resumable.
- the items: a question's turn (`mc_turn`), a video's questions as one conversation, its caption, the
  caption standing for the video in text-only samples (`described`), and `stage_items`, what each stage
  is fed: lm text (captions after align's prompt), drills and unrendered scripts; align and vision captions; sft
  questions, some captions and some text. `get_tokenizer` learns the run's tokenizer from the same texts.
"""
import functools
import os

import numpy as np
import torch

from data import load_jsonl
from integrate import IGNORE, PAD, Tokenizer, build_sample, format_mc, mc_answer, option_answers, video_tokens
from questions import copy_drills, describe_span, reading_drills, script_texts
from sampling import VideoError, sample_clips
from scene import WorldConfig


class TrainingError(RuntimeError):
    """Training cannot go on (too many videos that cannot be sampled; in train.py a NaN or inf loss): the message
    names what, where, and what was kept."""


def world_config(cfg, **changes):
    """The synthetic world (scene.WorldConfig) a run's config asks for, with changes (bench.py: a fresh pool)."""
    return WorldConfig(**{**dict(seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                                 questions_per_video=cfg.questions_per_video,
                                 train_questions=cfg.train_questions, min_seconds=cfg.min_seconds,
                                 max_seconds=cfg.max_seconds), **changes})


def decode_video(path, cfg):
    """(frames (C, T, S, S, 3) uint8 at the model's input size S, clips [(start, end)]) of the video at path."""
    S = cfg.image_size
    frames, _, clips = sample_clips(path, cfg.sampling, cfg.frames_per_clip, cfg.fps, cfg.max_clips, cfg.num_frames, S)
    return torch.from_numpy(frames).reshape(len(clips), cfg.frames_per_clip, S, S, 3), clips


def decode_named(path, cfg):
    """(path, its frames and clips), or (path, the VideoError) for a video that cannot be sampled."""
    try:
        return path, decode_video(path, cfg)
    except VideoError as e:
        return path, e


class Samples(torch.utils.data.Dataset):
    """items: dicts with 'turns' [(prompt, answer)] and optionally 'video' (a path). A video is sampled once: its uint8
    frames, at the model's input size, are kept in `cache` (shared by the stages of a run), so later epochs and
    stages decode nothing."""

    def __init__(self, items, tok, cfg, tokens_per_clip, cache=None):
        self.items, self.tok, self.cfg, self.tokens_per_clip = items, tok, cfg, tokens_per_clip
        self.frames = {} if cache is None else cache
        self.captions = {}  # stage encoders: (video, clip) -> the ids of its clip and frame captions

    def clips_of(self, path):
        if path not in self.frames:
            self.frames[path] = decode_named(path, self.cfg)[1]
        if isinstance(self.frames[path], VideoError):
            raise self.frames[path]
        return self.frames[path]

    def warm(self, workers, max_bad_share=1.0, log=print):
        """Decode every video the items name that the cache lacks (in worker processes when workers > 0, so that
        DataLoader workers forked after this start with the whole cache); drop the items whose video cannot be
        sampled, with a warning, and return how many videos that was. More than max_bad_share of them bad:
        TrainingError, naming the first."""
        paths = sorted({it["video"] for it in self.items if it.get("video")})
        todo = [p for p in paths if p not in self.frames]
        if workers > 0 and len(todo) > 1:
            self.frames.update(torch.utils.data.DataLoader(todo, batch_size=None, num_workers=workers,
                                                           collate_fn=functools.partial(decode_named, cfg=self.cfg)))
        for p in todo:
            if p not in self.frames:
                self.frames[p] = decode_named(p, self.cfg)[1]
        bad = [p for p in paths if isinstance(self.frames[p], VideoError)]
        if bad:
            share = len(bad) / len(paths)
            if share > max_bad_share:
                raise TrainingError(f"{len(bad)} of {len(paths)} videos cannot be sampled ({share:.0%}, more than "
                                    f"--max_bad_share={max_bad_share}); the first: {self.frames[bad[0]]}")
            for p in bad:
                log(f"warning: skipping the samples of {self.frames[p]}")
            bad = set(bad)
            self.items = [it for it in self.items if it.get("video") not in bad]
        return len(bad)

    def __len__(self):
        return len(self.items)

    def size(self, i):
        """About how many tokens item i takes: its text (~3 characters a token) and its video's visual tokens and
        timestamps (after warm, the clip count is known); by_length batches like sizes together."""
        item = self.items[i]
        text = sum(len(prompt) + len(answer) for prompt, answer in item.get("turns", [])) // 3
        video = self.frames.get(item.get("video"))
        per_clip = self.tokens_per_clip + 8  # its visual tokens and about 8 of "clip from MM:SS-MM:SS:"
        return text + (len(video[1]) * per_clip if isinstance(video, tuple) else 0)

    def __getitem__(self, i):
        item = self.items[i]
        if "scene" in item:  # stage encoders: one clip, its caption, and its first frame's caption
            frames, clips = self.clips_of(item["video"])
            k = item["clip"] % len(clips)
            if (item["video"], k) not in self.captions:  # written from the script once (its physics is slow)
                (t0, t1), scene = clips[k], item["scene"]
                texts = (describe_span(scene, t0, t1), describe_span(scene, t0, t0)) if scene else \
                    (item["caption"], item["caption"])  # a user's video: its caption stands for every clip
                self.captions[item["video"], k] = tuple(self.tok.encode(x) for x in texts)
            clip_ids, frame_ids = self.captions[item["video"], k]
            return {"pixels": frames[k], "clip_ids": clip_ids, "frame_ids": frame_ids}
        frames, video = None, None
        if item.get("video"):
            frames, clips = self.clips_of(item["video"])
            video = video_tokens(self.tok, clips, self.tokens_per_clip, self.cfg.integration)
        option_ids = None
        if item.get("eval"):  # scoring: the prompt, and each option's answer for the model to weigh
            ids, labels = build_sample(self.tok, [(item["turns"][0][0], "")], video)[0][:-1], None
            option_ids = option_answers(self.tok, item["options"], item.get("subject"))
        else:
            ids, labels = build_sample(self.tok, item["turns"], video)
        return {"ids": ids, "labels": labels, "frames": frames, "video": item.get("video"), "option_ids": option_ids}


def pad(seqs, fill=PAD):
    """Lists of ids -> (B, longest) long tensor, right-padded with fill."""
    out = torch.full((len(seqs), max(map(len, seqs))), fill, dtype=torch.long)
    for r, s in enumerate(seqs):
        out[r, : len(s)] = torch.tensor(s)
    return out


def collate(batch):
    if "pixels" in batch[0]:
        return {"pixels": torch.stack([b["pixels"] for b in batch]), "clip_ids": pad([b["clip_ids"] for b in batch]),
                "frame_ids": pad([b["frame_ids"] for b in batch])}
    ids = pad([b["ids"] for b in batch])
    labels = pad([b["labels"] if b["labels"] is not None else [IGNORE] * len(b["ids"]) for b in batch], IGNORE)
    frames = [b["frames"] for b in batch if b["frames"] is not None]
    return {"ids": ids, "labels": labels, "frames": torch.cat(frames) if frames else None,
            "videos": [(b["video"], len(b["frames"])) for b in batch if b["frames"] is not None],
            "lengths": torch.tensor([len(b["ids"]) for b in batch]), "option_ids": [b["option_ids"] for b in batch]}


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def batches(pools, batch_size, seed, start_step, shares, first=(0, 0)):
    """Index lists for steps start_step, start_step + 1, ...: each step takes its batch from one pool (pool k with
    probability shares[k], drawn from the step's own seed; the first first[1] steps from pool first[0]), walking
    that pool's fresh permutation each epoch; so a batch holds samples of one kind (short drills are not padded to
    long conversations), and a resumed stage sees exactly the batches the interrupted one would have."""
    def epoch_order(k, n):
        return functools.lru_cache(maxsize=2)(lambda e: np.random.default_rng([seed, k, e]).permutation(n))
    orders = [epoch_order(k, len(p)) for k, p in enumerate(pools)]
    pos, step = [0] * len(pools), 0
    while True:
        k = first[0] if step < first[1] else int(np.random.default_rng([seed, 1 << 20, step]).choice(
            len(pools), p=shares))
        if step >= start_step:
            n = len(pools[k])
            yield [pools[k][int(orders[k](p // n)[p % n])] for p in range(pos[k], pos[k] + batch_size)]
        pos[k], step = pos[k] + batch_size, step + 1


def by_length(pools, shares, sizes, batch_size, buckets):
    """Each pool cut into up to `buckets` pools of items of like size (sizes[i], about their tokens; each part a
    batch at least), its share split among the parts by how many items each holds, so that every item is drawn
    as often as before: a batch then pads its sequences to a length near their own, not to the stage's longest."""
    parts, part_shares = [], []
    for pool, share in zip(pools, shares):
        n = max(1, min(buckets, len(pool) // batch_size))
        ranked = sorted(pool, key=lambda i: sizes[i]) if n > 1 else pool
        for part in np.array_split(np.array(ranked, dtype=np.int64), n):
            parts.append([int(i) for i in part])
            part_shares.append(share * len(part) / len(pool))
    return parts, part_shares


def mc_turn(q):
    """A question's (prompt, answer) turn: the options listed, the answer as the model learns to say it (restating
    the question's subject first, where it has one)."""
    return format_mc(q["question"], q["options"]), mc_answer(q["options"], q["answer"], q.get("subject"))


def drill_item(q, kind=""):
    """A reading drill as a text-only sample: its description (a lookup's facts), if any, before the question."""
    return {"kind": kind, "turns": described(q["description"], [mc_turn(q)]) if "description" in q else [mc_turn(q)]}


def described(text, turns):
    """Text only: a description (a caption) stands for the video, before the first turn."""
    return [(f"Description: {text}\n" + turns[0][0], turns[0][1])] + turns[1:]


def mc_item(q, root):
    """One multiple-choice question about its video: what evaluation scores."""
    return {"id": q.get("id"), "video": os.path.join(root, q["video"]), "turns": [mc_turn(q)],
            "options": q["options"], "answer": q["answer"], "n_options": len(q["options"]), "subject": q.get("subject"),
            "category": q.get("category", "unknown"), "shortcut": q.get("shortcut")}


def conversation_items(questions, root, rng, context=None, max_turns=6):
    """The questions about a video as conversations of up to max_turns questions (as in LLaVA-Video's data): one
    encoding of the video serves several answers. With context (video -> caption), the caption replaces the video:
    text only."""
    by_video = {}
    for q in questions:
        by_video.setdefault(q["video"], []).append(mc_turn(q))
    items = []
    for video, turns in by_video.items():
        turns = [turns[i] for i in rng.permutation(len(turns))]
        for part in (turns[k:k + max_turns] for k in range(0, len(turns), max_turns)):
            if context is None:
                items.append({"video": os.path.join(root, video), "turns": part})
            else:
                items.append({"video": None, "turns": described(context[video], part) if video in context else part})
    return items


def described_items(items, world, split="test"):
    """Items with their video's caption, as text, in place of the video (None unless every video has one)."""
    captions = {os.path.join(world, c["video"]): turns_of(c)[0][1] for c in split_rows(world, split)[1] if turns_of(c)}
    if not items or any(it.get("video") not in captions for it in items):
        return None
    return [dict(it, video=None, turns=described(captions[it["video"]], it["turns"])) for it in items]


def split_rows(world, split):
    """A split's multiple-choice questions and its conversations (captions, instructions): from {split}.jsonl,
    which may hold both formats (a user's data), and from captions_{split}.jsonl where there is one (our world)."""
    rows = load_jsonl(f"{world}/{split}.jsonl") if split == "train" or os.path.exists(f"{world}/{split}.jsonl") else []
    extra = f"{world}/captions_{split}.jsonl"
    conversations = [r for r in rows if "conversations" in r] + (load_jsonl(extra) if os.path.exists(extra) else [])
    return [r for r in rows if "conversations" not in r], conversations


def turns_of(c):
    """The (human, gpt) turns of a conversation, the <video> mark taken out of the prompts."""
    turns, human = [], None
    for t in c["conversations"]:
        if t.get("from") in ("human", "user"):
            human = t["value"].replace("<video>", "").strip() + "\n"
        elif human is not None:
            turns.append((human, t["value"]))
            human = None
    return turns


def get_tokenizer(cfg, world):
    """The run's tokenizer (out_dir/tokenizer.json): --lm_from's, or merges learned from the world's training
    captions, questions and answers as the model will read them."""
    path = os.path.join(cfg.out_dir, "tokenizer.json")
    if os.path.exists(path):
        return Tokenizer.load(path)
    if cfg.lm_from:  # the LM we start from reads the tokens of its own tokenizer
        tok = Tokenizer.load(os.path.join(cfg.lm_from, "tokenizer.json"))
        tok.save(path)
        return tok
    questions, conversations = split_rows(world, "train")
    texts = [answer for c in conversations for _, answer in turns_of(c)]
    texts += [format_mc(q["question"], q["options"]) + mc_answer(q["options"], q["answer"], q.get("subject"))
              for q in questions]
    tok = Tokenizer.train(texts, cfg.vocab_size)
    tok.save(path)
    return tok


def caption_item(c, root):
    return {"video": os.path.join(root, c["video"]), "turns": turns_of(c)}


def stage_items(stage, world, cfg, rng):
    """The training samples of a stage: what the paper feeds each stage, in our world (or a user's data)."""
    questions, captions = split_rows(world, "train")
    captions = [c for c in captions if turns_of(c)]
    context = {c["video"]: turns_of(c)[0][1] for c in captions}
    text_qa = conversation_items(questions, world, rng, context)  # text only: the caption stands for the video
    if stage == "lm":  # text: captions, drills, questions on captions. A caption comes after the prompt that align
        # gives it ("Describe the video."), so that align starts from an LM that writes captions there (README)
        drills = [drill_item(q, "drill") for q in reading_drills(rng, cfg.drills)]
        copies = [{"kind": "copy", "turns": [turn]} for turn in copy_drills(rng, cfg.copy_drills)]
        # scenes scripted but never rendered: the caption stands for the video, as in text_qa
        scripted = script_texts(world_config(cfg), cfg.lm_scenes, cfg.seed)
        scripts = conversation_items([dict(q, video=f"script {i}") for i, (_, qs) in enumerate(scripted) for q in qs],
                                     world, rng, context={f"script {i}": text for i, (text, _) in enumerate(scripted)})
        return [{"turns": turns_of(c)} for c in captions] + text_qa + drills + copies + scripts
    if stage in ("align", "vision"):  # captions; a user's data without any: its questions
        return [caption_item(c, world) for c in captions] or conversation_items(questions, world, rng)
    share = 1.0 if cfg.schedule == 1 else cfg.sft_caption_share  # one stage: the captions of all stages
    kept = rng.permutation(len(captions))[: int(round(share * len(captions)))]
    video = conversation_items(questions, world, rng) + [caption_item(captions[i], world) for i in kept]
    n_text = int(len(video) * cfg.text_share / (1 - cfg.text_share))
    text = [text_qa[i] for i in rng.choice(len(text_qa), n_text, replace=n_text > len(text_qa))]
    n_drills = int(len(video) * cfg.sft_drill_share / (1 - cfg.sft_drill_share))  # lm's drills, kept up in sft
    n_copies = int(round(n_drills * cfg.copy_drills / (cfg.drills + cfg.copy_drills))) if n_drills else 0
    drills = [drill_item(q) for q in reading_drills(rng, n_drills - n_copies)]  # one pool with the rest in sft
    return video + text + drills + [{"turns": [turn]} for turn in copy_drills(rng, n_copies)]
