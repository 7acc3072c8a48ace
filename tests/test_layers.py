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


def test_smeared_keys_mix_each_key_with_the_one_before_and_stay_causal():
    torch.manual_seed(0)
    attn = Attention(16, 2, smear=True)
    assert attn.smear.shape == (2, 1, 1) and not attn.smear.any()  # half and half at the start
    x = torch.randn(1, 6, 16)
    T = x.size(1)
    out = attn(x, mask=causal_mask(T))
    y = x.clone()
    y[:, 4:] += 1.0
    assert torch.allclose(attn(y, mask=causal_mask(T))[:, :4], out[:, :4], atol=1e-6)  # the past does not see 4, 5
    k = attn.kv(x)[..., :16].view(1, T, 2, 8).transpose(1, 2)
    smeared = 0.5 * k + 0.5 * torch.cat([torch.zeros_like(k[:, :, :1]), k[:, :, :-1]], 2)
    q = attn.q(x).view(1, T, 2, 8).transpose(1, 2)
    v = attn.kv(x)[..., 16:].view(1, T, 2, 8).transpose(1, 2)
    expected = attn.proj(attention(q, smeared, v, causal_mask(T)).transpose(1, 2).reshape(1, T, 16))
    assert torch.allclose(out, expected, atol=1e-5)


def test_smeared_keys_let_one_layer_copy_a_repeated_sequence():
    """Induction (find the current token earlier, say what followed it) needs two layers of plain attention; with
    smeared keys one layer learns it (Olsson et al. 2022). A random run of 8 tokens, a gap of 0-8 random tokens
    (a fixed distance could be copied by position alone), then the same run again: the loss on the repeat falls
    below 0.5 with smeared keys within 300 steps, and stays above 2 without (log 32 = 3.5 is a guess)."""
    from apollo import LM, LMConfig
    losses, gen = {}, torch.Generator().manual_seed(0)
    for smear in (False, True):
        torch.manual_seed(0)
        lm = LM(LMConfig(vocab_size=32, dim=32, n_layer=1, n_head=2, smear=smear, max_seq=32))
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
        for _ in range(300):
            ids = torch.randint(0, 32, (32, 24), generator=gen)
            gap = torch.randint(0, 9, (32,), generator=gen)
            at = 8 + gap[:, None] + torch.arange(8)  # (32, 8): where the repeat goes
            ids.scatter_(1, at, ids[:, :8])
            targets = torch.full_like(ids, -100).scatter(1, at[:, 1:], ids[:, 1:8])  # the repeat, past its first
            logits = lm(lm.embed(ids[:, :-1]))
            loss = F.cross_entropy(logits.reshape(-1, 32), targets[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[smear] = loss.item()
    assert losses[True] < 0.5 and losses[False] > 2.0, losses
