"""Which of a group's new tokens a layer keeps: the score rules of QuickPrefill and the top-k selection.

A rule scores each of the group's ``n`` new tokens once per layer, from that layer's post-RoPE keys, values or the
question's attention, and the layer keeps the highest-scoring ``k``; one selection serves all KV heads. Rules
(higher score = kept):

- ``key_norms_small`` (default): minus the L2 norm of the key concatenated over KV heads — keep the *smallest*
  key norms, the rule QuickVideo found best;
- ``key_norms``: the key norm (keep the largest);
- ``value_norms``: the L2 norm of the value concatenated over KV heads (keep the largest);
- ``random``: uniform noise from a key folded with the group and the layer (reproducible for a seed);
- ``question_attention``: SnapKV-like — the question rides along behind every group, and a token's score is the
  attention its key receives from the question's queries, summed over question tokens and averaged over heads;
- ``none``: no pruning (every token kept; no scores needed).

Padding of a short last group scores ``-inf`` and is never kept. The selection uses ``lax.top_k`` on device;
kept tokens stay in prompt order.
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


def question_attention_scores(q_BNQH: Array, lse_BNQ: Array, k_BKTH: Array, question_valid_BQ: Array) -> Array:
    """Attention the question's queries pay to each group key: ``Σ_question mean_heads softmax`` ``[B, T]``.

    ``lse_BNQ`` is the log-sum-exp of each question query's scaled logits over every key it sees (memory, group
    and earlier question tokens), so ``exp(q·k / √H - lse)`` is exactly its softmax weight on a group key. Question
    padding (``question_valid_BQ`` False) contributes nothing.
    """
    B, N, Q, H = q_BNQH.shape
    K = k_BKTH.shape[1]
    q_BKGQH = q_BNQH.reshape(B, K, N // K, Q, H).astype(jnp.float32)
    logits_BKGQT = jnp.einsum("BKGQH,BKTH->BKGQT", q_BKGQH, k_BKTH.astype(jnp.float32)) * H**-0.5
    p_BKGQT = jnp.exp(logits_BKGQT - lse_BNQ.reshape(B, K, N // K, Q)[..., None])
    p_BKGQT = jnp.where(question_valid_BQ[:, None, None, :, None], p_BKGQT, 0.0)
    return jnp.sum(p_BKGQT, axis=3).mean(axis=(1, 2))


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

    ``key`` is the PRNG key of ``random``; ``question = (q [B, N, Q, H], lse [B, N, Q], valid [B, Q])`` feeds
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
    _, best_BK = jax.lax.top_k(scores_BT, max_keep)  # best first
    chosen_BK = jnp.arange(max_keep) < keep
    # chosen tokens sort first, in token order; the rest after them
    order_BK = jnp.sort(jnp.where(chosen_BK, best_BK, T + best_BK), axis=-1)
    kept_BK = order_BK < T
    return jnp.where(kept_BK, order_BK, order_BK - T), kept_BK
