"""
The connector: from feature grids to a few tokens per frame in the LM's width (Apollo paper §4.3, Table 1).

Apollo up-projects the encoders' features with an MLP and then compresses each clip with a Perceiver
resampler (Jaegle et al. 2021, as used in Flamingo, Alayrac et al. 2022): a fixed set of learned latents
cross-attends to the clip's tokens, so every clip becomes tokens_per_frame * frames_per_clip tokens whatever
its resolution. Flamingo's details are kept: the latents join the keys and values, the media and the
latents have their own norms, and a final norm closes the stack. Table 1 found the Perceiver best overall;
its two baselines are here too (`--resampler=mlp_pool|conv_pool`): each frame's grid average-pooled to
tokens_per_frame tokens, after the MLP alone or after a 3x3 convolution over the grid.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Attention, RMSNorm, SwiGLU


RESAMPLERS = ["perceiver", "mlp_pool", "conv_pool"]


@dataclass
class ResamplerConfig:
    tokens_per_frame: int = 8   # tokens each frame of a clip ends up as in the LM (Apollo: 8-32 is the sweet spot)
    n_layer: int = 2            # Perceiver layers
    n_head: int = 4
    kind: str = "perceiver"     # perceiver | mlp_pool | conv_pool (Table 1)


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
        self.norm = RMSNorm(dim)

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
        self.norm = RMSNorm(dim)

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
