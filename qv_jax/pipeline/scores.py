"""Which of a group's new tokens a layer keeps: the score rules of QuickPrefill and the top-k selection.

A rule (:class:`~qv_jax.pipeline.plan.PruneRule`, the table in docs/videoqa.md, "Pruning") scores each of the
group's new tokens once per layer from that layer's post-RoPE keys, values or the question's attention; the layer
keeps the highest-scoring ones, one selection for all KV heads, in prompt order. Padding scores ``-inf``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.errors import ConfigError
from qv_jax.pipeline.plan import PruneRule

Array = jax.Array

SCORE_RULES = tuple(rule for rule in PruneRule if rule is not PruneRule.NONE)  # "none" scores nothing


def _norm_BT(x_BKTH: Array) -> Array:
    """L2 norm over heads and head dim (the vector concatenated over KV heads), in float32."""
    x = x_BKTH.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=(1, 3)))


def question_attention_scores(q_BNTH: Array, lse_BNT: Array, k_BKSH: Array, question_valid_BT: Array) -> Array:
    """Attention the question's ``T`` queries pay to each of the group's ``S`` keys, summed over the question and
    averaged over heads: ``[B, S]``.

    ``lse_BNT`` is the log-sum-exp of each question query's scaled logits over every key it sees (memory, group
    and earlier question tokens), so ``exp(q·k / √H - lse)`` is exactly its softmax weight on a group key. Question
    padding (``question_valid_BT`` False) contributes nothing.
    """
    B, N, T, H = q_BNTH.shape
    K = k_BKSH.shape[1]
    q_BKGTH = q_BNTH.reshape(B, K, N // K, T, H).astype(jnp.float32)
    logits_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH.astype(jnp.float32)) * H**-0.5
    p_BKGTS = jnp.exp(logits_BKGTS - lse_BNT.reshape(B, K, N // K, T)[..., None])
    p_BKGTS = jnp.where(question_valid_BT[:, None, None, :, None], p_BKGTS, 0.0)
    return jnp.sum(p_BKGTS, axis=3).mean(axis=(1, 2))


def token_scores(
    rule: str,
    k_BKTH: Array,
    v_BKTH: Array,
    valid_BT: Array,
    *,
    key: Array | None = None,
    question: tuple[Array, Array, Array] | None = None,
) -> Array:
    """Scores ``[B, T]`` float32 of a group's ``T`` new tokens under ``rule`` (higher = keep), ``-inf`` on padding.

    ``key`` is the PRNG key of ``random``; ``question = (q [B, N, T', H], lse [B, N, T'], valid [B, T'])`` feeds
    ``question_attention``.
    """
    if rule == PruneRule.KEY_NORMS_SMALL:
        scores = -_norm_BT(k_BKTH)
    elif rule == PruneRule.KEY_NORMS:
        scores = _norm_BT(k_BKTH)
    elif rule == PruneRule.VALUE_NORMS:
        scores = _norm_BT(v_BKTH)
    elif rule == PruneRule.RANDOM:
        if key is None:
            raise ConfigError("the random rule needs a PRNG key")
        scores = jax.random.uniform(key, valid_BT.shape, jnp.float32)
    elif rule == PruneRule.QUESTION_ATTENTION:
        if question is None:
            raise ConfigError("question_attention needs the question's queries; give the question up front")
        scores = question_attention_scores(question[0], question[1], k_BKTH, question[2])
    else:
        raise ConfigError(f"no score rule {rule!r}; rules are {', '.join(SCORE_RULES)}")
    return jnp.where(valid_BT, scores, -jnp.inf)


def select_tokens(scores_BT: Array, keep: Array, max_keep: int) -> tuple[Array, Array]:
    """The ``keep`` best tokens (``keep <= max_keep``, traced), in ascending token order.

    Returns ``(index [B, max_keep], kept [B, max_keep])``: ``index[:, :keep]`` are the chosen positions in the
    group, sorted; the remaining ``max_keep - keep`` entries are marked ``kept = False``. ``max_keep`` is static
    (the largest ``keep`` of any group), so every group runs the same compiled step.
    """
    T = scores_BT.shape[-1]
    _, best = jax.lax.top_k(scores_BT, max_keep)  # best first
    chosen = jnp.arange(max_keep) < keep
    # chosen tokens sort first, in token order; the rest after them
    order = jnp.sort(jnp.where(chosen, best, T + best), axis=-1)
    kept = order < T
    return jnp.where(kept, order, order - T), kept
