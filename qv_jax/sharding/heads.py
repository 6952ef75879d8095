"""The head rule: which model-axis sizes a model's query and KV heads can be split over (docs/sharding.md).

1. the model axis ``M`` must divide the query heads ``N``;
2. if ``M`` divides the KV heads ``K``, KV heads are split like query heads;
3. if ``K`` divides ``M``, each KV head is replicated ``M / K`` times, so every device holds the KV head its query
   heads read;
4. otherwise the model cannot be laid out (:class:`~qv_jax.errors.ShardingError`).
"""

from __future__ import annotations

from qv_jax.errors import ShardingError


def valid_model_axes(num_heads: int, num_kv_heads: int) -> list[int]:
    """Model-axis sizes the head rule accepts for ``num_heads`` query and ``num_kv_heads`` KV heads."""
    return [
        m for m in range(1, num_heads + 1) if num_heads % m == 0 and (num_kv_heads % m == 0 or m % num_kv_heads == 0)
    ]


def kv_head_repeat(num_heads: int, num_kv_heads: int, model: int) -> int:
    """How many times each KV head is replicated on a model axis of size ``model`` (1: KV heads are split)."""
    if num_heads % model == 0:
        if num_kv_heads % model == 0:
            return 1
        if model % num_kv_heads == 0:
            return model // num_kv_heads
    raise ShardingError(
        f"{num_heads} query heads and {num_kv_heads} KV heads cannot be laid out on a model axis of {model}: "
        f"the model axis must divide the query heads and divide or be a multiple of the KV heads; valid sizes "
        f"for this model: {valid_model_axes(num_heads, num_kv_heads)}"
    )
