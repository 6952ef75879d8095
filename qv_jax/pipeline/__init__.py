"""QuickPrefill (visual tokens -> KV memory): group-wise prefill with per-layer KV pruning, overlapped with
parallel video decoding (docs/videoqa.md).

- :mod:`~qv_jax.pipeline.plan` — token layout, M-RoPE positions and pruning budget from the frame plan alone (no
  JAX, so the CLI reads :data:`PRUNE_RULES` cheaply);
- :mod:`~qv_jax.pipeline.scores` — the score rules and the ``lax.top_k`` selection;
- :mod:`~qv_jax.pipeline.prefill` — the jitted prefix / group / question prefill and decode loop over the memory
  (``qv_jax.cache.layered``);
- :mod:`~qv_jax.pipeline.executor` — decode-ahead, prefetch and device steps at once, with stage timings.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "PRUNE_RULES": "qv_jax.pipeline.plan",
    "GroupPlan": "qv_jax.pipeline.plan",
    "PruneRule": "qv_jax.pipeline.plan",
    "keep_counts": "qv_jax.pipeline.plan",
    "make_group_plan": "qv_jax.pipeline.plan",
    "StageEvent": "qv_jax.pipeline.executor",
    "Timeline": "qv_jax.pipeline.executor",
    "Timings": "qv_jax.pipeline.executor",
    "run_overlapped": "qv_jax.pipeline.executor",
    "select_tokens": "qv_jax.pipeline.scores",
    "token_scores": "qv_jax.pipeline.scores",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
