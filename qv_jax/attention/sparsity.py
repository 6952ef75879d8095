"""Unified sparse attention settings (DuoAttention static sparsity + LServe page selection) and head reordering.

:class:`SparsityConfig` says which KV heads of each layer are *streaming* heads (they attend to the first ``sink``
tokens and the ``local`` most recent ones, and keep a constant-size cache) and how *retrieval* heads decode over a
paged cache (pages of ``page_size`` tokens, each cut into logical pages of ``logical_page_size`` tokens whose key
minima / maxima score the page; ``token_budget`` tokens read per step, selection reused for ``reselect_every``
steps). See docs/attention.md, "Sparse decoding".

DuoAttention's released patterns (``full_attention_heads.tsv``: one row per layer, one gate in [0, 1] per KV head)
become a streaming-head mask with :func:`load_duo_attention_heads` / :meth:`SparsityConfig.from_duo_attention`.

:func:`reorder_heads` permutes a model's attention weights so that in every layer the retrieval heads come first;
each group of heads is then one contiguous slice of the KV-head axis (no gathers at run time). The permutation
changes nothing the model computes: a KV head moves together with its query heads, their biases and their rows of
the output projection.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import numpy as np

from qv_jax.attention.sparse import BACKENDS, KERNELS, kernel_impl
from qv_jax.errors import ConfigError

TSV_NAME = "full_attention_heads.tsv"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _mask_tuple(mask) -> tuple[tuple[bool, ...], ...]:
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise ConfigError(f"streaming_heads must be a [layers, kv_heads] boolean array, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.all((arr == 0) | (arr == 1)):
            raise ConfigError("streaming_heads must be boolean (or 0/1): True marks a streaming head")
        arr = arr.astype(bool)
    return tuple(tuple(bool(x) for x in row) for row in arr)


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """How a model decodes sparsely; frozen and hashable (a static argument of jitted steps).

    ``streaming_heads``: ``[layers, kv_heads]`` booleans (True = streaming head) or ``None`` for none.
    ``sink`` / ``local``: what a streaming head sees — the first ``sink`` tokens of its row and the ``local`` most
    recent ones (itself included).
    ``page_size`` / ``logical_page_size``: retrieval-head pages and the sub-pages whose key min / max score them.
    ``token_budget``: tokens a retrieval head reads per decode step (``budget / page_size - 1`` selected pages plus
    the newest page); ``None`` reads every page (no dynamic sparsity).
    ``reselect_every``: decode steps a selection is reused for.
    ``backend``: ``"xla"`` (jnp references), ``"interpret"`` or ``"pallas"``; ``None`` picks ``"xla"`` on CPU and
    ``"pallas"`` on TPU / GPU. ``kernel``: ``"tpu"`` or ``"gpu"`` for the Pallas backends (default: the device's;
    ``"tpu"`` when interpreting).
    """

    streaming_heads: tuple[tuple[bool, ...], ...] | None = None
    sink: int = 64
    local: int = 256
    page_size: int = 64
    logical_page_size: int = 16
    token_budget: int | None = 4096
    reselect_every: int = 4
    backend: str | None = None
    kernel: str | None = None

    def __post_init__(self):
        if self.streaming_heads is not None:
            object.__setattr__(self, "streaming_heads", _mask_tuple(self.streaming_heads))
        if self.sink < 0 or self.local < 1:
            raise ConfigError(f"need sink >= 0 and local >= 1, got sink={self.sink}, local={self.local}")
        if self.page_size < 1 or self.logical_page_size < 1 or self.page_size % self.logical_page_size:
            raise ConfigError(
                f"page_size ({self.page_size}) must be a positive multiple of logical_page_size "
                f"({self.logical_page_size})"
            )
        if self.token_budget is not None and (
            self.token_budget % self.page_size or self.token_budget < 2 * self.page_size
        ):
            raise ConfigError(
                f"token_budget ({self.token_budget}) must be a multiple of page_size ({self.page_size}) and at least "
                "two pages (one selected page plus the newest)"
            )
        if self.reselect_every < 1:
            raise ConfigError(f"reselect_every must be >= 1, got {self.reselect_every}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r}: expected one of {BACKENDS} or None")
        if self.kernel is not None and self.kernel not in KERNELS:
            raise ConfigError(f"kernel={self.kernel!r}: expected one of {KERNELS} or None")

    @classmethod
    def from_duo_attention(
        cls,
        path: str | os.PathLike,
        *,
        sparsity: float | None = 0.5,
        threshold: float | None = None,
        **kwargs,
    ) -> SparsityConfig:
        """A config whose streaming heads come from a DuoAttention pattern (see :func:`load_duo_attention_heads`)."""
        mask = load_duo_attention_heads(path, sparsity=None if threshold is not None else sparsity, threshold=threshold)
        return cls(streaming_heads=mask, **kwargs)

    # ---- derived sizes -----------------------------------------------------------------------------------------

    @property
    def capacity_multiple(self) -> int:
        """Cache capacities are rounded up to this: whole pages, and 128 logical pages (the TPU lane width)."""
        return math.lcm(self.page_size, 128 * self.logical_page_size)

    @property
    def stream_slots(self) -> int:
        """Slots of a streaming head's buffer: sink + ring, rounded up to whole pages."""
        return _round_up(self.sink + self.local, self.page_size)

    @property
    def num_selected_pages(self) -> int | None:
        """Pages a retrieval head reads per step once the context exceeds the budget (the newest included)."""
        return None if self.token_budget is None else self.token_budget // self.page_size

    def padded_capacity(self, slots: int) -> int:
        """Cache slots actually allocated for ``slots``: rounded up to :attr:`capacity_multiple`."""
        return _round_up(max(int(slots), 1), self.capacity_multiple)

    def stored_selection(self, capacity: int) -> int:
        """Selected pages a retrieval head stores besides the newest in a cache of ``capacity`` (padded) slots; a
        budget past the capacity never selects, and its page list is every page."""
        if self.token_budget is None:
            return 0
        return min(self.num_selected_pages, capacity // self.page_size) - 1

    def streaming_mask(self, num_layers: int, num_kv_heads: int) -> np.ndarray:
        """``[layers, kv_heads]`` bool; raises :class:`ConfigError` if the shape does not fit the model."""
        if self.streaming_heads is None:
            return np.zeros((num_layers, num_kv_heads), bool)
        mask = np.array(self.streaming_heads, bool)
        if mask.shape != (num_layers, num_kv_heads):
            raise ConfigError(
                f"streaming_heads has shape {mask.shape} but the model has {num_layers} layers of {num_kv_heads} "
                "KV heads"
            )
        return mask

    def retrieval_heads(self, num_layers: int, num_kv_heads: int) -> tuple[int, ...]:
        """Retrieval heads per layer."""
        return tuple(int(n) for n in (~self.streaming_mask(num_layers, num_kv_heads)).sum(axis=1))

    def retrieval_first(self) -> SparsityConfig:
        """The same config with each layer's heads listed retrieval first (the layout after :func:`reorder_heads`)."""
        if self.streaming_heads is None:
            return self
        return dataclasses.replace(self, streaming_heads=tuple(tuple(sorted(row)) for row in self.streaming_heads))

    def resolve_backend(self) -> tuple[str, str | None]:
        """``(backend, kernel)`` to run: ``None`` entries filled in from the current JAX platform."""
        backend = self.backend or ("xla" if jax.default_backend() == "cpu" else "pallas")
        impl, _ = kernel_impl(backend, self.kernel)
        return backend, None if impl == "reference" else impl


# ---------------------------------------------------------------------------------------------------------------
# DuoAttention patterns


def load_duo_attention_heads(
    path: str | os.PathLike, *, sparsity: float | None = None, threshold: float | None = None
) -> np.ndarray:
    """Streaming-head mask ``[layers, kv_heads]`` from DuoAttention's ``full_attention_heads.tsv``.

    ``path`` is the file or a directory holding it. Gates are clipped to [0, 1]. Give exactly one of:

    - ``sparsity`` (fraction of streaming heads, DuoAttention's deployment rule): the heads whose gate lies below
      the ``sparsity`` quantile of all gates become streaming heads. DuoAttention breaks ties at the threshold with
      random noise; here the same number of heads, ``ceil(sparsity * (n - 1))`` of ``n``, is taken in order of gate
      and then of (layer, head), so the result is deterministic.
    - ``threshold``: heads with a gate below it are streaming heads.
    """
    file = Path(path)
    if file.is_dir():
        file = file / TSV_NAME
    if not file.is_file():
        raise ConfigError(f"{file}: no DuoAttention pattern file ({TSV_NAME})")
    if (sparsity is None) == (threshold is None):
        raise ConfigError("give exactly one of sparsity= (fraction of streaming heads) or threshold=")
    try:
        gates = np.loadtxt(file, dtype=np.float64, delimiter="\t", ndmin=2)
    except ValueError as e:
        raise ConfigError(f"{file}: not a tab-separated table of gates ({e})") from e
    if gates.size == 0 or not np.all(np.isfinite(gates)):
        raise ConfigError(f"{file}: expected one row of finite gates per layer, got shape {gates.shape}")
    gates = np.clip(gates, 0.0, 1.0)
    if threshold is not None:
        return gates < threshold
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity must be in [0, 1], got {sparsity}")
    n = gates.size
    count = n if sparsity >= 1.0 else math.ceil(sparsity * (n - 1))
    order = np.argsort(gates.reshape(-1), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[:count]] = True
    return mask.reshape(gates.shape)


# ---------------------------------------------------------------------------------------------------------------
# head reordering

# per-layer attention parameters and the axis that indexes heads; "kv" axes hold KV heads, "q" axes query heads
_HEAD_AXES = {"q": ("q", 1), "q_bias": ("q", 0), "o": ("q", 0), "k": ("kv", 1), "k_bias": ("kv", 0)}
_HEAD_AXES |= {"v": ("kv", 1), "v_bias": ("kv", 0)}


def head_permutations(streaming_mask: np.ndarray, num_heads: int) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per layer, ``(kv_order, q_order)`` putting retrieval heads first (stable), or ``None`` if already ordered."""
    mask = np.asarray(streaming_mask, bool)
    groups = num_heads // mask.shape[1]
    perms = []
    for row in mask:
        kv = np.argsort(row, kind="stable")
        if np.array_equal(kv, np.arange(row.size)):
            perms.append(None)
            continue
        q = (kv[:, None] * groups + np.arange(groups)[None, :]).reshape(-1)
        perms.append((kv, q))
    return perms


def reorder_heads(state, streaming_mask, *, num_heads: int):
    """A copy of an NNX model state with, in every decoder layer, the retrieval KV heads first.

    Moves each KV head's k / v weights and biases together with its group's query weights, biases and output
    projection rows, so the model computes the same function. The input state is not modified.
    """
    import jax.numpy as jnp
    from flax import nnx

    perms = head_permutations(streaming_mask, num_heads)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if len(path) == 4 and path[:2] == ("text", "layers") and path[3] in _HEAD_AXES:
            perm = perms[path[2]]
            if perm is not None:
                which, axis = _HEAD_AXES[path[3]]
                order = perm[0] if which == "kv" else perm[1]
                var = var.replace(value=jnp.take(var.get_value(), jnp.asarray(order), axis=axis))
        flat.append((path, var))
    return nnx.from_flat_state(flat)
