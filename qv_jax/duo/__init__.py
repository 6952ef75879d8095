"""DuoAttention retrieval-head identification: which KV heads may stream (sink + recent) and which must see the
whole context, found for any loaded model (docs/duo.md).

- :mod:`~qv_jax.duo.train` — :func:`identify_heads` (gate optimisation or the training-free score);
- :mod:`~qv_jax.duo.gated` — the text decoder with gated attention, its loss and the on-the-fly score;
- :mod:`~qv_jax.duo.data` — synthetic passkey-retrieval samples from the model's tokenizer;
- :mod:`~qv_jax.duo.gates` — :class:`HeadGates`, saved as DuoAttention's ``full_attention_heads.tsv``.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "identify_heads": "qv_jax.duo.train",
    "hidden_states": "qv_jax.duo.gated",
    "pattern_distance": "qv_jax.duo.gated",
    "passkey_sample": "qv_jax.duo.data",
    "HeadGates": "qv_jax.duo.gates",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
