"""QuickPrefill: group-wise prefill with per-layer KV pruning, overlapped with parallel video decoding.

- :mod:`~qv_jax.pipeline.plan` — token layout, M-RoPE positions and pruning budget from the frame plan alone;
- :mod:`~qv_jax.pipeline.cache` — the pruned memory (per-layer slots that record which prompt token they hold);
- :mod:`~qv_jax.pipeline.scores` — the score rules and the ``lax.top_k`` selection;
- :mod:`~qv_jax.pipeline.steps` — the jitted prefix / group / question prefill and decode loop;
- :mod:`~qv_jax.pipeline.executor` — decode-ahead, prefetch and device steps at once, with stage timings.

``qv_jax.VideoQA`` puts them together. Submodules are imported on first use: ``plan`` is free of JAX, so the CLI
can read :data:`PRUNE_RULES` without importing it.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_LAZY = {
    "PRUNE_RULES": "qv_jax.pipeline.plan",
    "GroupPlan": "qv_jax.pipeline.plan",
    "keep_counts": "qv_jax.pipeline.plan",
    "make_group_plan": "qv_jax.pipeline.plan",
    "AppendAttention": "qv_jax.pipeline.cache",
    "LayeredKV": "qv_jax.pipeline.cache",
    "StageEvent": "qv_jax.pipeline.executor",
    "Timeline": "qv_jax.pipeline.executor",
    "Timings": "qv_jax.pipeline.executor",
    "run_overlapped": "qv_jax.pipeline.executor",
    "select_tokens": "qv_jax.pipeline.scores",
    "token_scores": "qv_jax.pipeline.scores",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qv_jax.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
