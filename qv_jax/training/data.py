"""Training data: packed rows of documents from a token file, a text file or a synthetic long-range task.

Every source makes the batch of a step from an integer *position* alone (:meth:`DataSource.batch` returns the
next one), so a checkpoint that stores the position resumes on exactly the data the uninterrupted run would see.
A :class:`Batch` is ``rows x seq_len`` tokens, several documents per row: ``segment_ids`` number them within the
row (-1 on padding), ``positions`` restart at 0 for each, and ``loss_mask`` says which next-token predictions
count (never across a document boundary, never on padding). See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from qv_jax.errors import InputError
from qv_jax.runtime.packing import best_fit_decreasing

SYNTHETIC = ("copy", "passkey")
ALPHABET = 64  # content tokens of the synthetic tasks: ids 0..63
KEY_TOKENS = 8  # tokens of a passkey


@dataclasses.dataclass(frozen=True)
class Batch:
    """Host arrays ``[rows, seq_len]``: ``ids``, ``segment_ids`` (document within the row, -1 = padding),
    ``positions`` (restarting per document) and ``loss_mask`` (1 where predicting the next token counts)."""

    ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray

    @property
    def tokens(self) -> int:
        """Tokens that are not padding (what tokens/s counts)."""
        return int((self.segment_ids >= 0).sum())


def next_token_mask(segment_ids: np.ndarray) -> np.ndarray:
    """``[rows, seq_len]`` float32, 1 where the next token is of the same document (no prediction across a
    boundary, from padding or of the last slot)."""
    mask = np.zeros(segment_ids.shape, np.float32)
    mask[:, :-1] = (segment_ids[:, :-1] >= 0) & (segment_ids[:, :-1] == segment_ids[:, 1:])
    return mask


def pack_pieces(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, rows: int, seq_len: int) -> Batch:
    """Pieces ``tokens[starts[i]:ends[i]]`` (each <= ``seq_len``) laid into ``rows`` rows by best-fit decreasing;
    :class:`InputError` if they do not fit."""
    bins = best_fit_decreasing(list(ends - starts), seq_len)
    if len(bins) > rows:
        raise InputError(f"{len(starts)} pieces need {len(bins)} rows of {seq_len} tokens, the batch has {rows}")
    ids = np.zeros((rows, seq_len), np.int32)
    segments = np.full((rows, seq_len), -1, np.int32)
    positions = np.zeros((rows, seq_len), np.int32)
    for row, members in enumerate(bins):
        offset = 0
        for segment, i in enumerate(sorted(members)):
            n = int(ends[i] - starts[i])
            ids[row, offset : offset + n] = tokens[starts[i] : ends[i]]
            segments[row, offset : offset + n] = segment
            positions[row, offset : offset + n] = np.arange(n)
            offset += n
    return Batch(ids, segments, positions, next_token_mask(segments))


class DataSource:
    """What the training loop reads: ``batch(position, rows, seq_len) -> (Batch, next position)``."""

    name: str = ""

    def batch(self, position: int, rows: int, seq_len: int) -> tuple[Batch, int]:
        raise NotImplementedError


class TokenDocuments(DataSource):
    """Documents of a 1-D array of token ids, each ending with (and including) the ``separator`` id.

    A document longer than a row is cut into pieces of ``seq_len`` tokens (each a document of its own, positions
    restarting). A batch takes the next pieces in file order while best-fit decreasing fits them into the rows;
    the position is the index of the next piece, and the file starts over at its end.
    """

    def __init__(self, tokens: np.ndarray, separator: int, *, name: str = "tokens"):
        if tokens.ndim != 1 or not tokens.size:
            raise InputError(f"{name}: no tokens (an empty file or an array that is not 1-D)")
        self.tokens, self.separator, self.name = tokens, int(separator), name
        ends = np.flatnonzero(tokens == separator) + 1
        if not ends.size or ends[-1] != tokens.size:
            ends = np.append(ends, tokens.size)
        self.doc_starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        self.doc_ends = ends.astype(np.int64)
        self._pieces_for = None

    @property
    def documents(self) -> int:
        return int(self.doc_starts.size)

    def pieces(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, ends)`` of the documents cut into pieces of at most ``seq_len`` tokens."""
        if self._pieces_for is None or self._pieces_for[0] != seq_len:
            counts = -(-(self.doc_ends - self.doc_starts) // seq_len)
            first = np.repeat(self.doc_starts, counts)
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            starts = first + within * seq_len
            ends = np.minimum(starts + seq_len, np.repeat(self.doc_ends, counts))
            self._pieces_for = (seq_len, starts, ends)
        return self._pieces_for[1], self._pieces_for[2]

    def batch(self, position: int, rows: int, seq_len: int) -> tuple[Batch, int]:
        starts, ends = self.pieces(seq_len)
        count = starts.size
        take, room = [], rows * seq_len
        while len(take) < count:
            i = (position + len(take)) % count
            if ends[i] - starts[i] > room:
                break
            take.append(i)
            room -= ends[i] - starts[i]
        # the total fits but the bins may not: hand back the last pieces until they do
        while len(take) > 1 and len(best_fit_decreasing(list(ends[take] - starts[take]), seq_len)) > rows:
            take.pop()
        batch = pack_pieces(self.tokens, starts[take], ends[take], rows, seq_len)
        return batch, (position + len(take)) % count


def _check_ids(tokens: np.ndarray, vocab_size: int, name: str) -> None:
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f"{name}: token ids must be integers, got dtype {tokens.dtype}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise InputError(f"{name}: token id {bad} is outside the model's vocabulary of {vocab_size} ids")


def read_tokens(path: str | os.PathLike, *, vocab_size: int, tokenizer=None) -> np.ndarray:
    """Token ids of a data file, memory-mapped where it can be: ``.npy`` (any integer dtype, 1-D), ``.bin``
    (raw little-endian uint32), or ``.txt`` (one document, encoded with ``tokenizer``). :class:`InputError` for
    an empty or unreadable file, another suffix, or ids outside ``[0, vocab_size)``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'not a file' if path.exists() else 'no such data file'}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty data file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
        elif suffix == ".bin":
            if path.stat().st_size % 4:
                raise InputError(f"{path}: {path.stat().st_size} bytes is not a whole number of uint32 token ids")
            tokens = np.memmap(path, dtype="<u4", mode="r")
        elif suffix == ".txt":
            if tokenizer is None:
                raise InputError(f"{path}: a text file needs the model's tokenizer (tokenizer.json), it has none")
            tokens = np.asarray(tokenizer.encode(path.read_text()), np.int64)
        else:
            raise InputError(f"{path}: unknown data file kind {suffix!r} (expected .npy, .bin or .txt)")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: cannot read token ids ({type(e).__name__}: {e})") from e
    if tokens.ndim != 1 or tokens.size == 0:
        raise InputError(f"{path}: expected a non-empty 1-D array of token ids, got shape {tokens.shape}")
    _check_ids(tokens, vocab_size, str(path))
    return tokens


class Synthetic(DataSource):
    """A long-range task, one document per row, a function of ``(seed, position)`` alone.

    ``copy``: ``x MARK x SEP`` with ``x`` random content tokens; only the second ``x`` (and the separator) is
    scored, so the loss falls only as far as the model learns to copy from far back. ``passkey``: random filler
    with ``MARK key`` at a random depth, then ``MARK key SEP`` at the end; only the final key is scored.
    Content tokens are ids ``0..63``, ``MARK`` is 64.
    """

    def __init__(self, task: str, *, separator: int, vocab_size: int, seed: int = 0):
        if task not in SYNTHETIC:
            raise InputError(f"unknown synthetic task {task!r}; choose one of {', '.join(SYNTHETIC)}")
        if vocab_size <= ALPHABET or not 0 <= separator < vocab_size or separator <= ALPHABET:
            raise InputError(f"synthetic tasks need a vocabulary over {ALPHABET + 1} ids and a separator above them")
        self.task, self.separator, self.seed, self.name = task, int(separator), seed, f"synthetic:{task}"

    def batch(self, position: int, rows: int, seq_len: int) -> tuple[Batch, int]:
        if seq_len < 4 + 2 * KEY_TOKENS:
            raise InputError(f"synthetic tasks need seq_len >= {4 + 2 * KEY_TOKENS}, got {seq_len}")
        rng = np.random.default_rng([self.seed, position])
        ids = np.zeros((rows, seq_len), np.int32)
        segments = np.full((rows, seq_len), -1, np.int32)
        scored = np.zeros((rows, seq_len), bool)
        used = seq_len - 1  # at least one slot of padding
        for row in range(rows):
            if self.task == "copy":
                n = (used - 2) // 2
                x = rng.integers(0, ALPHABET, n)
                doc = np.concatenate([x, [ALPHABET], x, [self.separator]])
                first = n + 1  # the first copied token
            else:
                filler = rng.integers(0, ALPHABET, used)
                key = rng.integers(0, ALPHABET, KEY_TOKENS)
                tail = np.concatenate([[ALPHABET], key, [self.separator]])
                depth = rng.integers(0, used - 2 * tail.size + 1)
                doc = filler.copy()
                doc[depth : depth + tail.size - 1] = tail[:-1]
                doc[used - tail.size :] = tail
                first = used - tail.size + 1
            ids[row, : doc.size] = doc
            segments[row, : doc.size] = 0
            scored[row, first - 1 : doc.size - 1] = True  # predicting tokens first .. doc end
        positions = np.where(segments >= 0, np.arange(seq_len), 0).astype(np.int32)
        mask = next_token_mask(segments) * scored
        return Batch(ids, segments, positions, mask.astype(np.float32)), position + 1


def open_data(spec: str | os.PathLike, model, *, separator: int | None = None, seed: int = 0) -> DataSource:
    """The data source ``spec`` names for ``model``: ``synthetic:copy`` / ``synthetic:passkey`` or a file
    (:func:`read_tokens`); documents end with ``separator`` (default: the model's first end-of-sequence id)."""
    vocab = model.config.text.vocab_size
    if separator is None:
        if not model.eos_token_ids:
            raise InputError("the model names no end-of-sequence token: give the document separator id")
        separator = model.eos_token_ids[0]
    text = str(spec)
    if text.startswith("synthetic:"):
        return Synthetic(text.partition(":")[2], separator=separator, vocab_size=vocab, seed=seed)
    tokens = read_tokens(spec, vocab_size=vocab, tokenizer=model.tokenizer)
    if Path(spec).suffix.lower() == ".txt" and tokens[-1] != separator:
        tokens = np.append(tokens, separator)
    return TokenDocuments(tokens, separator, name=str(spec))
