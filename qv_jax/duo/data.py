"""Synthetic retrieval samples made from the model's own tokenizer (nothing downloaded).

A passkey sample is filler text with passkeys (runs of random words) placed at sorted depths between 5 % and 95 %,
then a question asking for them and the passkeys again as the answer, teacher-forced: the answer tokens are the
positions whose hidden states DuoAttention's loss compares. A video sample is a generated video (a drifting noise
texture) with a few solid-colour "needle" frames at sorted depths, asked which colours flashed, so that the heads
that retrieve over visual tokens are found too. See docs/duo.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qv_jax.errors import InputError

DATA_KINDS = ("passkey", "video", "both")
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


VIDEO_QUESTION = "Which colours flash on the screen, in order? They are:"
# needle colours: names a small tokenizer encodes in few tokens, RGB far apart from each other and the texture
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "orange": (240, 140, 20),
    "purple": (140, 40, 180),
}
VIDEO_FPS = 1.0  # the frame rate the video sample's temporal positions assume


@dataclasses.dataclass(frozen=True)
class Sample:
    """``ids [T]`` int32 tokens, ``answer [T]`` float32 (1 at the answer positions) and M-RoPE ``positions
    [3, T]`` int32; a video sample also has uint8 ``frames [F, H, W, 3]`` for its ``<|video_pad|>`` tokens."""

    ids: np.ndarray
    answer: np.ndarray
    positions: np.ndarray
    frames: np.ndarray | None = None


def _text_positions(length: int) -> np.ndarray:
    return np.broadcast_to(np.arange(length, dtype=np.int32), (3, length))


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
    return Sample(ids, mask, _text_positions(length))


def video_sample(model, length: int, rng: np.random.Generator, *, needles: int = 3) -> Sample:
    """One video sample of exactly ``length`` tokens for ``model`` (a ``VisionLanguageModel`` with a tokenizer):
    the chat prompt about a generated video at :data:`VIDEO_FPS`, with ``needles`` solid-colour temporal patches at
    sorted depths between 5 % and 95 %, the question, and the colours in order as the answer. Frames are 112 x 112
    (56 x 56 when the length leaves fewer than four temporal patches a needle)."""
    tokenizer, vision = model.tokenizer, model.config.vision
    unit = vision.patch_size * vision.spatial_merge_size
    step = vision.temporal_patch_size
    names = list(rng.choice(list(COLOURS), needles, replace=needles > len(COLOURS)))
    answer = np.asarray(tokenizer.encode(" " + ", ".join(names) + "."), np.int32)
    # the larger frames while they leave four patches a needle, else the smaller ones down to two a needle
    for side, least in ((4 * unit, 4 * needles), (2 * unit, 2 * needles + 2)):
        grid_hw = side // vision.patch_size
        per_patch = (side // unit) ** 2
        text = tokenizer.video_prompt(VIDEO_QUESTION, (1, grid_hw, grid_hw))
        room = length - (text.prefix.size + text.suffix.size + answer.size)
        patches = room // per_patch
        if patches >= least:
            break
    else:
        raise InputError(f"length {length} is too short for a video sample with {needles} needle frames")
    prompt = tokenizer.video_prompt(VIDEO_QUESTION, (patches, grid_hw, grid_hw))
    # the tokens the whole patches leave over: filler text after <|vision_end|>, so the length is exact
    rest = room - patches * per_patch
    filler = np.resize(np.asarray(tokenizer.encode(FILLER), np.int32), rest)
    suffix = np.concatenate([prompt.suffix[:1], filler, prompt.suffix[1:]])
    ids = np.concatenate([prompt.prefix, prompt.video, suffix, answer]).astype(np.int32)
    frames = _texture_frames(patches * step, side, rng)
    where = np.sort(rng.choice(np.arange(round(0.05 * patches), round(0.95 * patches)), needles, replace=False))
    for patch, name in zip(where, names, strict=True):
        frames[patch * step : (patch + 1) * step] = COLOURS[name]
    grid = np.array([[patches, grid_hw, grid_hw]])  # in patches: t counts frame pairs
    positions, _ = model.position_ids(ids[None], video_grid_thw=grid, second_per_grid_ts=[step / VIDEO_FPS])
    mask = np.zeros(length, np.float32)
    mask[length - answer.size :] = 1.0
    return Sample(ids, mask, positions[:, 0].astype(np.int32), frames)


def _texture_frames(count: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` frames of a low-contrast noise texture drifting one pixel a frame (uint8 ``[count, side, side,
    3]``): every frame differs, none is a solid colour."""
    texture = rng.integers(64, 160, (side, 2 * side, 3), dtype=np.uint8)
    shifts = np.arange(count) % side
    columns = (shifts[:, None] + np.arange(side)[None, :]) % (2 * side)
    return texture[:, columns].transpose(1, 0, 2, 3).copy()


def _shapes(passkeys: int, words: int):
    """(keys, words per key), largest first."""
    for count in range(words, 0, -1):
        yield passkeys, count
    for keys in range(passkeys - 1, 0, -1):
        yield keys, 1


def sample_for_step(model, lengths: np.ndarray, seed: int, step: int, data: str = "both", row: int = 0) -> Sample:
    """Sample ``row`` of training step ``step`` for ``model``: a function of (seed, step, row) alone, so a resumed
    run sees the same. ``data``: ``"passkey"``, ``"video"`` or ``"both"`` (passkey on even steps, video on odd
    ones); a step's rows share its kind and length."""
    if data not in DATA_KINDS:
        raise InputError(f"data must be one of {', '.join(DATA_KINDS)}, got {data!r}")
    length = int(np.random.default_rng([seed, step]).choice(lengths))
    rng = np.random.default_rng([seed, step, row])
    if data == "video" or (data == "both" and step % 2):
        return video_sample(model, length, rng)
    return passkey_sample(model.tokenizer, length, rng)
