"""
The building blocks every transformer in mini-Apollo is made of (no paper section: standard parts).

- `attention`: THE attention, softmax(Q K^T / sqrt(d) + mask) V, written out by hand to show there is
  nothing scary here. The ViT, the video encoder, the Perceiver resampler (cross attention) and the
  decoder LM (causal) all call this one function.
- `causal_mask`, `padding_mask`: the additive masks it takes (0 where a query may look, -inf where not).
- RMSNorm, rotary position embeddings (RoPE), the SwiGLU MLP, and a pre-norm transformer `Block`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(q, k, v, mask=None):
    """q (B, nh, Tq, hs), k and v (B, nh, Tk, hs), mask additive and broadcastable to (B, nh, Tq, Tk)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1) @ v  # (B, nh, Tq, hs)


def causal_mask(T, device=None, dtype=torch.float32):
    """(1, 1, T, T): query i may look at keys 0..i."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.zeros(T, T, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))[None, None]


def padding_mask(valid, dtype=torch.float32):
    """valid (B, Tk) bool, True for real keys -> (B, 1, 1, Tk): no query looks at a padded key."""
    zeros = torch.zeros(valid.shape, device=valid.device, dtype=dtype)
    return zeros.masked_fill(~valid, float("-inf"))[:, None, None, :]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(T, head_dim, base=10000.0, device=None):
    """cos and sin, each (T, head_dim / 2), for positions 0..T-1."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(T, device=device).float()[:, None] * inv_freq[None, :]  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x1, x2) of x (B, nh, T, hs) by its position's angle; q.k then depends on i - j only."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, hs/2)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs/2, 2)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention: self attention when kv is None, cross attention (Tq != Tk) otherwise. With smear (causal
    self attention only), each key is mixed with the key before it, k_j <- a k_j + (1 - a) k_{j-1}, a = sigmoid of a
    learned number per head (0 at the start: half and half): Olsson et al. 2022's "smeared keys". A key then says
    which token came before it, so one layer can find "where the current token was last seen" and attend to what
    followed it, an induction head, which otherwise needs two layers to compose and a long plateau to form."""

    def __init__(self, dim, n_head, smear=False):
        super().__init__()
        assert dim % n_head == 0, f"dim {dim} must be divisible by n_head {n_head}"
        self.n_head = n_head
        self.smear = nn.Parameter(torch.zeros(n_head, 1, 1)) if smear else None
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, kv=None, mask=None, rope=None):
        B, Tq, C = x.shape
        kv = x if kv is None else kv
        Tk = kv.size(1)
        q = self.q(x).view(B, Tq, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, Tq, hs)
        k, v = self.kv(kv).split(C, dim=-1)
        k = k.view(B, Tk, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, Tk, hs)
        v = v.view(B, Tk, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, Tk, hs)
        if self.smear is not None:
            a = torch.sigmoid(self.smear)  # (nh, 1, 1)
            k = a * k + (1 - a) * F.pad(k, (0, 0, 1, 0))[:, :, :-1]  # the key before: zeros before the first
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[:Tq], sin[:Tq]), apply_rope(k, cos[:Tk], sin[:Tk])
        y = attention(q, k, v, mask)  # (B, nh, Tq, hs)
        return self.proj(y.transpose(1, 2).reshape(B, Tq, C))


class SwiGLU(nn.Module):
    """The gated MLP of LLaMA / Qwen: W2 (silu(W1 x) * W3 x)."""

    def __init__(self, dim, hidden=None):
        super().__init__()
        hidden = hidden or int(8 * dim / 3)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); smear: the attention's smeared keys."""

    def __init__(self, dim, n_head, smear=False):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, n_head, smear)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim)

    def forward(self, x, mask=None, rope=None):
        x = x + self.attn(self.norm1(x), mask=mask, rope=rope)
        return x + self.mlp(self.norm2(x))
