"""Finetuning qv-jax models (docs/training.md): any model, dense or as a hybrid sparse (LongGen) model.

- :mod:`~qv_jax.training.loop` — :func:`finetune`, checkpoints, resume, log, loss curve, the saved model;
- :mod:`~qv_jax.training.step` — the jitted, rematerialised train step and its optimizer;
- :mod:`~qv_jax.training.data` — token files, text files and synthetic long-range tasks as packed batches;
- :mod:`~qv_jax.training.checkpoint` — orbax checkpoints ``step_N``, written whole or not at all.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "finetune": "qv_jax.training.loop",
    "FinetuneResult": "qv_jax.training.loop",
    "open_data": "qv_jax.training.data",
    "Batch": "qv_jax.training.data",
    "Synthetic": "qv_jax.training.data",
    "TokenDocuments": "qv_jax.training.data",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
