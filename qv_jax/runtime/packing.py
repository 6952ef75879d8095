"""Prepacking: prompts of different lengths prefilled together as packed sequences, then decoded as one batch.

Prompts are packed by best-fit decreasing into bins (:func:`best_fit_decreasing`), one sequence per bin, each
prompt at its own positions (restarting per prompt) and attending only to itself (its segment id in the bin:
block-diagonal causal attention). Each prompt's last token is held back: it is the first decode input, so the
prefill needs no logits at all. :func:`prefill_packed` runs the bins and moves each prompt's keys / values into
its own row of a dense decode cache, left-padded so every row's history ends at the same slot. Bins, bin lengths
and decode rows are padded to a few sizes (:func:`bucket`), so a new mix of lengths reuses compiled steps.
See docs/videoqa.md ("Many prompts, many questions").
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.attention import calls
from qv_jax.attention.backends import AttentionConfig
from qv_jax.cache.dense import KVCache
from qv_jax.errors import InputError

Array = jax.Array

# The smallest bin length: shorter bins would only add compiled shapes.
MIN_BIN_TOKENS = 32


def bucket(n: int, smallest: int = 1) -> int:
    """The padded size of a bin, a bin count or a decode batch: the smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
    (powers of two and their halfway points, so at most a third is padding) that is ``>= max(n, smallest)``."""
    n = max(int(n), int(smallest))
    power = 1 << (n - 1).bit_length()
    return power * 3 // 4 if power >= 4 and power * 3 // 4 >= n else power


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into bins of ``capacity`` tokens, each item whole in one bin.

    Items go longest first (ties: input order) into the fullest bin that still has room (ties: the earliest bin),
    or into a new bin. Items of length 0 take no room and go nowhere. :class:`InputError` for an item longer than
    ``capacity`` or a negative one.
    """
    if capacity < 1:
        raise InputError(f"bin capacity must be >= 1 token, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n < 0:
            raise InputError(f"lengths must be >= 0, got {n} at index {i}")
        if n > capacity:
            raise InputError(f"item {i} has {n} tokens, more than the bin capacity of {capacity}")
        if n == 0:
            continue
        fits = [b for b in range(len(bins)) if room[b] >= n]
        if fits:
            b = min(fits, key=lambda b: room[b])
            bins[b].append(i)
            room[b] -= n
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Host arrays of a packed prefill of ``P`` prompts into ``bins`` sequences of ``L`` tokens (both bucketed),
    and where each prompt lies: bin ``bin_of [P]``, first slot ``start [P]``, ``length [P]`` tokens (0 for a
    one-token prompt, whose only token is held back). ``segment_ids`` is a prompt's place in its bin, -1 on
    padding. ``rows`` is the bucketed decode batch (``>= P``)."""

    ids: np.ndarray  # [bins, L]
    positions: np.ndarray  # [3, bins, L]
    segment_ids: np.ndarray  # [bins, L]
    bin_of: np.ndarray  # [P]
    start: np.ndarray  # [P]
    length: np.ndarray  # [P]
    rows: int

    @property
    def history(self) -> int:
        """Decode-cache slots before the first decode token: the longest prefilled prompt, bucketed."""
        return bucket(int(self.length.max(initial=0)), MIN_BIN_TOKENS)

    def place(self, values: Sequence[np.ndarray], fill=0) -> np.ndarray:
        """``values[p] [..., length[p]]`` (one array per prompt) laid out as ``[..., bins, L]``."""
        bins, width = self.ids.shape
        lead = np.asarray(values[0]).shape[:-1]
        out = np.full((*lead, bins, width), fill, np.asarray(values[0]).dtype)
        for p, value in enumerate(values):
            out[..., self.bin_of[p], self.start[p] : self.start[p] + self.length[p]] = value
        return out


def pack_prompts(
    prompts: Sequence[np.ndarray], positions: Sequence[np.ndarray], capacity: int | None = None
) -> PackedBatch:
    """Pack every prompt's ids ``[n]`` but the last (held back) at its own ``positions [3, n]``.

    ``capacity``: tokens per bin, by default the longest prefill; :class:`InputError` for an empty list, an empty
    prompt, or a prompt whose prefill (all but its last token) is longer than ``capacity``.
    """
    if not len(prompts):
        raise InputError("no prompts given")
    lengths = []
    for p, ids in enumerate(prompts):
        if np.asarray(ids).size == 0:
            raise InputError(f"prompt {p} is empty")
        lengths.append(np.asarray(ids).size - 1)
    cap = max(max(lengths), 1) if capacity is None else int(capacity)
    bins = best_fit_decreasing(lengths, cap)
    bin_of = np.zeros(len(prompts), np.int32)
    start = np.zeros(len(prompts), np.int32)
    for b, members in enumerate(bins):
        offset = 0
        for p in members:
            bin_of[p], start[p] = b, offset
            offset += lengths[p]
    # the bin length follows the capacity, not the fill, so a new mix of lengths under it compiles nothing new
    width = bucket(cap, MIN_BIN_TOKENS)
    layout = PackedBatch(
        ids=np.zeros((bucket(max(len(bins), 1)), width), np.int32),
        positions=np.zeros((3, bucket(max(len(bins), 1)), width), np.int32),
        segment_ids=np.zeros(0, np.int32),
        bin_of=bin_of,
        start=start,
        length=np.asarray(lengths, np.int32),
        rows=bucket(len(prompts)),
    )
    slot_of = np.zeros(len(prompts), np.int32)
    for members in bins:
        for k, p in enumerate(members):
            slot_of[p] = k
    return dataclasses.replace(
        layout,
        ids=layout.place([np.asarray(ids, np.int32)[:-1] for ids in prompts]),
        positions=layout.place([np.asarray(pos, np.int32)[:, :-1] for pos in positions]),
        segment_ids=layout.place([np.full(n, slot_of[p], np.int32) for p, n in enumerate(lengths)], fill=-1),
    )


class _Collect:
    """:class:`~qv_jax.model.KVHandler` of packed bins: block-diagonal causal attention through segment ids,
    keeping every layer's keys and values for the unpacking."""

    def __init__(self, segment_ids: Array, attention: AttentionConfig):
        self.segment_ids = segment_ids
        self.attention = attention
        self.k: list[Array] = []
        self.v: list[Array] = []

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        self.k.append(k_BKTH)
        self.v.append(v_BKTH)
        return calls.self_attention(self.attention, q_BNTH, k_BKTH, v_BKTH, causal=True, segment_ids=self.segment_ids)


@functools.partial(jax.jit, static_argnames=("graphdef", "history", "capacity"))
def prefill_packed(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    x_BLD: Array,
    positions_3BL: Array,
    segment_ids_BL: Array,
    bin_of_P: Array,
    start_P: Array,
    length_P: Array,
    *,
    history: int,
    capacity: int,
) -> KVCache:
    """Prefill the packed bins and return the decode cache: one row per prompt (``P`` rows, bucketed), its keys /
    values in slots ``[history - length, history)``, ``length`` at ``history``, ``capacity`` slots."""
    model = nnx.merge(graphdef, state)
    handler = _Collect(segment_ids_BL, model.attention)
    model.text(x_BLD, positions_3BL, handler)  # hidden states are not needed: the last tokens are decoded
    slot_S = jnp.arange(history)
    first_P = history - length_P
    held_PS = slot_S[None, :] >= first_P[:, None]
    src_PS = jnp.clip(start_P[:, None] + slot_S[None, :] - first_P[:, None], 0, x_BLD.shape[1] - 1)
    pad = ((0, 0), (0, 0), (0, capacity - history), (0, 0))

    def unpack(x_BKLH: Array) -> Array:
        rows_PSKH = x_BKLH.transpose(0, 2, 1, 3)[bin_of_P[:, None], src_PS]
        rows_PKSH = jnp.where(held_PS[:, :, None, None], rows_PSKH, 0).transpose(0, 2, 1, 3)
        return jnp.pad(rows_PKSH, pad)

    segment_ids = jnp.pad(jnp.where(held_PS, 0, -1), ((0, 0), (0, capacity - history)), constant_values=-1)
    return KVCache(
        k=tuple(unpack(k) for k in handler.k),
        v=tuple(unpack(v) for v in handler.v),
        segment_ids=segment_ids.astype(jnp.int32),
        length=jnp.int32(history),
    )
