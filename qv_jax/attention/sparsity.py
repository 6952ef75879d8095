"""Sparse decoding settings: DuoAttention's streaming heads and LServe's page selection, in one frozen config.

Streaming heads attend to the first ``sink`` tokens and the ``local`` most recent ones and keep a constant-size
cache; retrieval heads decode over a paged cache, reading ``token_budget`` tokens a step chosen page by page.
Which heads stream comes from a DuoAttention pattern (``qv_jax.attention.heads``). See docs/attention.md, "Sparse
decoding".
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from qv_jax.attention.backends import CHUNKED, REFERENCE, Backend, Kernel, kernel_impl, parse
from qv_jax.attention.heads import load_duo_attention_heads
from qv_jax.errors import ConfigError, InputError
from qv_jax.numeric import round_up


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
    ``backend``: ``"reference"`` / ``"chunked"`` (jnp), ``"interpret"`` or ``"pallas"``; ``None`` (or ``"auto"``)
    picks ``"chunked"`` on CPU and ``"pallas"`` on TPU / GPU. ``kernel``: ``"tpu"`` or ``"gpu"`` for the Pallas
    backends (default: the device's; ``"tpu"`` when interpreting).
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
        for name, kind in (("backend", Backend), ("kernel", Kernel)):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, parse(kind, value, name))
                except InputError as e:
                    raise ConfigError(f"{e} or None") from None

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
        return round_up(self.sink + self.local, self.page_size)

    @property
    def num_selected_pages(self) -> int | None:
        """Pages a retrieval head reads per step once the context exceeds the budget (the newest included)."""
        return None if self.token_budget is None else self.token_budget // self.page_size

    def padded_capacity(self, slots: int) -> int:
        """Cache slots actually allocated for ``slots``: rounded up to :attr:`capacity_multiple`."""
        return round_up(max(int(slots), 1), self.capacity_multiple)

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
        backend = self.backend
        if backend in (None, Backend.AUTO):
            backend = Backend.CHUNKED if jax.default_backend() == "cpu" else Backend.PALLAS
        impl, _ = kernel_impl(backend, self.kernel)
        return str(backend), None if impl in (REFERENCE, CHUNKED) else impl
