"""The one attention against PyTorch's fused kernel, and RoPE's relative-position property.

    pytest tests/test_layers.py
"""
import torch
import torch.nn.functional as F

from layers import Attention, Block, apply_rope, attention, causal_mask, padding_mask, rope_tables


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_attention_matches_sdpa_causal():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 11, 8).unbind(0)
    mask = causal_mask(11)
    torch.testing.assert_close(attention(q, k, v, mask), sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # and the mask really is causal: the first query sees only the first key
    torch.testing.assert_close(attention(q, k, v, mask)[:, :, 0], v[:, :, 0], atol=1e-6, rtol=1e-6)


def test_attention_matches_sdpa_key_padding():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 3, 2, 7, 8).unbind(0)
    valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] * 1 + [False] * 6])
    mask = padding_mask(valid)
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out, sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # padded keys have no influence
    v2 = v.clone()
    v2[1, :, 4:] = 100.0
    torch.testing.assert_close(attention(q, k, v2, mask)[1], out[1])


def test_attention_matches_sdpa_cross():
    torch.manual_seed(2)
    q = torch.randn(2, 4, 5, 16)     # 5 queries (latents)
    k, v = torch.randn(2, 2, 4, 37, 16).unbind(0)  # 37 keys (media)
    torch.testing.assert_close(attention(q, k, v), sdpa(q, k, v, None), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(3)
    T, hs = 12, 16
    cos, sin = rope_tables(T, hs)
    q = torch.randn(hs).expand(1, 1, T, hs)  # the same vector at every position
    k = torch.randn(hs).expand(1, 1, T, hs)
    scores = (apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-2, -1))[0, 0]  # (T, T)
    for offset in range(-T + 1, T):
        diag = torch.diagonal(scores, offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 3)[0])  # but it does vary


def test_block_is_causal_under_causal_mask():
    torch.manual_seed(4)
    block = Block(32, 4)
    x = torch.randn(2, 9, 32)
    cos, sin = rope_tables(9, 8)
    y = block(x, mask=causal_mask(9), rope=(cos, sin))
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 3, 32)
    y2 = block(x2, mask=causal_mask(9), rope=(cos, sin))
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_cross_attention_shapes():
    attn = Attention(32, 4)
    out = attn(torch.randn(2, 5, 32), kv=torch.randn(2, 40, 32))
    assert out.shape == (2, 5, 32)


def test_inductor_rewrites_the_hand_written_attention_into_the_fused_kernel():
    """torch.compile's pattern matcher recognises our attention, unmasked and with the additive causal mask, and
    swaps in scaled_dot_product_attention ('fuse_attention'), forward and backward; the result is unchanged."""
    from torch._dynamo.utils import counters
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    for mask in (None, causal_mask(16)):
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(force_disable_caches=True):  # a cache hit skips the rewrite and its count
            out = torch.compile(attention, fullgraph=True)(q, k, v, mask)
        assert counters["inductor"]["fuse_attention"] >= 1, dict(counters["inductor"])
        torch.testing.assert_close(out, attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        for g, ref in zip(grads, torch.autograd.grad(attention(q, k, v, mask).sum(), (q, k, v))):
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)
