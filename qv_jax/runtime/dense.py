"""Jitted prefill and decode steps over a dense :class:`~qv_jax.cache.dense.KVCache` (see ``qv_jax.runtime.steps``)."""

from __future__ import annotations

from qv_jax.cache.dense import DenseCacheAttention
from qv_jax.runtime.steps import jitted_steps

prefill, decode_step, decode_loop = jitted_steps(DenseCacheAttention, DenseCacheAttention)
