"""The dense KV cache: preallocated, fixed capacity, one ``[B, K, S, H]`` key and value array per layer.

Slots fill left to right at a write offset ``length`` shared by the rows (prompts are left-padded, so decoding
appends to all rows at once). ``segment_ids [B, S]`` say what a slot holds: a non-negative id for a real token,
``-1`` for padding and unwritten slots. Causality is by slot, not by rotary position (M-RoPE positions of vision
tokens are not monotonic). Keys are stored after RoPE. A pytree that jitted steps donate and update in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qv_jax.attention import calls
from qv_jax.attention.backends import AttentionConfig
from qv_jax.errors import InputError
from qv_jax.sharding.layout import layout_field

Array = jax.Array


def replace_layer(per_layer: tuple, layer: int, value) -> tuple:
    """``per_layer`` with entry ``layer`` replaced by ``value``."""
    return (*per_layer[:layer], value, *per_layer[layer + 1 :])


class CacheShape:
    """Shape properties every cache shares: per-layer ``k``, slots on the last axis of ``segment_ids [B, S]``."""

    k: tuple[Array, ...]
    segment_ids: Array

    @property
    def batch(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def capacity(self) -> int:
        return self.segment_ids.shape[-1]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds."""
        return int(sum(x.nbytes for x in jax.tree.leaves(self)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache(CacheShape):
    """Per-layer keys and values ``[B, K, S, H]``, slot segment ids ``[B, S]`` and the shared fill ``length``."""

    k: tuple[Array, ...] = layout_field("BKSH")
    v: tuple[Array, ...] = layout_field("BKSH")
    segment_ids: Array = layout_field("BS")
    length: Array = layout_field("")

    @classmethod
    def create(
        cls, *, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
    ) -> KVCache:
        """An empty cache (every slot segment ``-1``, ``length`` 0)."""
        if min(num_layers, batch, capacity, num_kv_heads, head_dim) <= 0:
            raise InputError(
                f"cache sizes must be positive: layers={num_layers} batch={batch} capacity={capacity} "
                f"kv_heads={num_kv_heads} head_dim={head_dim}"
            )
        shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            segment_ids=jnp.full((batch, capacity), -1, jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    def with_segments(self, start: Array, segment_ids_BT: Array) -> KVCache:
        """Mark slots ``[start, start + T)`` with the segment ids of a chunk about to be written."""
        seg = jax.lax.dynamic_update_slice(self.segment_ids, segment_ids_BT.astype(jnp.int32), (0, start))
        return dataclasses.replace(self, segment_ids=seg)

    def write(self, layer: int, start: Array, k_BKTH: Array, v_BKTH: Array) -> KVCache:
        """Store one layer's keys / values for slots ``[start, start + T)``."""
        k = jax.lax.dynamic_update_slice(self.k[layer], k_BKTH.astype(self.k[layer].dtype), (0, 0, start, 0))
        v = jax.lax.dynamic_update_slice(self.v[layer], v_BKTH.astype(self.v[layer].dtype), (0, 0, start, 0))
        return dataclasses.replace(self, k=replace_layer(self.k, layer, k), v=replace_layer(self.v, layer, v))


class DenseCacheAttention:
    """The :class:`~qv_jax.model.qwen2_5_vl.KVHandler` of chunked prefill and decoding over a :class:`KVCache`.

    For a chunk of ``T`` tokens written at the cache's current ``length``: each layer's keys / values go into their
    slots, then the chunk attends causally to itself and to the filled slots before it (of its rows' segments),
    through ``qv_jax.attention.calls`` (one decode token: the decode call over the cache). After the last layer,
    :attr:`cache` holds the updated cache with ``length`` advanced by ``T``.

    The caller guarantees ``length + T <= capacity`` (checked on the host by the runtime; inside ``jit`` an
    overflowing write would be clamped by XLA, not reported).
    """

    def __init__(self, cache: KVCache, segment_ids_BT: Array, attention: AttentionConfig):
        self.start = cache.length
        self.num_tokens = segment_ids_BT.shape[1]
        self.q_segment_ids = segment_ids_BT
        self.attention = attention
        # what the slots before the chunk hold (later slots: the chunk itself, or not written yet)
        self.earlier = jnp.where(jnp.arange(cache.capacity) < self.start, cache.segment_ids, -1)
        self._cache = cache.with_segments(self.start, segment_ids_BT)

    @property
    def cache(self) -> KVCache:
        return dataclasses.replace(self._cache, length=self.start + self.num_tokens)

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        self._cache = self._cache.write(layer, self.start, k_BKTH, v_BKTH)
        k_BKSH, v_BKSH = self._cache.k[layer], self._cache.v[layer]
        if self.num_tokens == 1:
            out, _ = calls.decode_attention(
                self.attention,
                q_BNTH,
                k_BKSH,
                v_BKSH,
                kv_segment_ids=self._cache.segment_ids,
                q_segment_ids=self.q_segment_ids,
            )
            return out
        out, _ = calls.append_attention(
            self.attention,
            q_BNTH,
            k_BKTH,
            v_BKTH,
            self.q_segment_ids,
            k_memory=k_BKSH,
            v_memory=v_BKSH,
            memory_segment_ids=self.earlier,
        )
        return out
