"""QuickPrefill: group-wise prefill with per-layer KV pruning, overlapped with parallel video decoding.

- :mod:`~qv_jax.pipeline.plan` — token layout, M-RoPE positions and pruning budget from the frame plan alone;
- :mod:`~qv_jax.pipeline.cache` — the pruned memory (per-layer slots that record which prompt token they hold);
- :mod:`~qv_jax.pipeline.scores` — the score rules and the ``lax.top_k`` selection;
- :mod:`~qv_jax.pipeline.steps` — the jitted prefix / group / question prefill and decode loop;
- :mod:`~qv_jax.pipeline.executor` — decode-ahead, prefetch and device steps at once, with stage timings.

``qv_jax.VideoQA`` puts them together.
"""

from qv_jax.pipeline.cache import AppendAttention, LayeredKV
from qv_jax.pipeline.executor import StageEvent, Timeline, Timings, run_overlapped
from qv_jax.pipeline.plan import PRUNE_RULES, GroupPlan, keep_counts, make_group_plan
from qv_jax.pipeline.scores import select_tokens, token_scores

__all__ = [
    "PRUNE_RULES",
    "AppendAttention",
    "GroupPlan",
    "LayeredKV",
    "StageEvent",
    "Timeline",
    "Timings",
    "keep_counts",
    "make_group_plan",
    "run_overlapped",
    "select_tokens",
    "token_scores",
]
