"""
Vision encoders: what turns frames into feature grids (Apollo paper §4.2).

Apollo pairs SigLIP (an image encoder run on every frame) with InternVideo2 (a video encoder over tubelets).
Neither can be downloaded here, so we train small counterparts from scratch. This file holds the image
encoder, a plain ViT (Dosovitskiy et al. 2020): each frame is cut into patches, embedded, given a learned
position, and run through the pre-norm blocks of layers.py with full (unmasked) attention.

Every encoder returns a (B, T, H, W, D) grid: B clips, T frames each, an H x W grid of D-dim features.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Block, RMSNorm


@dataclass
class EncoderConfig:
    image_size: int = 64   # frames are resized to image_size x image_size before patching
    patch_size: int = 8    # so the grid is (image_size / patch_size) squared
    dim: int = 64          # width of the encoder
    n_layer: int = 3
    n_head: int = 4


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
