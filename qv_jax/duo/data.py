"""Synthetic multi-passkey retrieval samples made from the model's own tokenizer (nothing downloaded).

Each sample is filler text with passkeys (runs of random words) placed at sorted depths between 5 % and 95 %,
then a question asking for them and the passkeys again as the answer, teacher-forced: the answer tokens are the
positions whose hidden states DuoAttention's loss compares. See docs/duo.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qv_jax.errors import InputError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What are the pass keys? They are:"
# everyday words, so that a small tokenizer still encodes most as one or two tokens
WORDS = (
    "apple river stone cloud tiger music paper window garden silver orange winter summer yellow purple market "
    "bottle camera letter forest island bridge castle doctor engine flower guitar hammer jacket kitten ladder "
    "mirror needle ocean pencil rabbit saddle table violin wagon zebra anchor basket candle dragon eagle feather "
    "glove honey igloo jungle kettle lemon magnet noodle olive parrot quilt rocket sugar tomato umbrella velvet "
    "walnut yogurt planet meadow harbor lantern marble copper pepper thunder valley canyon desert glacier"
).split()


@dataclasses.dataclass(frozen=True)
class Sample:
    """``ids [T]`` int32 tokens and ``answer [T]`` float32, 1 at the answer positions."""

    ids: np.ndarray
    answer: np.ndarray


def sample_lengths(min_length: int, max_length: int, count: int = 8, multiple: int = 64) -> np.ndarray:
    """The few lengths samples take (rounded up to ``multiple``, so steps compile once per length)."""
    if min_length < 1 or max_length < min_length:
        raise InputError(f"need 1 <= min_length <= max_length, got {min_length}..{max_length}")
    lengths = np.ceil(np.linspace(min_length, max_length, count) / multiple) * multiple
    return np.unique(np.minimum(lengths, max_length).astype(int))


def passkey_sample(tokenizer, length: int, rng: np.random.Generator, *, passkeys: int = 10, words: int = 32) -> Sample:
    """One sample of exactly ``length`` tokens; passkeys shrink (fewer words, then fewer keys) until the needles
    and the answer take at most half of it."""
    filler = np.asarray(tokenizer.encode(FILLER), np.int32)
    question = np.asarray(tokenizer.encode(QUESTION), np.int32)
    for keys, count in _shapes(passkeys, words):
        phrases = [" ".join(rng.choice(WORDS, count)) for _ in range(keys)]
        needles = [
            np.asarray(tokenizer.encode(f" The pass key {i + 1} is {p}. "), np.int32) for i, p in enumerate(phrases)
        ]
        answer = np.asarray(tokenizer.encode(" " + "; ".join(phrases) + "."), np.int32)
        used = sum(n.size for n in needles) + question.size + answer.size
        if 2 * used <= length:
            break
    else:
        raise InputError(f"length {length} is too short for even one passkey of one word ({used} tokens of needles)")
    room = length - used
    body = np.resize(filler, room)
    depths = np.sort(rng.uniform(0.05, 0.95, keys))
    cuts = (depths * room).astype(int)
    pieces, start = [], 0
    for cut, needle in zip(cuts, needles, strict=True):
        pieces += [body[start:cut], needle]
        start = cut
    pieces += [body[start:], question, answer]
    ids = np.concatenate(pieces).astype(np.int32)
    mask = np.zeros(length, np.float32)
    mask[length - answer.size :] = 1.0
    return Sample(ids, mask)


def _shapes(passkeys: int, words: int):
    """(keys, words per key), largest first."""
    for count in range(words, 0, -1):
        yield passkeys, count
    for keys in range(passkeys - 1, 0, -1):
        yield keys, 1


def sample_for_step(tokenizer, lengths: np.ndarray, seed: int, step: int) -> Sample:
    """The sample of training step ``step``: a function of (seed, step) alone, so a resumed run sees the same."""
    rng = np.random.default_rng([seed, step])
    return passkey_sample(tokenizer, int(rng.choice(lengths)), rng)
