"""Sparse attention settings: DuoAttention's streaming heads, LServe's page selection and LongGen's hybrid layers,
in one frozen config.

Streaming heads attend to the first ``sink`` tokens and the ``local`` most recent ones and keep a constant-size
cache; retrieval heads decode over a paged cache, reading ``token_budget`` tokens a step chosen page by page.
Which heads stream comes from a DuoAttention pattern (``qv_jax.attention.heads``). A LongGen hybrid names each
layer ``"full"``, ``"streaming"`` (every head streams) or ``"strided"`` (local + strided blocks). See
docs/attention.md, "Sparse decoding" and "LongGen hybrid models".
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import numpy as np

from qv_jax.attention.backends import CHUNKED, REFERENCE, Backend, Kernel, kernel_impl, parse
from qv_jax.attention.heads import load_duo_attention_heads
from qv_jax.attention.patterns import HeadPattern
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


FULL, STREAMING, STRIDED = "full", "streaming", "strided"
LAYER_KINDS = (FULL, STREAMING, STRIDED)
# what to_dict writes: the architecture and decode settings; the backend is the loading machine's choice
_SAVED_FIELDS = (
    "layers",
    "streaming_heads",
    "sink",
    "local",
    "local_blocks",
    "vert_stride",
    "block",
    "page_size",
    "logical_page_size",
    "token_budget",
    "reselect_every",
)


def _layers_tuple(layers) -> tuple[str, ...]:
    if isinstance(layers, str):
        raise ConfigError(f"layers must be a sequence of layer kinds, got the string {layers!r}")
    out = tuple(layers)
    bad = [kind for kind in out if kind not in LAYER_KINDS]
    if not out or bad:
        raise ConfigError(f"layers must be a non-empty sequence of {LAYER_KINDS}, got {list(out)}")
    return out


def _int_or_none(value, may_be_none: bool) -> bool:
    return (value is None and may_be_none) or (isinstance(value, int) and not isinstance(value, bool))


def _middle_third(num_layers: int) -> range:
    """LongGen's full layers: the middle third (at least one), centred."""
    count = max(1, round(num_layers / 3))
    first = (num_layers - count) // 2
    return range(first, first + count)


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
    ``layers``: a LongGen hybrid's kind of each layer, ``"full"`` / ``"streaming"`` / ``"strided"`` (``None``: all
    full). Every head of a streaming layer streams (``sink`` + ``local``); ``streaming_heads`` may add DuoAttention
    streaming heads in the full layers. A strided layer's KV head ``h`` sees the ``local_blocks`` nearest
    ``block``-token blocks and every ``vert_stride``-th block from offset ``h % vert_stride``
    (:meth:`HeadPattern.strided`); ``block`` is a multiple of ``page_size`` so that decode reads whole pages.
    """

    streaming_heads: tuple[tuple[bool, ...], ...] | None = None
    sink: int = 64
    local: int = 256
    layers: tuple[str, ...] | None = None
    local_blocks: int = 1
    vert_stride: int = 8
    block: int = 64
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
        if self.layers is not None:
            object.__setattr__(self, "layers", _layers_tuple(self.layers))
            self._check_layers()
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

    def _check_layers(self) -> None:
        if self.streaming_heads is not None:
            if len(self.streaming_heads) != len(self.layers):
                raise ConfigError(
                    f"streaming_heads has {len(self.streaming_heads)} layers but layers names {len(self.layers)}"
                )
            strided = [i for i, kind in enumerate(self.layers) if kind == STRIDED and any(self.streaming_heads[i])]
            if strided:
                raise ConfigError(f"strided layers {strided} cannot have streaming heads")
        if STRIDED in self.layers:
            if self.local_blocks < 1 or self.vert_stride < 1:
                raise ConfigError(
                    f"strided layers need local_blocks >= 1 and vert_stride >= 1, got local_blocks="
                    f"{self.local_blocks}, vert_stride={self.vert_stride}"
                )
            if self.block < 1 or self.block % self.page_size:
                raise ConfigError(
                    f"block ({self.block}) must be a positive multiple of page_size ({self.page_size}): a strided "
                    "layer decodes whole blocks as pages"
                )

    @classmethod
    def longgen(
        cls,
        num_layers: int,
        full_layers: str | Sequence[int] = "middle",
        sparse: str = STREAMING,
        **kwargs,
    ) -> SparsityConfig:
        """LongGen's hybrid: full attention in ``full_layers`` (``"middle"``: the middle third, rounded, at least
        one), ``sparse`` (``"streaming"``: sink + window, or ``"strided"``: local + strided blocks) elsewhere.

        ``kwargs`` are the other fields (``sink``, ``local``, ``local_blocks``, ``vert_stride``, ``block``,
        ``streaming_heads`` for DuoAttention heads in the full layers, ...).
        """
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"num_layers must be a positive int, got {num_layers!r}")
        if sparse not in (STREAMING, STRIDED):
            raise ConfigError(f"sparse must be {STREAMING!r} or {STRIDED!r}, got {sparse!r}")
        if isinstance(full_layers, str):
            if full_layers != "middle":
                raise ConfigError(f"full_layers must be 'middle' or a sequence of layer indices, got {full_layers!r}")
            full = set(_middle_third(num_layers))
        else:
            full = {int(i) for i in full_layers}
            if any(not 0 <= i < num_layers for i in full):
                raise ConfigError(f"full_layers {sorted(full)} out of range for {num_layers} layers")
        if "layers" in kwargs:
            raise ConfigError("longgen() builds layers itself; give SparsityConfig(layers=...) for an explicit list")
        layers = tuple(FULL if i in full else sparse for i in range(num_layers))
        return cls(layers=layers, **kwargs)

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

    def layer_kinds(self, num_layers: int) -> tuple[str, ...]:
        """Each layer's kind (``"full"`` for all without ``layers``); :class:`ConfigError` if the count is wrong."""
        if self.layers is None:
            return (FULL,) * num_layers
        if len(self.layers) != num_layers:
            raise ConfigError(f"layers names {len(self.layers)} layers but the model has {num_layers}")
        return self.layers

    @property
    def is_hybrid(self) -> bool:
        """Whether some layer is not full attention (its prefill and training use :meth:`layer_patterns`)."""
        return self.layers is not None and any(kind != FULL for kind in self.layers)

    def streaming_mask(self, num_layers: int, num_kv_heads: int) -> np.ndarray:
        """``[layers, kv_heads]`` bool, every head of a streaming layer included; raises :class:`ConfigError` if
        the shape does not fit the model."""
        kinds = np.array(self.layer_kinds(num_layers))
        if self.streaming_heads is None:
            mask = np.zeros((num_layers, num_kv_heads), bool)
        else:
            mask = np.array(self.streaming_heads, bool)
            if mask.shape != (num_layers, num_kv_heads):
                raise ConfigError(
                    f"streaming_heads has shape {mask.shape} but the model has {num_layers} layers of "
                    f"{num_kv_heads} KV heads"
                )
        return mask | (kinds == STREAMING)[:, None]

    def strided_layers(self, num_layers: int) -> tuple[bool, ...]:
        """Per layer: whether it is a strided layer."""
        return tuple(kind == STRIDED for kind in self.layer_kinds(num_layers))

    def strided_pattern(self, head: int, kv_repeat: int = 1) -> HeadPattern:
        """The prefill pattern of KV head ``head`` of a strided layer: offsets spread over the stored heads, a
        mesh's ``kv_repeat`` replicas of one stored head share its offset."""
        offset = (head // kv_repeat) % self.vert_stride
        return HeadPattern.strided(self.local_blocks, self.vert_stride, offset, self.block)

    def layer_patterns(
        self, num_layers: int, num_kv_heads: int, kv_repeat: int = 1
    ) -> tuple[tuple[HeadPattern, ...], ...]:
        """Each layer's prefill pattern per KV head, in this config's head order (``ChunkAttention.layer_patterns``):
        dense for full / retrieval heads, ``streaming(sink, local)`` for streaming heads, strided in strided
        layers. ``kv_repeat``: consecutive KV heads that replicate one stored head (a mesh layout)."""
        mask = self.streaming_mask(num_layers, num_kv_heads)
        dense, stream = HeadPattern.dense(), HeadPattern.streaming(self.sink, self.local)
        out = []
        for strided, row in zip(self.strided_layers(num_layers), mask, strict=True):
            if strided:
                out.append(tuple(self.strided_pattern(h, kv_repeat) for h in range(num_kv_heads)))
            else:
                out.append(tuple(stream if s else dense for s in row))
        return tuple(out)

    # ---- serialisation -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-able dict of the architecture and decode settings (not ``backend`` / ``kernel``: the loading
        machine picks those)."""
        out = {name: getattr(self, name) for name in _SAVED_FIELDS}
        for name in ("layers", "streaming_heads"):
            if out[name] is not None:
                out[name] = [list(x) if isinstance(x, tuple) else x for x in out[name]]
        return out

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> SparsityConfig:
        """The config :meth:`to_dict` wrote (``overrides``: e.g. ``backend=``); :class:`ConfigError` if malformed."""
        if not isinstance(data, dict):
            raise ConfigError(f"a sparsity config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SAVED_FIELDS))
        if unknown:
            raise ConfigError(f"unknown sparsity config fields {unknown}")
        for name, value in data.items():
            if name not in ("layers", "streaming_heads") and not _int_or_none(value, name == "token_budget"):
                raise ConfigError(f"sparsity config field {name!r} must be an integer, got {value!r}")
        return cls(**data, **overrides)

    def retrieval_heads(self, num_layers: int, num_kv_heads: int) -> tuple[int, ...]:
        """Retrieval heads per layer."""
        return tuple(int(n) for n in (~self.streaming_mask(num_layers, num_kv_heads)).sum(axis=1))

    def with_duo_heads(self, mask) -> SparsityConfig:
        """This config with DuoAttention streaming heads ``mask [layers, kv_heads]`` in its full layers (a hybrid's
        streaming layers stream every head already and its strided layers have none).

        :class:`ConfigError` if some full layer streams heads already: a model saved so has its weights in that
        head order, which another pattern's heads do not name.
        """
        mask = np.array(_mask_tuple(mask))
        full = np.array(self.layer_kinds(len(mask))) == FULL
        if self.streaming_heads is not None and np.array(self.streaming_heads)[full].any():
            raise ConfigError(
                "the model's saved sparsity config streams DuoAttention heads in its full layers already (its weights "
                "are in that head order); another pattern cannot replace them"
            )
        return dataclasses.replace(self, streaming_heads=mask & full[:, None])

    def fold_replicas(self, kv_repeat: int) -> SparsityConfig:
        """The config of the stored KV heads when ``kv_repeat`` consecutive running heads replicate each (a mesh
        layout, ``qv_jax.sharding``)."""
        if self.streaming_heads is None or kv_repeat == 1:
            return self
        return dataclasses.replace(self, streaming_heads=np.array(self.streaming_heads)[:, ::kv_repeat])

    def retrieval_first(self) -> SparsityConfig:
        """The same config with each layer's heads listed retrieval first (the layout after :func:`reorder_heads`).

        Strided layers have no streaming heads, so their heads (and per-head offsets) keep their order.
        """
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
