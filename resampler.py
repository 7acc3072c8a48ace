"""
The connector: from feature grids to a few tokens per frame in the LM's width (Apollo paper §4.3, Table 1).

Apollo up-projects the encoders' features with an MLP and then compresses each clip with a Perceiver
resampler (Jaegle et al. 2021, as used in Flamingo, Alayrac et al. 2022): a fixed set of learned latents
cross-attends to the clip's tokens, so every clip becomes tokens_per_frame * frames_per_clip tokens whatever
its resolution. Flamingo's details are kept: the latents join the keys and values, the media and the
latents have their own norms, and a final norm closes the stack. Table 1 found the Perceiver best overall;
its two baselines are here too (`--resampler=mlp_pool|conv_pool`): each frame's grid average-pooled to
tokens_per_frame tokens, after the MLP alone or after a 3x3 convolution over the grid.

The final norm is ours to choose (`--token_norm`), and it decides whether the video reaches the LM at all in a small
run. Flamingo's (RMSNorm, "rms") scales each token to one norm; a connector whose LM cannot yet read the video then
lowers its loss by growing a part common to every video (a soft prompt), and after the norm the part that tells
videos apart shrinks to a sliver: 0.03% of the tokens' energy after our CPU run's `align`. "batch" (the default)
takes the common part away: each number of each token is centred and scaled across the clips of the batch (batch
normalisation, Ioffe & Szegedy 2015; running statistics at test time), so that all the LM receives is what differs
from video to video, at the scale of its word embeddings (TokenBatchNorm).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Attention, RMSNorm, SwiGLU


RESAMPLERS = ["perceiver", "mlp_pool", "conv_pool"]
TOKEN_NORMS = ["batch", "rms"]


@dataclass
class ResamplerConfig:
    tokens_per_frame: int = 8   # tokens each frame of a clip ends up as in the LM (Apollo: 8-32 is the sweet spot)
    n_layer: int = 2            # Perceiver layers
    n_head: int = 4
    kind: str = "perceiver"     # perceiver | mlp_pool | conv_pool (Table 1)
    norm: str = "batch"         # batch | rms: the connector's last step (TokenBatchNorm, or Flamingo's RMSNorm)


class TokenBatchNorm(nn.Module):
    """(B, L, D) tokens of B clips -> the same, each of the L * D numbers centred and scaled across the clips: in
    training by the batch's own mean and variance (which update running ones), in testing (or for a batch of one clip)
    by the running ones. Each token is first scaled to unit RMS, so that eps is small beside what varies. The output's
    scale is fixed (a buffer, set to the LM's word scale by Apollo.match_visual_scale), not learned: a learned gain is
    one more way to turn the video down before the LM can use it."""

    def __init__(self, tokens, dim, momentum=0.1, eps=1e-6):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(tokens, dim))
        self.register_buffer("var", torch.ones(tokens, dim))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("batches", torch.zeros(()))  # batches seen: the first 1 / momentum are averaged evenly

    def forward(self, x):
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # (B, L, D), unit RMS per token
        if self.training and x.size(0) > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)  # (L, D): across the clips of the batch
            with torch.no_grad():  # (a starting variance of 1 would linger far above a collapsed connector's 1e-4)
                weight = (1 / (self.batches + 1)).clamp_min(self.momentum)
                self.mean.lerp_(mean, weight)
                self.var.lerp_(var * x.size(0) / (x.size(0) - 1), weight)
                self.batches.add_(1)
        else:
            mean, var = self.mean, self.var
        return self.scale * (x - mean) * torch.rsqrt(var + self.eps)  # (B, L, D)


def token_norm(cfg: ResamplerConfig, dim, frames_per_clip):
    if cfg.norm not in TOKEN_NORMS:
        raise ValueError(f"token norm must be one of {TOKEN_NORMS}, got {cfg.norm!r}")
    return TokenBatchNorm(frames_per_clip * cfg.tokens_per_frame, dim) if cfg.norm == "batch" else RMSNorm(dim)


class Projector(nn.Module):
    """The MLP up-projection from the vision width to the LM width."""

    def __init__(self, vision_dim, lm_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, x):
        return self.net(x)


class PerceiverLayer(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.norm_media = RMSNorm(dim)
        self.norm_latents = RMSNorm(dim)
        self.attn = Attention(dim, n_head)
        self.norm_mlp = RMSNorm(dim)
        self.mlp = SwiGLU(dim)

    def forward(self, latents, media):
        lat = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), lat], dim=1)  # (B, N + L, D): latents also attend to themselves
        latents = latents + self.attn(lat, kv=kv)
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(nn.Module):
    """(B, T, H, W, D) clip grids -> (B, T * tokens_per_frame, D) tokens."""

    def __init__(self, cfg: ResamplerConfig, dim, frames_per_clip):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(frames_per_clip * cfg.tokens_per_frame, dim) * 0.02)
        self.frame_embed = nn.Parameter(torch.zeros(frames_per_clip, 1, dim))  # which frame of the clip
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg.n_head) for _ in range(cfg.n_layer))
        self.norm = token_norm(cfg, dim, frames_per_clip)

    def forward(self, x):
        B, T, H, W, D = x.shape
        media = (x.view(B, T, H * W, D) + self.frame_embed[:T]).view(B, T * H * W, D)  # (B, N, D)
        latents = self.latents[None].expand(B, -1, -1)  # (B, L, D)
        for layer in self.layers:
            latents = layer(latents, media)
        return self.norm(latents)  # (B, L, D)


def pool_shape(tokens):
    """The (rows, cols) a frame is pooled to: rows * cols = tokens, as square as tokens allows."""
    rows = max(r for r in range(1, int(tokens ** 0.5) + 1) if tokens % r == 0)
    return rows, tokens // rows


class PoolResampler(nn.Module):
    """Table 1's baselines: (B, T, H, W, D) -> (B, frames_per_clip * tokens_per_frame, D), each frame's grid
    average-pooled to tokens_per_frame cells (a video encoder's grid, T = frames / 2, is pooled to frames_per_clip
    steps, each tubelet serving its 2 frames); with conv, a 3x3 convolution mixes each cell's neighbours first."""

    def __init__(self, cfg: ResamplerConfig, dim, frames_per_clip):
        super().__init__()
        self.shape = (frames_per_clip, *pool_shape(cfg.tokens_per_frame))
        self.conv = nn.Conv2d(dim, dim, 3, padding=1) if cfg.kind == "conv_pool" else None
        self.norm = token_norm(cfg, dim, frames_per_clip)

    def forward(self, x):
        B, T, H, W, D = x.shape
        if self.conv is not None:
            x = self.conv(x.reshape(B * T, H, W, D).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, T, H, W, D)
        x = F.adaptive_avg_pool3d(x.permute(0, 4, 1, 2, 3), self.shape)  # (B, D, frames, rows, cols)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, frames * rows * cols, D)


def make_resampler(cfg: ResamplerConfig, dim, frames_per_clip):
    if cfg.kind not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {cfg.kind!r}")
    return (PerceiverResampler if cfg.kind == "perceiver" else PoolResampler)(cfg, dim, frames_per_clip)
