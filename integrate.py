"""
Text, and where the video tokens go in it (Apollo paper §4.4, Table 2).

- `Tokenizer`: byte-level BPE (Sennrich et al. 2016; the GPT-2 variant): text is split into words, each word's
  UTF-8 bytes are merged pair by pair in the order the merges were learned. Bytes are the base vocabulary, so
  any UTF-8 text round-trips. We learn the merges on our own corpus; special tokens can never come from text.
- `video_tokens`: the four ways Table 2 compared to place each clip's tokens among the text:
  `plain` (tokens only), `start_end` (<vid_start> .. <vid_end> around each clip), `timestamp` (the text
  "clip from MM:SS-MM:SS:" before each clip: Apollo's choice, no new embeddings to learn) and
  `timestamp_start_end` (both).
- `build_sample`: a whole training sequence (video, prompt, answer) as token ids and labels, the loss on the
  answer tokens only (label -100 elsewhere, visual positions included).
"""
import json
import re
from collections import Counter

SPECIALS = ["<pad>", "<bos>", "<eos>", "<video>", "<vid_start>", "<vid_end>"]
PAD, BOS, EOS, VIDEO, VID_START, VID_END = range(256, 256 + len(SPECIALS))
IGNORE = -100  # label of every position without a loss
# words: letters with an optional leading space, single digits (so numbers are read digit by digit), punctuation
# runs, underscores, whitespace; "(" always alone, so the answer separator is one byte whatever the merges.
# Every character falls in one of these, so splitting loses nothing.
WORDS = re.compile(r"\(| ?[^\W\d_]+| ?\d| ?[^\s\w(]+| ?_+|\s+(?!\S)|\s+")
INTEGRATIONS = ["plain", "start_end", "timestamp", "timestamp_start_end"]


class Tokenizer:
    def __init__(self, merges):
        self.merges = [tuple(m) for m in merges]  # merge i makes token 256 + len(SPECIALS) + i from a pair
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        first = 256 + len(SPECIALS)
        self.bytes_of = {i: bytes([i]) for i in range(256)}
        for i, (a, b) in enumerate(self.merges):
            self.bytes_of[first + i] = self.bytes_of[a] + self.bytes_of[b]
        self.vocab_size = first + len(self.merges)
        self.cache = {}

    @staticmethod
    def train(texts, vocab_size):
        """Learn vocab_size - 262 merges, most frequent pair first, from the words of texts."""
        words = Counter(w for t in texts for w in WORDS.findall(t))
        words = {tuple(w.encode("utf-8")): n for w, n in words.items()}
        merges, new_id = [], 256 + len(SPECIALS)
        while new_id < vocab_size:
            pairs = Counter()
            for w, n in words.items():
                for pair in zip(w, w[1:]):
                    pairs[pair] += n
            if not pairs:
                break
            best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))  # ties broken by id: deterministic
            merges.append(best)
            words = {merge(w, best, new_id): n for w, n in words.items()}
            new_id += 1
        return Tokenizer(merges)

    def encode_word(self, word):
        if word not in self.cache:
            ids = list(word.encode("utf-8"))
            while len(ids) > 1:
                pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, float("inf")))
                if pair not in self.ranks:
                    break
                ids = list(merge(ids, pair, 256 + len(SPECIALS) + self.ranks[pair]))
            self.cache[word] = ids
        return self.cache[word]

    def encode(self, text):
        return [i for w in WORDS.findall(text) for i in self.encode_word(w)]

    def decode(self, ids):
        """Text of the ids; special tokens are written by name."""
        out = b"".join(self.bytes_of[i] if i < 256 or i >= 256 + len(SPECIALS) else SPECIALS[i - 256].encode()
                       for i in ids)
        return out.decode("utf-8", errors="replace")

    def save(self, path):
        with open(path, "w") as f:
            json.dump({"specials": SPECIALS, "merges": self.merges}, f)

    @staticmethod
    def load(path):
        with open(path) as f:
            return Tokenizer(json.load(f)["merges"])


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


def mmss(seconds):
    s = int(round(seconds))
    return f"{s // 60:02d}:{s % 60:02d}"


def video_tokens(tok, clips, tokens_per_clip, integration="timestamp"):
    """Token ids for a video of len(clips) clips [(start, end) seconds]: <video> marks each visual position."""
    if integration not in INTEGRATIONS:
        raise ValueError(f"integration must be one of {INTEGRATIONS}, got {integration!r}")
    ids = []
    for start, end in clips:
        if integration.startswith("timestamp"):
            ids += tok.encode(f"clip from {mmss(start)}-{mmss(end)}:")
        if integration.endswith("start_end"):
            ids.append(VID_START)
        ids += [VIDEO] * tokens_per_clip
        if integration.endswith("start_end"):
            ids.append(VID_END)
    return ids + tok.encode("\n")


def format_mc(question, options):
    """The multiple-choice prompt: each option followed by its letter, as the answer (mc_answer) says it."""
    listed = ", ".join(f"{o} ({chr(65 + k)})" for k, o in enumerate(options))
    return f"Question: {question}\nOptions: {listed}\nAnswer:"


def mc_answer(options, letter, subject=None):
    """" blue (B)": the option, then its letter, written exactly as in the list of options. A from-scratch LM
    this small does not learn, in a CPU budget, to emit a letter whose option it must first work out (two hops,
    one letter of signal per question); once the option is said, " (B)" is a copy of what follows it in the
    prompt, the induction step that small transformers learn first. With a subject (the key of the fact asked
    about, questions.mc), the answer restates it first, " cross blue (B)", for the same reason: the option is
    then what follows "cross" in the caption (questions.caption), one more copy, not a hop back to the question."""
    restated = f"{subject} " if subject else ""
    return f" {restated}{options[ord(letter) - 65]} ({letter})"


def option_answers(tok, options, subject=None):
    """The ids of each option's answer (mc_answer), for scoring: what the model weighs, option by option (a
    subject's ids are the same in each, so they weigh what the model says after it)."""
    return [tok.encode(mc_answer(options, chr(65 + k), subject)) for k in range(len(options))]


def build_sample(tok, turns, video=None):
    """ids and labels for <bos> [video ids] prompt1 answer1 \n prompt2 answer2 ... <eos>: a conversation of
    (prompt, answer) turns about one video, the loss on the answers and the final <eos> only."""
    ids, labels = [BOS] + list(video or []), [IGNORE] * (1 + len(video or []))
    for k, (prompt, answer) in enumerate(turns):
        p, a = tok.encode(prompt), tok.encode(answer) + ([EOS] if k == len(turns) - 1 else tok.encode("\n"))
        ids += p + a
        labels += [IGNORE] * len(p) + a
    return ids, labels
