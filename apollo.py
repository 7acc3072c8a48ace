"""
The Apollo model: video -> encoders -> connector -> resampler -> interleave with text -> decoder LM (§6).

    frames (clips) --ImageEncoder--> (C, T, H, W, Dv) --Projector--> (C, T, H, W, D) --Perceiver--> (C, L, D)
    text ids with <video> placeholders --embed--> (B, S, D); the visual tokens go where the <video> ids are
    (one masked assignment), and the causal decoder LM predicts the next token.

Apollo's LM is Qwen2.5; ours is the same kind of model, small: pre-norm blocks, RoPE, SwiGLU, RMSNorm, tied
input and output embeddings. The loss is on answer tokens only. A multiple-choice question is answered by
the LM's choice among the options: the option whose answer (" blue (B)") it finds most likely after the prompt.
"""
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders import EncoderConfig, ImageEncoder, VideoEncoder, fuse_grids, motion_costs, motion_shifts, preprocess
from integrate import EOS, IGNORE, VIDEO, Tokenizer, build_sample, format_mc, option_answers, video_tokens
from layers import Block, RMSNorm, causal_mask, rope_tables
from resampler import Projector, ResamplerConfig, make_resampler
from sampling import VideoError, sample_clips


@dataclass
class LMConfig:
    vocab_size: int = 512
    dim: int = 128
    n_layer: int = 4
    n_head: int = 4
    smear: bool = False   # smeared keys in every layer (layers.Attention): induction heads form early
    max_seq: int = 1024  # longest sequence RoPE tables are made for


@dataclass
class ApolloConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    frames_per_clip: int = 4
    vision: str = "image"  # image | video | image+video: which encoders see the clip (Apollo: both, fused)
    tubelet: int = 2       # frames per video-encoder tubelet
    motion_stream: bool = False  # the motion costs join the fused grid as a third stream (Apollo.encode_frames)


VISIONS = ["image", "video", "image+video"]
MOTION_SCALE = 5.0  # the motion stream's costs times this: their spread over patches is about 0.2 in our world


class LM(nn.Module):
    """A decoder-only transformer over embeddings: (B, S, D) -> logits (B, S, vocab)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.n_head, cfg.smear) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        cos, sin = rope_tables(cfg.max_seq, cfg.dim // cfg.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        S = x.size(1)
        if S > self.cfg.max_seq:
            raise ValueError(f"sequence of {S} tokens is longer than max_seq={self.cfg.max_seq}")
        mask = causal_mask(S, device=x.device, dtype=x.dtype)
        rope = (self.rope_cos[:S], self.rope_sin[:S])
        for block in self.blocks:
            x = block(x, mask=mask, rope=rope)
        return self.head(self.norm(x))  # (B, S, vocab)


class Apollo(nn.Module):
    def __init__(self, cfg: ApolloConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.vision not in VISIONS:
            raise ValueError(f"vision must be one of {VISIONS}, got {cfg.vision!r}")
        self.image_encoder = ImageEncoder(cfg.encoder) if "image" in cfg.vision else None
        self.video_encoder = VideoEncoder(cfg.encoder, cfg.tubelet) if "video" in cfg.vision else None
        motion_dim = len(motion_shifts(cfg.encoder.patch_size)) if cfg.motion_stream else 0
        self.projector = Projector(cfg.encoder.dim * len(self.encoders()) + motion_dim, cfg.lm.dim)
        self.resampler = make_resampler(cfg.resampler, cfg.lm.dim, cfg.frames_per_clip)
        self.lm = LM(cfg.lm)
        self.apply(init_weights)

    @property
    def tokens_per_clip(self):
        return self.cfg.resampler.tokens_per_frame * self.cfg.frames_per_clip

    def encoders(self):
        return [e for e in (self.image_encoder, self.video_encoder) if e is not None]

    @torch.no_grad()
    def match_visual_scale(self):
        """Start the visual tokens at the scale of the LM's word embeddings. The connector ends in an RMSNorm whose
        gain starts at 1, so each visual token would enter the LM several times larger than the words it has learned
        to read (in the default run, norm sqrt(D) = 11.3 against a median of 1.6); the gain is set to the embeddings'
        RMS instead (TokenBatchNorm's fixed scale, or RMSNorm's learned gain)."""
        norm = self.resampler.norm
        (norm.scale if hasattr(norm, "scale") else norm.weight).fill_(self.lm.embed.weight.pow(2).mean().sqrt().item())

    def encode_frames(self, frames):
        """uint8 frames (C, T, H, W, 3) of C clips -> the encoders' fused feature grid (C, T, h, w, Dv): with both
        encoders, the video encoder's (C, T / tubelet, h, w, D) grid is interpolated to the image encoder's. With
        cfg.motion_stream, the motion costs of each tubelet (encoders.motion_costs, K numbers a patch) are a third
        stream, fused the same way: the two-stream idea (Simonyan & Zisserman 2014, appearance beside optical flow),
        so that the camera's motion reaches the connector whatever the towers make of it."""
        C, T = frames.shape[:2]
        x = preprocess(frames.flatten(0, 1), self.cfg.encoder.image_size)  # (C*T, 3, S, S)
        x = x.view(C, T, *x.shape[1:])  # (C, T, 3, S, S)
        grids = [encoder(x) for encoder in self.encoders()]  # (C, T_i, h, w, D) each
        if self.cfg.motion_stream:  # scaled near the towers' (normed) unit scale
            grids.append(MOTION_SCALE * motion_costs(x, self.cfg.encoder.patch_size, self.cfg.tubelet))
        return fuse_grids(grids)  # (C, T, h, w, Dv)

    def encode_video(self, frames=None, grid=None):
        """frames (C, T, H, W, 3) uint8, or the grid encode_frames made of them (a stage whose encoder is frozen
        computes it once per video) -> visual tokens (C, tokens_per_clip, D)."""
        grid = self.encode_frames(frames) if grid is None else grid
        return self.resampler(self.projector(grid))  # (C, L, D)

    def forward(self, ids, frames=None, labels=None, visual=None, grid=None):
        """ids (B, S) with tokens_per_clip <video> ids per clip, in clip order; frames (C, T, H, W, 3) uint8, or
        their grid (C, T, h, w, Dv), or visual (C*L, D), the tokens encode_video made (decoding reuses them)."""
        x = self.lm.embed(ids)  # (B, S, D)
        if visual is None and grid is not None:
            visual = self.encode_video(grid=grid).flatten(0, 1)  # (C*L, D)
        if visual is None and frames is not None and frames.numel() > 0:
            visual = self.encode_video(frames).flatten(0, 1)  # (C*L, D), in the order the <video> ids appear
        if visual is not None:
            x = x.masked_scatter((ids == VIDEO)[..., None], visual.to(x.dtype))
        logits = self.lm(x)  # (B, S, vocab)
        if labels is None:
            return logits, None
        # position i predicts token i + 1
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
        return logits, loss


@torch.no_grad()
def answer_mc(model, ids, lengths, frames, option_ids):
    """The model's choice on each multiple-choice prompt: the option whose whole answer (" blue (B)", as the
    model was trained to say it) is most likely after the prompt. ids (B, S) right-padded prompts, lengths (B,),
    option_ids[b][k] the ids of option k's answer (integrate.option_answers) -> (B,) 0-based choices.
    Scoring the options, not decoding freely, keeps the model's word among the options: a from-scratch LM
    that says a colour not on the list has still told us which listed colour it finds likeliest."""
    return option_logprobs(model, ids, lengths, frames, option_ids).argmax(-1)


@torch.no_grad()
def option_logprobs(model, ids, lengths, frames, option_ids):
    """log P(answer k | prompt b), summed over the answer's tokens -> (B, K), -inf past an item's options. Each
    prompt is written out once per option and all rows go through the model in one pass; the video is encoded
    once and its tokens given to each of its prompt's rows."""
    visual = model.encode_video(frames).flatten(0, 1) if frames is not None and frames.numel() > 0 else None
    ends = (ids == VIDEO).sum(1).cumsum(0).tolist()  # where each prompt's visual tokens end in visual (C*L, D)
    rows, where, vis = [], [], []  # one row per (prompt b, option k); the answer starts at position lo
    for b, answers in enumerate(option_ids):
        prompt = ids[b, : lengths[b]].tolist()
        for k, answer in enumerate(answers):
            rows.append(prompt + list(answer))
            where.append((b, k, len(prompt)))
            if visual is not None:
                vis.append(visual[(ends[b - 1] if b else 0): ends[b]])
    x = ids.new_zeros(len(rows), max(map(len, rows)))  # (R, S')
    for r, row in enumerate(rows):
        x[r, : len(row)] = torch.tensor(row)
    logp = model(x, visual=torch.cat(vis) if vis else None)[0].float().log_softmax(-1)  # (R, S', vocab)
    scores = torch.full((len(option_ids), max(map(len, option_ids))), float("-inf"), device=ids.device)  # (B, K)
    for r, (b, k, lo) in enumerate(where):
        hi = len(rows[r])  # position i predicts token i + 1: answer tokens lo .. hi - 1 from lo - 1 .. hi - 2
        scores[b, k] = logp[r, torch.arange(lo - 1, hi - 1), x[r, lo:hi]].sum()
    return scores


def effective_rank(x):
    """x (N, F), one row per sample -> exp of the entropy of the shares of variance along x's principal directions:
    1 when the rows differ along a single direction, up to min(N - 1, F) when they spread evenly."""
    x = x.float() - x.float().mean(0)
    energy = torch.linalg.svdvals(x).pow(2)  # (min(N, F),)
    p = energy / energy.sum().clamp_min(1e-30)
    return float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum()))


def video_share(x):
    """x (N, F), one row per video -> the share of x's energy (sum of squares) that differs from video to video: 1
    when the rows have no common part, near 0 when a part common to all of them dwarfs their differences."""
    x = x.float()
    return float((x - x.mean(0)).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def visual_spread(model, clips):
    """How much what the LM receives differs from video to video. clips (N, T, H, W, 3) uint8, one clip of each of N
    videos -> the effective rank, across the videos, of the projected feature grids and of the connector's tokens,
    and the share of the tokens' energy that differs between videos. A connector that has collapsed shows a tokens
    rank near 1 while the grid's is several times higher, or a share near 0 (the tokens one common vector plus a
    sliver): the LM cannot answer from the video what never reaches it."""
    grid = model.projector(model.encode_frames(clips))  # (N, T, h, w, D)
    tokens = model.resampler(grid)  # (N, L, D)
    return {"grid": round(effective_rank(grid.flatten(1)), 2), "tokens": round(effective_rank(tokens.flatten(1)), 2),
            "share": float(f"{video_share(tokens.flatten(1)):.3g}"), "videos": len(clips)}  # (3 significant digits)


@torch.no_grad()
def generate(model, ids, frames=None, max_new=60):
    """Greedy text after a prompt (ids (1, S)) about a video: the ids the model writes, up to <eos>."""
    visual = model.encode_video(frames).flatten(0, 1) if frames is not None else None
    out = []
    for _ in range(max_new):
        logits, _ = model(ids, visual=visual)
        nxt = int(logits[0, -1].argmax())
        if nxt == EOS:
            break
        out.append(nxt)
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return out


# flat config keys added after checkpoints had been written, each with the value a checkpoint without it was trained
# with: an old run still loads, and one that differs is refused by name (config.load_checkpoint)
ADDED_KEYS = {"vision": "image", "resampler": "perceiver", "motion": False, "lm_smear": False, "motion_stream": False,
              "token_norm": "rms"}


def config_from_flat(c, vocab_size):
    """The ApolloConfig of a run's flat config (train.py's Config, or the dict a checkpoint carries)."""
    c = {**ADDED_KEYS, **c}
    return ApolloConfig(
        encoder=EncoderConfig(c["image_size"], c["patch_size"], c["vit_dim"], c["vit_layers"], c["vit_heads"],
                              c["motion"]),
        resampler=ResamplerConfig(c["tokens_per_frame"], c["resampler_layers"], c["lm_heads"], c["resampler"],
                                  c["token_norm"]),
        lm=LMConfig(vocab_size, c["lm_dim"], c["lm_layers"], c["lm_heads"], c["lm_smear"]),
        frames_per_clip=c["frames_per_clip"], vision=c["vision"], motion_stream=c["motion_stream"])


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


# ---------------------------------------------------------------------------------------------------------------
# Asking a trained model about any video


def main(argv):
    """python apollo.py --ckpt=out/sft.pt VIDEO "question" [--options="red,blue,green,white"] [--subject=cross]

    Samples the video as the run was trained to (its config travels in the checkpoint), prints the clips and
    frame times the model looks at, then its choice among the options (--subject: the key its answer restates
    first, as our world's answers do: " cross blue (B)"), or the text it writes without them."""
    opts = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 2 or "ckpt" not in opts:
        sys.exit(main.__doc__)
    video, question = args
    if not os.path.exists(opts["ckpt"]):
        sys.exit(f"error: {opts['ckpt']}: no such checkpoint")
    ckpt = torch.load(opts["ckpt"], map_location="cpu", weights_only=True)
    c = ckpt["config"]
    tok = Tokenizer.load(os.path.join(os.path.dirname(os.path.abspath(opts["ckpt"])), "tokenizer.json"))
    model = Apollo(config_from_flat(c, tok.vocab_size))
    model.load_state_dict(ckpt["model"])
    model.eval()
    try:
        frames, times, clips = sample_clips(video, c["sampling"], c["frames_per_clip"], c["fps"], c["max_clips"],
                                            c["num_frames"])
    except VideoError as e:
        sys.exit(f"error: {e}")
    frames = torch.from_numpy(frames).view(len(clips), c["frames_per_clip"], *frames.shape[1:])  # (C, T, H, W, 3)
    for k, (start, end) in enumerate(clips):
        shown = times[k * c["frames_per_clip"]:(k + 1) * c["frames_per_clip"]]
        print(f"clip {k}: {start:.2f}-{end:.2f} s, frames at " + ", ".join(f"{t:.2f}" for t in shown) + " s")
    ids_of_video = video_tokens(tok, clips, model.tokens_per_clip, c["integration"])
    if "options" in opts:
        options = [o.strip() for o in opts["options"].split(",")]
        ids = build_sample(tok, [(format_mc(question, options), "")], ids_of_video)[0][:-1]
        choice = int(answer_mc(model, torch.tensor([ids]), torch.tensor([len(ids)]), frames,
                               [option_answers(tok, options, opts.get("subject"))])[0])
        print(f"answer: {options[choice]} ({chr(65 + choice)})")
        return options[choice]
    ids = build_sample(tok, [(question.strip() + "\n", "")], ids_of_video)[0][:-1]
    text = tok.decode(generate(model, torch.tensor([ids]), frames))
    print(f"answer: {text}")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
