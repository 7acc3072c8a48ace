"""
Vision encoders: what turns frames into feature grids, and how they are pretrained (Apollo paper §4.2).

Apollo pairs SigLIP (an image encoder run on every frame) with InternVideo2 (a video encoder over tubelets).
Neither can be downloaded here, so we train small counterparts from scratch, the way they were trained:
- `ImageEncoder`: a plain ViT (Dosovitskiy et al. 2020): each frame cut into patches, embedded, given a
  learned position, run through the pre-norm blocks of layers.py with full (unmasked) attention.
- `VideoEncoder`: a ViT over tubelets (2 frames x patch x patch, as InternVideo2 and VideoMAE cut video),
  with full space-time attention through the same one attention.
- `TextTower`: the small text encoder that contrastive pretraining pairs them with; `siglip_loss` (sigmoid,
  Zhai et al. 2023) and `clip_loss` (softmax, Radford et al. 2021) compare the towers' embeddings;
  `MaskedVideo` is the self-supervised alternative (mask most tubelets, rebuild their pixels: VideoMAE).
- `fuse_grids`: Apollo's dual-encoder fusion: each tower's grid interpolated to the largest, then
  concatenated along channels.

Every encoder returns a (B, T, H, W, D) grid: B clips, T time steps, an H x W grid of D-dim features.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Block, RMSNorm, padding_mask, rope_tables


@dataclass
class EncoderConfig:
    image_size: int = 64   # frames are resized to image_size x image_size before patching
    patch_size: int = 8    # so the grid is (image_size / patch_size) squared
    dim: int = 64          # width of the encoder
    n_layer: int = 3
    n_head: int = 4
    motion: bool = True    # the video encoder's tubelets also get motion costs (a correlation layer, below)


def preprocess(frames, image_size):
    """uint8 frames (N, H, W, 3) -> float (N, 3, image_size, image_size), roughly zero mean and unit scale."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.25


class ImageEncoder(nn.Module):
    """ViT run on each frame independently, like SigLIP in Apollo: (B, T, 3, S, S) -> (B, T, H, W, D)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.n_head) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim)

    def forward(self, x):
        B, T = x.shape[:2]
        x = self.patch_embed(x.flatten(0, 1))  # (B*T, D, H, W)
        x = x.flatten(2).transpose(1, 2) + self.pos  # (B*T, H*W, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).view(B, T, self.grid, self.grid, -1)  # (B, T, H, W, D)


def motion_shifts(patch_size):
    """The displacements the correlation layer tries, in pixels (dx, dy): none, and half, one and one and a half
    patches along each axis, both ways (13 at patch 8: up to 12 pixels, a pan of 6-12 px/s seen 1 s apart)."""
    steps = [k * patch_size // 2 for k in (1, 2, 3)]
    return [(0, 0)] + [(s * d, 0) for d in steps for s in (1, -1)] + [(0, s * d) for d in steps for s in (1, -1)]


def motion_costs(x, patch_size, tubelet=2, clip=0.4):
    """A correlation layer (FlowNet, Dosovitskiy et al. 2015; for video, Wang et al. 2020, "Video Modeling with
    Correlation Networks"): for each tubelet, how badly its last frame b matches its first frame a moved by each of
    motion_shifts, per patch: mean over the patch of min(|b(p) - a(p + d)|, clip), channels averaged. The clip keeps
    a moving object from outvoting the background; costs are given relative to their mean over the shifts, so a
    patch says which way it moved rather than how much texture it has. A ViT can learn this comparison from pixels,
    but not in the few hundred steps the `encoders` stage has: a linear probe of the first pan from the grid of a run
    without these costs scored no better than the commonest answer, from the costs themselves 0.99 (README, probe.py).
    x (B, T, 3, S, S) preprocessed frames -> (B, T / tubelet, H, W, K) costs, K = len(motion_shifts)."""
    a, b = x[:, 0::tubelet].flatten(0, 1), x[:, tubelet - 1::tubelet].flatten(0, 1)  # (B*T', 3, S, S) each
    shifts, S = motion_shifts(patch_size), x.size(-1)
    m = max(max(abs(dx), abs(dy)) for dx, dy in shifts)
    padded = F.pad(a, (m, m, m, m), mode="replicate")
    costs = torch.stack([(b - padded[..., m + dy:m + dy + S, m + dx:m + dx + S]).abs().mean(1).clamp(max=clip)
                         for dx, dy in shifts], 1)  # (B*T', K, S, S)
    costs = F.avg_pool2d(costs, patch_size) / clip  # (B*T', K, H, W), in [0, 1]
    costs = costs - costs.mean(1, keepdim=True)
    return costs.permute(0, 2, 3, 1).unflatten(0, (x.size(0), -1))  # (B, T', H, W, K)


class VideoEncoder(nn.Module):
    """ViT over tubelets, like InternVideo2: (B, T, 3, S, S) -> (B, T / tubelet, H, W, D). Every tubelet attends
    to every other (space-time attention). Positions: a learned spatial one plus a learned temporal one. With
    cfg.motion, each tubelet's embedding also gets its motion costs (motion_costs), linearly embedded."""

    def __init__(self, cfg: EncoderConfig, tubelet=2, max_time=32):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        self.cfg, self.tubelet = cfg, tubelet
        self.grid = cfg.image_size // cfg.patch_size
        p = cfg.patch_size
        self.patch_embed = nn.Conv3d(3, cfg.dim, kernel_size=(tubelet, p, p), stride=(tubelet, p, p))
        self.pos = nn.Parameter(torch.randn(1, 1, self.grid * self.grid, cfg.dim) * 0.02)
        self.time_pos = nn.Parameter(torch.randn(1, max_time, 1, cfg.dim) * 0.02)
        self.motion_embed = nn.Linear(len(motion_shifts(p)), cfg.dim) if cfg.motion else None
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.n_head) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim)

    def tokens(self, x):
        """(B, T, 3, S, S) -> tubelet tokens with positions (B, T', H*W, D)."""
        if x.size(1) % self.tubelet:
            raise ValueError(f"the video encoder takes clips of a multiple of {self.tubelet} frames, got {x.size(1)}")
        tokens = self.patch_embed(x.transpose(1, 2)).flatten(3).permute(0, 2, 3, 1)  # (B, T', H*W, D)
        if self.motion_embed is not None:
            tokens = tokens + self.motion_embed(motion_costs(x, self.cfg.patch_size, self.tubelet).flatten(2, 3))
        return tokens + self.pos + self.time_pos[:, : tokens.size(1)]

    def encode(self, x):
        """tokens (B, N, D) -> the same tokens after the blocks, normalised."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        B = x.size(0)
        x = self.tokens(x)  # (B, T', H*W, D)
        T = x.size(1)
        return self.encode(x.flatten(1, 2)).view(B, T, self.grid, self.grid, -1)  # (B, T', H, W, D)


def fuse_grids(grids):
    """Apollo's dual-encoder fusion: each (B, T_i, H_i, W_i, D_i) grid interpolated (trilinear) to the largest
    T, H, W, then concatenated along channels -> (B, T, H, W, sum D_i)."""
    T, H, W = (max(g.shape[k] for g in grids) for k in (1, 2, 3))
    out = []
    for g in grids:
        if g.shape[1:4] != (T, H, W):
            g = F.interpolate(g.permute(0, 4, 1, 2, 3), size=(T, H, W), mode="trilinear", align_corners=False)
            g = g.permute(0, 2, 3, 4, 1)  # back to (B, T, H, W, D_i)
        out.append(g)
    return torch.cat(out, dim=-1)  # (B, T, H, W, sum D_i)


# ---------------------------------------------------------------------------------------------------------------
# Contrastive pretraining: a text tower, SigLIP and CLIP losses


class TextTower(nn.Module):
    """A small bidirectional transformer over caption ids: (B, S) ids with padding -> (B, D) mean of its tokens."""

    def __init__(self, vocab_size, dim, n_layer, n_head, pad_id, max_seq=512):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, n_head) for _ in range(n_layer))
        self.norm = RMSNorm(dim)
        cos, sin = rope_tables(max_seq, dim // n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, ids):
        valid = ids != self.pad_id  # (B, S)
        x, S = self.embed(ids), ids.size(1)
        mask = padding_mask(valid, x.dtype)  # (B, 1, 1, S)
        for block in self.blocks:
            x = block(x, mask=mask, rope=(self.rope_cos[:S], self.rope_sin[:S]))
        x = self.norm(x) * valid[..., None]
        return x.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)  # (B, D)


def siglip_loss(a, b, t_prime, bias):
    """SigLIP: every (a_i, b_j) pair is its own binary question, "do these match?". a, b (n, D) L2-normalised;
    t_prime, bias scalars (initialised at log 10 and -10, as in the SigLIP paper).
    -1/n sum_i sum_j log sigmoid(z_ij (exp(t') a_i.b_j + bias)), z_ij = 1 on the diagonal, -1 elsewhere."""
    logits = a @ b.t() * t_prime.exp() + bias  # (n, n)
    z = 2 * torch.eye(len(a), device=a.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / len(a)


def clip_loss(a, b, log_scale):
    """CLIP: softmax cross-entropy over the batch, both ways (a -> b and b -> a), averaged. a, b (n, D)
    L2-normalised; log_scale the learnable log temperature (initialised at log(1 / 0.07), as in CLIP)."""
    logits = a @ b.t() * log_scale.exp()  # (n, n)
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class Contrastive(nn.Module):
    """A vision tower and the text tower, each pooled and projected into one embedding space, and the loss's
    learnable temperature (and, for SigLIP, bias)."""

    def __init__(self, vision, text, vision_dim, text_dim, embed_dim=64, loss="siglip"):
        super().__init__()
        if loss not in ("siglip", "clip"):
            raise ValueError(f"contrastive loss must be siglip or clip, got {loss!r}")
        self.vision, self.text, self.loss_kind = vision, text, loss
        self.vision_head = nn.Linear(vision_dim, embed_dim, bias=False)
        self.text_head = nn.Linear(text_dim, embed_dim, bias=False)
        self.t_prime = nn.Parameter(torch.tensor(math.log(10.0 if loss == "siglip" else 1 / 0.07)))
        self.bias = nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None

    def embed(self, pixels, ids):
        """pixels (B, T, 3, S, S), caption ids (B, S) -> L2-normalised embeddings (B, E), (B, E)."""
        v = self.vision_head(self.vision(pixels).mean(dim=(1, 2, 3)))  # mean over the (T, H, W) grid
        t = self.text_head(self.text(ids))
        return F.normalize(v, dim=-1), F.normalize(t, dim=-1)

    def forward(self, pixels, ids):
        v, t = self.embed(pixels, ids)
        if self.loss_kind == "siglip":
            return siglip_loss(v, t, self.t_prime, self.bias)
        return clip_loss(v, t, self.t_prime)


def recall_at(sim, ks=(1, 5)):
    """Retrieval from a (n queries, n items) similarity matrix whose right answer is the diagonal:
    {k: share of queries whose right item ranks in the top k}."""
    rank = (sim > sim.diagonal()[:, None]).sum(1)  # (n,): how many items beat the right one
    return {k: float((rank < k).float().mean()) for k in ks}


# ---------------------------------------------------------------------------------------------------------------
# The self-supervised alternative: masked video modelling (VideoMAE, Tong et al. 2022)


class MaskedVideo(nn.Module):
    """Hide mask_ratio of the tubelets; the encoder sees the rest; a small decoder, given mask tokens at the hidden
    places, rebuilds their pixels (each tubelet normalised to zero mean, unit variance, as VideoMAE does)."""

    def __init__(self, encoder: VideoEncoder, mask_ratio=0.75, decoder_dim=64, decoder_layers=1):
        super().__init__()
        self.encoder, self.mask_ratio = encoder, mask_ratio
        cfg = encoder.cfg
        self.n_space = encoder.grid * encoder.grid
        self.to_decoder = nn.Linear(cfg.dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, 1024, decoder_dim) * 0.02)
        self.decoder = nn.ModuleList(Block(decoder_dim, 4) for _ in range(decoder_layers))
        self.norm = RMSNorm(decoder_dim)
        self.to_pixels = nn.Linear(decoder_dim, encoder.tubelet * cfg.patch_size ** 2 * 3)

    def targets(self, x):
        """(B, T, 3, S, S) -> per-tubelet normalised pixels (B, N, tubelet * p * p * 3), in token order."""
        B, T, C, S, _ = x.shape
        p, t, g = self.encoder.cfg.patch_size, self.encoder.tubelet, self.encoder.grid
        x = x.view(B, T // t, t, C, g, p, g, p).permute(0, 1, 4, 6, 2, 5, 7, 3)  # (B, T', gh, gw, t, p, p, C)
        x = x.reshape(B, (T // t) * g * g, -1)
        return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()

    def forward(self, x, generator=None):
        tokens = self.encoder.tokens(x).flatten(1, 2)  # (B, N, D)
        B, N, D = tokens.shape
        n_keep = max(1, int(round(N * (1 - self.mask_ratio))))
        order = torch.rand(B, N, generator=generator, device=x.device).argsort(1)  # a random mask per clip
        keep, hide = order[:, :n_keep], order[:, n_keep:]
        seen = self.encoder.encode(tokens.gather(1, keep[..., None].expand(-1, -1, D)))  # (B, n_keep, D)
        y = self.mask_token.expand(B, N, -1).clone()
        y = y.scatter(1, keep[..., None].expand(-1, -1, y.size(-1)), self.to_decoder(seen))
        y = y + self.decoder_pos[:, :N]
        for block in self.decoder:
            y = block(y)
        pred = self.to_pixels(self.norm(y))  # (B, N, tubelet * p * p * 3)
        target = self.targets(x)
        idx = hide[..., None].expand(-1, -1, pred.size(-1))
        return F.mse_loss(pred.gather(1, idx), target.gather(1, idx))


# ---------------------------------------------------------------------------------------------------------------
# Stage `encoders`: the towers together


class Pretraining(nn.Module):
    """Each vision encoder pretrained before it meets the LM, as SigLIP and InternVideo2 were: the image encoder
    on (frame, caption) pairs, the video encoder on (clip, caption) pairs, both against one small text tower
    (loss: "siglip" or "clip"); or the video encoder alone by masked modelling (video_objective="masked")."""

    def __init__(self, image_encoder, video_encoder, vocab_size, pad_id, dim=64, n_layer=2, loss="siglip",
                 video_objective="contrastive"):
        super().__init__()
        if video_objective not in ("contrastive", "masked"):
            raise ValueError(f"video_objective must be contrastive or masked, got {video_objective!r}")
        self.image_size = (image_encoder or video_encoder).cfg.image_size
        self.text = TextTower(vocab_size, dim, n_layer, 4, pad_id)
        self.image = Contrastive(image_encoder, self.text, image_encoder.cfg.dim, dim, dim, loss) \
            if image_encoder is not None else None
        self.video = None
        if video_encoder is not None:
            self.video = Contrastive(video_encoder, self.text, video_encoder.cfg.dim, dim, dim, loss) \
                if video_objective == "contrastive" else MaskedVideo(video_encoder)

    def pixels(self, clips):
        """uint8 clips (B, T, H, W, 3) -> (B, T, 3, S, S), as the encoders take them."""
        size = self.image_size
        return preprocess(clips.flatten(0, 1), size).view(*clips.shape[:2], 3, size, size)

    def forward(self, clips, clip_ids, frame_ids):
        """clips (B, T, H, W, 3) uint8; clip_ids (B, S1) captions of the clips; frame_ids (B, S2) captions of
        their first frames -> the summed loss of the towers."""
        clips = self.pixels(clips)
        loss = 0.0
        if self.image is not None:
            loss = loss + self.image(clips[:, :1], frame_ids)
        if isinstance(self.video, Contrastive):
            loss = loss + self.video(clips, clip_ids)
        elif self.video is not None:
            loss = loss + self.video(clips)
        return loss

    @torch.no_grad()
    def retrieval(self, clips, clip_ids, frame_ids, ks=(1, 5)):
        """R@k of caption -> visual and visual -> caption, per contrastive tower, over the given pairs."""
        out, clips = {}, self.pixels(clips)
        pairs = (("image", self.image, frame_ids, clips[:, :1]), ("video", self.video, clip_ids, clips))
        for name, tower, ids, x in pairs:
            if isinstance(tower, Contrastive):
                v, t = tower.embed(x, ids)
                sim = v @ t.t()  # (n visual, n captions)
                out[name] = {"caption_to_visual": recall_at(sim.t(), ks), "visual_to_caption": recall_at(sim, ks)}
        return out
