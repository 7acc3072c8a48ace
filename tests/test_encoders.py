"""Issue 3's encoder parts on tiny configs: the video encoder, fusion, the contrastive losses against their
formulas, the text tower, retrieval, and the masked-video objective.

    pytest tests/test_encoders.py
"""
import math

import torch
import torch.nn.functional as F

from encoders import (Contrastive, EncoderConfig, ImageEncoder, MaskedVideo, TextTower, VideoEncoder, clip_loss,
                      fuse_grids, motion_costs, motion_shifts, recall_at, siglip_loss)

CFG = EncoderConfig(image_size=16, patch_size=4, dim=16, n_layer=1, n_head=2)


def descend(module, loss_fn, steps, lr=3e-3):
    """steps of AdamW on loss_fn()."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    for _ in range(steps):
        loss_fn().backward()
        opt.step()
        opt.zero_grad()


def test_video_encoder_grid_and_space_time_attention():
    torch.manual_seed(0)
    enc = VideoEncoder(CFG)
    x = torch.randn(3, 4, 3, 16, 16)  # 3 clips of 4 frames
    out = enc(x)
    assert out.shape == (3, 2, 4, 4, 16)  # tubelets of 2 frames: (B, T/2, H, W, D)
    y = x.clone()
    y[:, 3] += 1.0  # change only the last frame: with space-time attention every token of the clip sees it
    assert (enc(y)[:, 0] - out[:, 0]).abs().amax() > 1e-4


def panned_clip(dx, dy, size=32, block=4, seed=0):
    """Two frames of a blocky random texture, the second seen by a camera moved (dx, dy) pixels: (1, 2, 3, S, S)."""
    gen = torch.Generator().manual_seed(seed)
    texture = torch.rand(3, 24, 24, generator=gen).repeat_interleave(block, 1).repeat_interleave(block, 2)  # 96 px
    first, second = (texture[:, 30 + y:30 + y + size, 30 + x:30 + x + size] for x, y in ((0, 0), (dx, dy)))
    return torch.stack([first, second])[None] * 4 - 2


def test_motion_costs_find_the_camera_pan_in_every_patch():
    shifts = motion_shifts(8)
    assert len(shifts) == 13 and (12, 0) in shifts and (0, -4) in shifts
    for pan in [(8, 0), (-4, 0), (0, 12), (0, -8), (0, 0)]:
        costs = motion_costs(panned_clip(*pan), patch_size=8)  # (1, 1, 4, 4, 13)
        assert costs.shape == (1, 1, 4, 4, 13)
        assert (costs[0, 0, 1:-1, 1:-1].argmin(-1) == shifts.index(pan)).all()  # each patch off the edges says
        assert costs.mean((1, 2, 3)).argmin(-1) == shifts.index(pan)  # which way the camera went, as does the mean
        assert costs.sum(-1).abs().amax() < 1e-5  # relative to their mean over the shifts


def test_the_video_encoder_sees_motion_only_with_its_costs():
    torch.manual_seed(0)
    cfg = EncoderConfig(image_size=32, patch_size=8, dim=16, n_layer=1, n_head=2)
    still, panned = panned_clip(0, 0), panned_clip(8, 0)
    with_motion = VideoEncoder(cfg)
    assert with_motion.motion_embed is not None
    without = VideoEncoder(EncoderConfig(**{**cfg.__dict__, "motion": False}))
    assert without.motion_embed is None and not any("motion" in k for k in without.state_dict())
    costs = with_motion.motion_embed(motion_costs(panned, 8).flatten(2, 3)) - \
        with_motion.motion_embed(motion_costs(still, 8).flatten(2, 3))
    tokens = with_motion.tokens(panned) - with_motion.tokens(still)
    plain = with_motion.patch_embed(panned.transpose(1, 2)) - with_motion.patch_embed(still.transpose(1, 2))
    assert torch.allclose(tokens, plain.flatten(3).permute(0, 2, 3, 1) + costs, atol=1e-5)  # costs add in


def test_fuse_grids_interpolates_to_the_largest_and_concatenates():
    img = torch.randn(2, 4, 4, 4, 8)  # image encoder: every frame
    vid = torch.randn(2, 2, 2, 2, 6)  # video encoder: half the time steps, a coarser grid
    fused = fuse_grids([img, vid])
    assert fused.shape == (2, 4, 4, 4, 14)
    assert torch.equal(fused[..., :8], img)  # the largest grid passes unchanged
    const = torch.ones(1, 2, 2, 2, 3) * 5.0
    assert torch.allclose(fuse_grids([img[:1], const])[..., 8:], torch.full((1, 4, 4, 4, 3), 5.0))


def test_siglip_loss_matches_its_formula_on_hand_made_embeddings():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    b = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    t, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    want = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            logit = 10.0 * float(a[i] @ b[j]) - 10.0
            want += -math.log(1 / (1 + math.exp(-z * logit)))
    assert abs(siglip_loss(a, b, t, bias).item() - want / 3) < 1e-5


def test_clip_loss_matches_its_formula_on_hand_made_embeddings():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    b = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    scale = 1 / 0.07
    sim = [[scale * float(a[i] @ b[j]) for j in range(3)] for i in range(3)]
    rows = sum(-sim[i][i] + math.log(sum(math.exp(s) for s in sim[i])) for i in range(3)) / 3
    cols = sum(-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(3))) for j in range(3)) / 3
    assert abs(clip_loss(a, b, torch.tensor(math.log(scale))).item() - (rows + cols) / 2) < 1e-4


def test_text_tower_ignores_padding():
    torch.manual_seed(0)
    tower = TextTower(vocab_size=50, dim=16, n_layer=1, n_head=2, pad_id=0)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]])
    short = tower(ids[:1, :3])
    assert torch.allclose(tower(ids)[0], short[0], atol=1e-5)


def test_recall_at_k_on_a_known_matrix():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.3, 0.2]])
    r = recall_at(sim, ks=(1, 2))
    assert abs(r[1] - 1 / 3) < 1e-6 and r[2] == 1.0  # row 1 ranks 2nd, row 2 ranks 2nd


def test_a_few_contrastive_steps_lower_each_loss():
    for loss in ("siglip", "clip"):
        torch.manual_seed(0)
        model = Contrastive(ImageEncoder(CFG), TextTower(30, 16, 1, 2, pad_id=0), 16, 16, embed_dim=8, loss=loss)
        pixels = torch.randn(6, 1, 3, 16, 16)
        ids = torch.randint(1, 30, (6, 5))
        first = model(pixels, ids).item()
        descend(model, lambda: model(pixels, ids), 20)
        assert model(pixels, ids).item() < 0.8 * first, loss


def test_masked_video_reconstructs_hidden_tubelets_and_learns():
    torch.manual_seed(0)
    mae = MaskedVideo(VideoEncoder(CFG), mask_ratio=0.75, decoder_dim=16)
    x = torch.randn(4, 4, 3, 16, 16)
    t = mae.targets(x)
    assert t.shape == (4, 2 * 16, 2 * 4 * 4 * 3)  # (B, tubelets, pixels per tubelet)
    assert torch.allclose(t.mean(-1), torch.zeros(4, 32), atol=1e-5)
    # the first tubelet's pixels are the first 2 frames' top-left 4x4 patch
    patch = x[0, 0:2, :, 0:4, 0:4].permute(0, 2, 3, 1).flatten()  # (t, p, p, C), as targets() orders them
    assert torch.allclose(t[0, 0], (patch - patch.mean()) / (patch.var() + 1e-6).sqrt(), atol=1e-5)
    patch = x[1, 2:4, :, 4:8, 8:12].permute(0, 2, 3, 1).flatten()  # time step 1, grid row 1, column 2
    assert torch.allclose(t[1, 16 + 4 + 2], (patch - patch.mean()) / (patch.var() + 1e-6).sqrt(), atol=1e-5)
    g = torch.Generator().manual_seed(1)
    first = mae(x, g).item()
    descend(mae, lambda: mae(x, g), 30)
    assert mae(x, torch.Generator().manual_seed(1)).item() < 0.9 * first
