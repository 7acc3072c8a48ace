"""Each module of the model path on a tiny config: encoder, resampler, tokenizer, interleaving, the LM and Apollo.

    pytest tests/test_model.py
"""
import random

import torch
import torch.nn.functional as F

from apollo import (MOTION_SCALE, Apollo, ApolloConfig, LMConfig, answer_mc, effective_rank, option_logprobs,
                    video_share, visual_spread)
from encoders import EncoderConfig, ImageEncoder, motion_costs, motion_shifts, preprocess
from integrate import (BOS, EOS, IGNORE, PAD, SPECIALS, VID_END, VID_START, VIDEO, Tokenizer, build_sample, format_mc,
                       mc_answer, option_answers, video_tokens)
from layers import RMSNorm
from resampler import PerceiverResampler, PoolResampler, Projector, ResamplerConfig, TokenBatchNorm, pool_shape

CORPUS = ["A red circle appears at 0 s. The camera pans left.", "Which character appeared first?",
          "The square bounces 2 times and stops at 7 s.", "clip from 00:04-00:08:"] * 5


def tiny_apollo(vocab=300):
    return Apollo(ApolloConfig(EncoderConfig(32, 8, 16, 1, 2), ResamplerConfig(2, 1, 2), LMConfig(vocab, 32, 2, 2, 256),
                               frames_per_clip=2))


def test_image_encoder_grid_shape():
    enc = ImageEncoder(EncoderConfig(image_size=32, patch_size=8, dim=16, n_layer=1, n_head=2))
    frames = torch.randint(0, 256, (6, 40, 48, 3), dtype=torch.uint8)
    x = preprocess(frames, 32).view(3, 2, 3, 32, 32)  # 3 clips of 2 frames, resized from 40x48
    assert enc(x).shape == (3, 2, 4, 4, 16)  # (B, T, H, W, D)


def test_perceiver_resampler_tokens_per_frame_whatever_the_grid():
    res = PerceiverResampler(ResamplerConfig(tokens_per_frame=3, n_layer=2, n_head=2), dim=16, frames_per_clip=4)
    for grid in (2, 5):
        assert res(torch.randn(7, 4, grid, grid, 16)).shape == (7, 12, 16)
    assert Projector(8, 16)(torch.randn(2, 3, 8)).shape == (2, 3, 16)


def test_pool_resamplers_average_each_frame_to_tokens_per_frame_cells():
    assert pool_shape(8) == (2, 4) and pool_shape(16) == (4, 4) and pool_shape(3) == (1, 3)
    for kind in ("mlp_pool", "conv_pool"):
        res = PoolResampler(ResamplerConfig(tokens_per_frame=4, kind=kind), dim=6, frames_per_clip=2)
        assert res(torch.randn(3, 2, 8, 8, 6)).shape == (3, 8, 6)  # 2 frames x 4 tokens
        assert res(torch.randn(3, 1, 8, 8, 6)).shape == (3, 8, 6)  # one tubelet of 2 frames: the same tokens
    # mlp_pool on a frame whose quadrants are constant: each token is its quadrant's value (up to the RMSNorm)
    x = torch.zeros(1, 1, 4, 4, 6)
    for k, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        x[0, 0, r:r + 2, c:c + 2] = k + 1
    res = PoolResampler(ResamplerConfig(tokens_per_frame=4, kind="mlp_pool", norm="rms"), dim=6, frames_per_clip=1)
    torch.testing.assert_close(res(x)[0], res.norm(torch.tensor([1.0, 2, 3, 4])[:, None].expand(4, 6)))


def test_tokenizer_round_trips_any_utf8_and_learns_merges():
    tok = Tokenizer.train(CORPUS, 340)
    assert tok.vocab_size == 340
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode()) / 3  # merges compress text like the corpus
    rnd = random.Random(0)
    for _ in range(200):
        points = [rnd.choice([rnd.randrange(32, 127), rnd.randrange(0x80, 0xD7FF), rnd.randrange(0xE000, 0x10FFFF)])
                  for _ in range(rnd.randrange(0, 30))]  # ASCII, then the rest of Unicode without surrogates
        s = "".join(map(chr, points))
        assert tok.decode(tok.encode(s)) == s
    for s in ["", " ", "\n\n  x", "tabs\tand_under__scores", "日本語のテキスト 🎥", "<video> is text here"]:
        assert tok.decode(tok.encode(s)) == s
    assert not set(tok.encode("<video><eos>")) & set(range(256, 256 + len(SPECIALS)))  # no special from text


def test_tokenizer_save_load(tmp_path):
    tok = Tokenizer.train(CORPUS, 290)
    tok.save(tmp_path / "tok.json")
    assert Tokenizer.load(tmp_path / "tok.json").encode(CORPUS[2]) == tok.encode(CORPUS[2])


def test_timestamp_interleaving_matches_the_paper():
    tok = Tokenizer.train(CORPUS, 300)
    ids = video_tokens(tok, [(0.0, 4.0), (64.2, 68.0)], 5, "timestamp")
    assert tok.decode(ids) == "clip from 00:00-00:04:" + "<video>" * 5 + "clip from 01:04-01:08:" + "<video>" * 5 + "\n"
    ids = video_tokens(tok, [(0.0, 4.0)], 3, "timestamp_start_end")
    assert ids.count(VIDEO) == 3 and ids.index(VID_START) < ids.index(VIDEO) < ids.index(VID_END)
    assert tok.decode(video_tokens(tok, [(0.0, 4.0)] * 2, 2, "plain")) == "<video>" * 4 + "\n"


def test_build_sample_puts_the_loss_on_the_answer_only():
    tok = Tokenizer.train(CORPUS, 300)
    ids, labels = build_sample(tok, [("Question?\nAnswer: ", "B"), ("Next?\nAnswer: ", "D")], [VIDEO] * 4)
    assert ids[0] == BOS and ids[-1] == EOS and ids.count(VIDEO) == 4
    assert tok.decode(ids) == "<bos>" + "<video>" * 4 + "Question?\nAnswer: B\nNext?\nAnswer: D<eos>"
    assert [t for t in labels if t != IGNORE] == [ord("B")] + tok.encode("\n") + [ord("D"), EOS]


def test_apollo_places_visual_tokens_and_loss_counts_answers_only():
    torch.manual_seed(0)
    model = tiny_apollo()
    L = model.tokens_per_clip
    ids = torch.tensor([[BOS] + [VIDEO] * L + [65, 66, 67, EOS], [BOS] + [VIDEO] * L + [68, 69, EOS, 0]])
    labels = torch.full_like(ids, IGNORE)
    labels[:, -3:-1] = ids[:, -3:-1]
    frames = torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8)  # one clip per sample
    logits, loss = model(ids, frames, labels)
    assert logits.shape == (2, ids.shape[1], 300)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(loss, manual)
    # the second sample's frames reach only the second sample, and only after its visual tokens (in testing: in
    # training TokenBatchNorm centres each clip's tokens on the batch's mean, by design)
    model.eval()
    logits, _ = model(ids, frames, labels)
    frames2 = frames.clone()
    frames2[1] = 255 - frames2[1]
    logits2, _ = model(ids, frames2, labels)
    torch.testing.assert_close(logits2[0], logits[0])
    torch.testing.assert_close(logits2[1, 0], logits[1, 0])
    assert not torch.allclose(logits2[1, L + 1:], logits[1, L + 1:])


def test_match_visual_scale_starts_visual_tokens_at_the_scale_of_the_word_embeddings():
    """The connector's final norm would make each visual token about sqrt(D) long (RMS 1), whatever scale the LM's
    words have; match_visual_scale sets the norm's gain to the embeddings' RMS, for each resampler."""
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (3, 2, 32, 32, 3), dtype=torch.uint8)
    for kind in ("perceiver", "mlp_pool", "conv_pool"):
        model = Apollo(ApolloConfig(EncoderConfig(32, 8, 16, 1, 2), ResamplerConfig(2, 1, 2, kind),
                                    LMConfig(300, 32, 2, 2, 256), frames_per_clip=2))
        with torch.no_grad():
            model.lm.embed.weight.mul_(7.0)  # trained embeddings grow from their 0.02 start
            words = model.lm.embed.weight.pow(2).mean().sqrt().item()
            before = model.encode_video(frames).pow(2).mean().sqrt().item()
            model.match_visual_scale()
            after = model.encode_video(frames).pow(2).mean().sqrt().item()
        assert before > 0.5 and abs(words - 0.14) < 0.01  # order 1 (the norm's gain of 1) against words of 0.14
        assert abs(after / before - words) < 1e-3 * words  # the gain went from 1 to the words' RMS


def test_effective_rank_counts_the_directions_rows_differ_along():
    torch.manual_seed(0)
    base, direction = torch.randn(50), torch.randn(50)
    one = base + torch.randn(20, 1) * direction  # 20 rows along one line
    assert abs(effective_rank(one) - 1.0) < 1e-4
    even = torch.cat([torch.eye(4), -torch.eye(4)]) * 3.0  # +-3 along 4 axes: the same variance along each
    assert abs(effective_rank(even) - 4.0) < 1e-4
    skewed = torch.cat([torch.eye(4) * torch.tensor([10.0, 1, 1, 1]), -torch.eye(4) * torch.tensor([10.0, 1, 1, 1])])
    assert 1.0 < effective_rank(skewed) < 2.0  # one direction holds 100 / 103 of the variance
    assert effective_rank(torch.ones(5, 3)) == 1.0  # identical rows: no spread at all, reported as rank 1


def test_visual_spread_tells_a_collapsed_connector_from_a_working_one():
    """A connector whose tokens no longer depend on the video (the Perceiver's attention and MLP silenced: only
    its learned latents come out) has tokens rank 1; the same model untouched passes the videos' differences on."""
    torch.manual_seed(0)
    model = tiny_apollo()
    clips = torch.randint(0, 256, (12, 2, 32, 32, 3), dtype=torch.uint8)
    working = visual_spread(model, clips)
    assert working["videos"] == 12 and working["tokens"] > 2.0 and working["grid"] > 2.0
    with torch.no_grad():
        for layer in model.resampler.layers:
            layer.attn.proj.weight.zero_()
            layer.mlp.w2.weight.zero_()
    collapsed = visual_spread(model, clips)
    assert collapsed["tokens"] == 1.0 and collapsed["grid"] == working["grid"] and collapsed["share"] < working["share"]


def test_token_batch_norm_passes_on_what_differs_between_videos_and_rms_norm_does_not():
    """Tokens that are one large part common to every clip plus a small part of their own (what a connector makes
    when it learns a soft prompt): after Flamingo's RMSNorm the clips' own parts are under 1% of the energy; after
    TokenBatchNorm they are all of it, at its fixed scale, by the batch's statistics in training and by the running
    ones in testing (and for a batch of one clip, which has no spread of its own)."""
    torch.manual_seed(0)
    common = torch.randn(1, 4, 16) * 10

    def clips(n):
        return common + torch.randn(n, 4, 16) * 0.1  # (n clips, 4 tokens, 16)
    x = clips(64)
    assert video_share(x.flatten(1)) < 0.01 and video_share(RMSNorm(16)(x).flatten(1)) < 0.01
    norm = TokenBatchNorm(4, 16)
    norm.scale.fill_(0.5)
    y = norm(x)
    assert video_share(y.flatten(1)) > 0.999 and abs(y.pow(2).mean().sqrt().item() - 0.5) < 0.01
    for _ in range(60):  # the running statistics follow the batches'
        norm(clips(64))
    one = norm(x[:1])
    norm.eval()
    z = norm(x)
    assert torch.equal(one, z[:1])
    assert video_share(z.flatten(1)) > 0.95 and abs(z.pow(2).mean().sqrt().item() - 0.5) < 0.05
    assert effective_rank(z.flatten(1)) > 30  # the clips' own parts, whole


def test_option_logprobs_in_one_batch_equal_each_answer_scored_alone():
    """Prompts of different lengths, with and without a video, 4 and 3 options: the batched scores equal
    log P(answer | prompt) computed row by row, and an item's missing options score -inf."""
    torch.manual_seed(0)
    model = Apollo(ApolloConfig(EncoderConfig(16, 4, 8, 1, 2), ResamplerConfig(2, 1, 2), LMConfig(300, 16, 1, 2, 128),
                                frames_per_clip=2)).eval()
    L = model.tokens_per_clip
    frames = torch.randint(0, 256, (3, 2, 16, 16, 3), dtype=torch.uint8)  # item 0: 1 clip, item 2: 2 clips
    prompts = [[BOS] + [VIDEO] * L + [70, 71, 72], [BOS, 80, 81], [BOS] + [VIDEO] * 2 * L + [90]]
    choices = [[[65], [66, 67], [68], [69, 65, 66]], [[100], [101], [102, 103]], [[110, 111], [112], [113], [114]]]
    P = max(map(len, prompts))
    ids = torch.tensor([p + [PAD] * (P - len(p)) for p in prompts])
    got = option_logprobs(model, ids, torch.tensor([len(p) for p in prompts]), frames, choices)
    clips = {0: frames[:1], 1: None, 2: frames[1:]}
    for b, answers in enumerate(choices):
        for k, answer in enumerate(answers):
            row = torch.tensor([prompts[b] + answer])
            logp = model(row, clips[b])[0][0].log_softmax(-1)
            want = sum(logp[len(prompts[b]) - 1 + i, t] for i, t in enumerate(answer))
            torch.testing.assert_close(got[b, k], want, rtol=1e-4, atol=1e-4)
    assert got[1, 3] == float("-inf")
    assert answer_mc(model, ids, torch.tensor([len(p) for p in prompts]), frames, choices).tolist() == \
        got.argmax(-1).tolist()


def test_apollo_learns_a_tiny_batch():
    torch.manual_seed(0)
    model = tiny_apollo()
    ids = torch.tensor([[BOS, 70, 71, 72, 73, EOS]] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss = model(ids, None, ids)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first


def test_answer_mc_picks_the_answer_the_model_learned():
    """A tiny model memorises two answers (" blue (B)", and " cross red (D)", which restates its subject);
    answer_mc must read back B and D, scoring each option's whole answer, the subject included."""
    torch.manual_seed(0)
    tok = Tokenizer.train(CORPUS + ["blue red green white cross"], 300)
    qs = [("What colour?", ["green", "blue", "white", "red"], "B", None),
          ("What colour is the cross?", ["blue", "green", "white", "red"], "D", "cross")]
    assert mc_answer(qs[0][1], "B") == " blue (B)" and mc_answer(qs[1][1], "D", "cross") == " cross red (D)"
    samples = [build_sample(tok, [(format_mc(q, o), mc_answer(o, a, s))]) for q, o, a, s in qs]
    S = max(len(i) for i, _ in samples)
    ids = torch.tensor([i + [PAD] * (S - len(i)) for i, _ in samples])
    labels = torch.tensor([lab + [IGNORE] * (S - len(lab)) for _, lab in samples])
    model = tiny_apollo()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        _, loss = model(ids, None, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    prompts = [build_sample(tok, [(format_mc(q, o), "")])[0][:-1] for q, o, _, _ in qs]
    P = max(map(len, prompts))
    batch = torch.tensor([p + [PAD] * (P - len(p)) for p in prompts])
    answers = [option_answers(tok, o, s) for _, o, _, s in qs]
    assert len({tuple(a[:len(tok.encode(" cross"))]) for a in answers[1]}) == 1  # one subject, said alike
    choice = answer_mc(model.eval(), batch, torch.tensor([len(p) for p in prompts]), None, answers)
    assert choice.tolist() == [1, 3]


def test_each_vision_choice_feeds_the_lm_and_learns():
    """image, video, image+video: the fused grid reaches the LM, and the encoders receive gradient."""
    for vision in ("image", "video", "image+video"):
        torch.manual_seed(0)
        model = Apollo(ApolloConfig(EncoderConfig(16, 4, 8, 1, 2), ResamplerConfig(2, 1, 2),
                                    LMConfig(300, 16, 1, 2, 128), frames_per_clip=2, vision=vision))
        frames = torch.randint(0, 256, (3, 2, 16, 16, 3), dtype=torch.uint8)  # 3 clips of 2 frames
        grid = model.encode_frames(frames)
        steps = 1 if vision == "video" else 2  # tubelets of 2 frames; fused, interpolated to the image grid's 2
        assert grid.shape == (3, steps, 4, 4, 8 * len(vision.split("+")))
        ids = torch.tensor([[BOS] + [VIDEO] * 4 * 3 + [65, 66]])
        labels = torch.tensor([[IGNORE] * 13 + [65, 66]])
        _, loss = model(ids, frames, labels)
        loss.backward()
        for encoder in model.encoders():
            assert encoder.patch_embed.weight.grad.abs().sum() > 0, vision
    assert Apollo(ApolloConfig(vision="image+video")).video_encoder is not None


def test_the_motion_stream_brings_the_camera_pan_into_the_fused_grid():
    """--motion_stream: the motion costs of each tubelet join the fused grid as channels of their own (x MOTION_SCALE),
    so the pan is there for the connector whatever the towers learned; without it the grid is the towers' alone."""
    texture = torch.randint(0, 256, (96, 96, 3), dtype=torch.uint8).repeat_interleave(4, 0).repeat_interleave(4, 1)
    shifts = motion_shifts(8)
    for pan in [(8, 0), (-8, 0), (0, 4), (0, -12)]:
        frames = torch.stack([texture[100 + y:132 + y, 100 + x:132 + x] for k in range(2)
                              for x, y in ((0, 0), pan)])[None]  # (1, 4, 32, 32, 3): two tubelets, each panned
        for stream in (True, False):
            model = Apollo(ApolloConfig(EncoderConfig(32, 8, 16, 1, 2), ResamplerConfig(2, 1, 2),
                                        LMConfig(300, 32, 1, 2, 256), frames_per_clip=4, motion_stream=stream))
            grid = model.encode_frames(frames)  # (1, 4, 4, 4, 16 + 13 with the stream)
            assert grid.shape == (1, 4, 4, 4, 16 + 13 * stream)
            assert model.projector.net[0].in_features == grid.shape[-1]
            if stream:
                costs = grid[..., 16:] / MOTION_SCALE  # (1, 4, 4, 4, 13)
                x = preprocess(frames.flatten(0, 1), 32).view(1, 4, 3, 32, 32)
                assert torch.allclose(costs[:, [0, 3]], motion_costs(x, 8), atol=1e-5)  # 2 tubelets, 4 frames
                assert (costs.mean((2, 3)).argmin(-1) == shifts.index(pan)).all()  # every frame says which way
