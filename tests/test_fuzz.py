"""Fuzzing: the tokenizer round-trips random Unicode; the JSONL loader and the video opener, fed random or
mangled bytes, either work or raise their one clear error (DataError, VideoError), never anything else.
Each test prints how many cases it tried (pytest -s shows it).

    pytest -s tests/test_fuzz.py
"""
import os
import random

import pytest

from data import DataError, load_jsonl
from integrate import Tokenizer
from sampling import VideoError, sample_fps, sample_uniform


def random_text(rng, n):
    """n characters drawn from all of Unicode but the surrogates, with ASCII, spaces and newlines mixed in."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append(rng.choice(" \n\t():.,ABCD0123"))
        elif r < 0.6:
            out.append(chr(rng.randrange(32, 127)))
        else:
            c = rng.randrange(0x80, 0x110000)
            out.append(chr(c if not 0xD800 <= c < 0xE000 else 0x263A))
    return "".join(out)


def test_tokenizer_round_trips_random_unicode():
    rng = random.Random(0)
    tok = Tokenizer.train([random_text(rng, 200) for _ in range(20)] + ["The camera pans left. blue (B)"] * 20, 400)
    cases = [random_text(rng, rng.randrange(0, 60)) for _ in range(3000)]
    for text in cases:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    print(f"tokenizer: {len(cases)} random Unicode strings round-tripped")


def mangle(rng, blob):
    """blob with bytes flipped, cut, repeated or inserted, at random."""
    b = bytearray(blob)
    for _ in range(rng.randrange(1, 8)):
        kind, at = rng.randrange(4), rng.randrange(max(1, len(b)))
        if kind == 0 and b:
            b[at] = rng.randrange(256)
        elif kind == 1:
            b = b[:at]
        elif kind == 2:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        else:
            b[at:at] = b[at: at + rng.randrange(1, 200)]
    return bytes(b)


def test_jsonl_loader_raises_only_data_errors(tiny_world, tmp_path):
    world, _ = tiny_world
    with open(os.path.join(world, "train.jsonl"), "rb") as f:
        good = f.read()
    rng, tried, failed = random.Random(1), 0, 0
    path = tmp_path / "fuzz.jsonl"
    for i in range(400):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))) if i % 4 == 0 else mangle(rng, good)
        path.write_bytes(blob)
        tried += 1
        try:
            load_jsonl(str(path))
        except DataError as e:
            assert str(path) in str(e)
            failed += 1
    print(f"jsonl: {tried} random or mangled files, {failed} refused with DataError, the rest loaded")
    assert failed > tried // 2


@pytest.mark.parametrize("sampler", ["uniform", "fps"])
def test_video_opener_raises_only_video_errors(tiny_world, tmp_path, sampler):
    world, _ = tiny_world
    with open(os.path.join(world, "videos", "train_00000.mp4"), "rb") as f:
        good = f.read()
    rng, tried, failed = random.Random(2), 0, 0
    for i in range(60):
        path = tmp_path / f"fuzz_{i}.mp4"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 2000))) if i % 5 == 0
                         else mangle(rng, good))
        tried += 1
        try:
            out = sample_uniform(str(path), 4) if sampler == "uniform" else sample_fps(str(path), 1.0, 2, 2)
            frames, times = out[:2]
            assert len(frames) == len(times) and frames.dtype.name == "uint8"
        except VideoError as e:
            assert str(path) in str(e)
            failed += 1
    print(f"video ({sampler}): {tried} random or mangled files, {failed} refused with VideoError, the rest decoded")
    assert failed > 0
