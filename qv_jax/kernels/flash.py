"""The pieces of flash attention that every kernel here shares, on loaded tile values (no refs, no grids).

- the masking constant, the ``dot_general`` dimension numbers and the precision rule of the tile products;
- the online-softmax update of one key tile and the final normalisation, in the two layouts the backends keep
  their per-row statistics in: lane-replicated ``[rows, 128]`` on TPU (whole vregs), plain ``[rows]`` vectors for
  Triton (``rows``: the query rows of a tile, ``H``: head dim);
- :func:`merge_by_lse`: attention over the union of disjoint key sets from partial results over each set (split-K
  parts of paged decoding, parts of a long memory, sink + window of a streaming head).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

# a large finite negative logit: exp() of it underflows to 0 without the inf - inf = nan of a -inf mask
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b
LANES = 128
SUBLANES = 8


def precision_for(dtype):
    """Tile products in full float32 precision for float32 operands; the MXU / tensor-core default otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, dims, precision):
    """``dot_general`` accumulating in float32."""
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def lanes(x, width: int):
    """Widen a lane-replicated ``[rows, 128]`` array to ``[rows, width]`` with whole-vreg copies (TPU)."""
    if width % LANES == 0:
        return x if width == LANES else jnp.tile(x, (1, width // LANES))
    return x[:, :width]


def softmax_step_lanes(s, keep, v, m_prev, l_prev, acc_prev, precision):
    """Fold one tile of scaled logits ``s [rows, keys]`` (masked where ``keep`` is False) and values ``v [keys, H]``
    into the running max / sum ``[rows, 128]`` (lane-replicated) and output ``[rows, H]``; returns the new
    ``(m, l, acc)``."""
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(keep, jnp.exp(s - lanes(m_next, s.shape[1])), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc = lanes(alpha, acc_prev.shape[1]) * acc_prev + dot(p.astype(v.dtype), v, NN_DIMS, precision)
    return m_next, l_next, acc


def finish_lanes(acc, m, denom):
    """Normalised float32 output ``[rows, H]`` and lane-replicated log-sum-exp ``[rows, 128]`` of the running state;
    rows that saw no key get zeros and ``-inf``."""
    seen = denom > 0.0
    safe = jnp.where(seen, denom, 1.0)
    inv = jnp.where(seen, 1.0 / safe, 0.0)
    return acc * lanes(inv, acc.shape[1]), jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def softmax_step(s, keep, v, m_prev, l_prev, acc_prev, precision):
    """:func:`softmax_step_lanes` with the running max / sum as ``[rows]`` vectors (Triton)."""
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    p = jnp.where(keep, jnp.exp(s - m_next[:, None]), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    acc = alpha[:, None] * acc_prev + dot(p.astype(v.dtype), v, NN_DIMS, precision)
    return m_next, alpha * l_prev + jnp.sum(p, axis=1), acc


def finish(acc, m, denom):
    """:func:`finish_lanes` with ``[rows]`` statistics: ``(out [rows, H] float32, lse [rows])``."""
    seen = denom > 0.0
    safe = jnp.where(seen, denom, 1.0)
    return jnp.where(seen[:, None], acc / safe[:, None], 0.0), jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def merge_by_lse(out, lse, axis: int):
    """Merge partial attentions over disjoint key sets, stacked on ``axis`` of ``out [..., H]`` and ``lse [...]``.

    ``lse = logsumexp(lse_i)``, ``out = sum_i exp(lse_i - lse) out_i`` (in float32); a part that saw nothing has
    ``lse = -inf`` and no weight, and if no part saw anything the result is zeros with ``lse = -inf``.
    """
    m = jnp.max(lse, axis=axis, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe)  # exp(-inf) = 0 for parts that saw nothing
    total = jnp.sum(w, axis=axis)
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    merged = jnp.sum(w[..., None] * out.astype(jnp.float32), axis=axis) / safe[..., None]
    return merged, jnp.where(seen, jnp.squeeze(m_safe, axis) + jnp.log(safe), -jnp.inf)
