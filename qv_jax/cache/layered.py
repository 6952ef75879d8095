"""The pruned KV memory of QuickPrefill: per-layer keys and values whose slots say which prompt token they hold.

Every layer keeps its own subset of each group's tokens, so a layer's fill and its slots' meaning are its own.
Each slot records the prompt *token index* it holds (``-1``: empty) and attention is causal by token index, not by
slot: a query sees earlier prompt tokens wherever compaction has put them. Keys are stored after RoPE. Batch is 1
(one video per memory); the ``B`` axis is kept so arrays have the layout every attention takes, ``[B, K, S, H]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qv_jax.attention import calls
from qv_jax.attention.backends import AttentionConfig
from qv_jax.cache.dense import replace_layer
from qv_jax.errors import InputError
from qv_jax.sharding.layout import layout_field

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayeredKV:
    """Keys / values ``[B, K, S, H]`` per layer, slot token indices ``[layers, B, S]`` (-1 empty), fills
    ``[layers]``.

    Layer ``l`` holds its tokens in slots ``[0, lengths[l])``; slots past the fill may hold stale data, always
    marked -1. A pytree: jitted steps take it donated and return the updated one.
    """

    k: tuple[Array, ...] = layout_field("BKSH")
    v: tuple[Array, ...] = layout_field("BKSH")
    token_index: Array = layout_field(".BS")
    lengths: Array = layout_field(".")

    @classmethod
    def create(
        cls, *, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32, batch: int = 1
    ) -> LayeredKV:
        if min(num_layers, capacity, num_kv_heads, head_dim, batch) <= 0:
            raise InputError(
                f"memory sizes must be positive: layers={num_layers} capacity={capacity} kv_heads={num_kv_heads} "
                f"head_dim={head_dim} batch={batch}"
            )
        shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            token_index=jnp.full((num_layers, batch, capacity), -1, jnp.int32),
            lengths=jnp.zeros((num_layers,), jnp.int32),
        )

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def capacity(self) -> int:
        return self.token_index.shape[-1]

    @property
    def dtype(self):
        return self.k[0].dtype

    @property
    def kv_bytes(self) -> int:
        """Bytes of the keys and values in filled slots, over every layer and KV head."""
        _, heads, _, head_dim = self.k[0].shape
        return int(jax.device_get(self.lengths).sum()) * 2 * heads * head_dim * jnp.dtype(self.dtype).itemsize

    def write_kv(self, layer: int, start: Array, k_BKTH: Array, v_BKTH: Array) -> LayeredKV:
        """Store keys / values of one layer in slots ``[start, start + T)``."""
        k = jax.lax.dynamic_update_slice(self.k[layer], k_BKTH.astype(self.dtype), (0, 0, start, 0))
        v = jax.lax.dynamic_update_slice(self.v[layer], v_BKTH.astype(self.dtype), (0, 0, start, 0))
        return dataclasses.replace(self, k=replace_layer(self.k, layer, k), v=replace_layer(self.v, layer, v))

    def write_index(self, layer: int, start: Array, index_BT: Array) -> LayeredKV:
        """Mark slots ``[start, start + T)`` of one layer as holding tokens ``index_BT`` (-1: empty)."""
        update = index_BT.astype(jnp.int32)[None]
        token_index = jax.lax.dynamic_update_slice(self.token_index, update, (layer, 0, start))
        return dataclasses.replace(self, token_index=token_index)

    def trimmed(self, capacity: int) -> LayeredKV:
        """The first ``capacity`` slots of every layer (must cover every layer's fill)."""
        return LayeredKV(
            k=tuple(a[:, :, :capacity] for a in self.k),
            v=tuple(a[:, :, :capacity] for a in self.v),
            token_index=self.token_index[:, :, :capacity],
            lengths=self.lengths,
        )

    def padded(self, capacity: int) -> LayeredKV:
        """A copy with ``capacity`` slots per layer, the new ones empty; no buffer is shared with this one."""
        extra = capacity - self.capacity
        if extra < 0:
            raise InputError(f"cannot pad a memory of {self.capacity} slots to {capacity}")
        grow = ((0, 0), (0, 0), (0, extra), (0, 0))
        return LayeredKV(
            k=tuple(jnp.pad(a, grow) for a in self.k),
            v=tuple(jnp.pad(a, grow) for a in self.v),
            token_index=jnp.pad(self.token_index, ((0, 0), (0, 0), (0, extra)), constant_values=-1),
            lengths=jnp.copy(self.lengths),  # a new buffer: a step may donate the copy, never the original
        )


class AppendAttention:
    """:class:`~qv_jax.model.KVHandler` that appends a chunk to every layer of a :class:`LayeredKV` and attends.

    The chunk's tokens have prompt indices ``token_index_BT``; ``valid_BT`` is False on trailing padding, which is
    stored as empty slots and later overwritten. Every token the memory holds precedes the chunk, so the chunk
    attends to all of it and causally to itself (``qv_jax.attention.calls.append_attention``). :attr:`cache`
    advances each layer's fill by the valid tokens.
    """

    def __init__(self, cache: LayeredKV, token_index_BT: Array, valid_BT: Array, attention: AttentionConfig):
        self._cache = cache
        self.attention = attention
        self.q_index = token_index_BT
        self.kv_index = jnp.where(valid_BT, token_index_BT, -1)
        self.segment_ids = jnp.where(valid_BT, 0, -1).astype(jnp.int32)
        self.num_valid = jnp.sum(valid_BT[0]).astype(jnp.int32)

    @property
    def cache(self) -> LayeredKV:
        return dataclasses.replace(self._cache, lengths=self._cache.lengths + self.num_valid)

    def append(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> tuple[Array, Array, Array]:
        """Write the chunk behind the layer's memory and attend over both; ``(start slot, out, lse)``."""
        start = self._cache.lengths[layer]
        before = self._cache.token_index[layer]
        self._cache = self._cache.write_kv(layer, start, k_BKTH, v_BKTH).write_index(layer, start, self.kv_index)
        k_BKSH, v_BKSH = self._cache.k[layer], self._cache.v[layer]
        if k_BKTH.shape[2] == 1:  # one token: the decode call over the memory, which now holds it too
            held = _held(self._cache.token_index[layer])
            out, lse = calls.decode_attention(
                self.attention, q_BNTH, k_BKSH, v_BKSH, kv_segment_ids=held, q_segment_ids=self.segment_ids
            )
        else:
            out, lse = calls.append_attention(
                self.attention, q_BNTH, k_BKTH, v_BKTH, self.segment_ids,
                k_memory=k_BKSH, v_memory=v_BKSH, memory_segment_ids=_held(before),
            )  # fmt: skip
        return start, out, lse

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        return self.append(layer, q_BNTH, k_BKTH, v_BKTH)[1]


def _held(token_index_BS: Array) -> Array:
    """Segment ids of a memory's slots: 0 where a slot holds a token, -1 (never seen) where it is empty."""
    return jnp.where(token_index_BS >= 0, 0, -1).astype(jnp.int32)
