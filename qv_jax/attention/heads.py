"""Which heads stream: DuoAttention pattern files, and the retrieval-first head order sparse decoding runs in.

DuoAttention's released patterns (``full_attention_heads.tsv``: one row per layer, one gate in [0, 1] per KV head)
become a streaming-head mask with :func:`load_duo_attention_heads`. :func:`reorder_heads` permutes a model's
attention weights so that in every layer the retrieval heads come first: each kind of head is then one contiguous
slice of the KV-head axis, and the model computes the same function.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from qv_jax.errors import ConfigError

TSV_NAME = "full_attention_heads.tsv"


def load_duo_attention_heads(
    path: str | os.PathLike, *, sparsity: float | None = None, threshold: float | None = None
) -> np.ndarray:
    """Streaming-head mask ``[layers, kv_heads]`` from DuoAttention's ``full_attention_heads.tsv``.

    ``path`` is the file or a directory holding it. Gates are clipped to [0, 1]. Give exactly one of:

    - ``sparsity`` (fraction of streaming heads, DuoAttention's deployment rule): the heads whose gate lies below
      the ``sparsity`` quantile of all gates become streaming heads. DuoAttention breaks ties at the threshold with
      random noise; here the same number of heads, ``ceil(sparsity * (n - 1))`` of ``n``, is taken in order of gate
      and then of (layer, head), so the result is deterministic.
    - ``threshold``: heads with a gate below it are streaming heads.
    """
    file = Path(path)
    if file.is_dir():
        file = file / TSV_NAME
    if not file.is_file():
        raise ConfigError(f"{file}: no DuoAttention pattern file ({TSV_NAME})")
    if (sparsity is None) == (threshold is None):
        raise ConfigError("give exactly one of sparsity= (fraction of streaming heads) or threshold=")
    try:
        gates = np.loadtxt(file, dtype=np.float64, delimiter="\t", ndmin=2)
    except ValueError as e:
        raise ConfigError(f"{file}: not a tab-separated table of gates ({e})") from e
    if gates.size == 0 or not np.all(np.isfinite(gates)):
        raise ConfigError(f"{file}: expected one row of finite gates per layer, got shape {gates.shape}")
    gates = np.clip(gates, 0.0, 1.0)
    if threshold is not None:
        return gates < threshold
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity must be in [0, 1], got {sparsity}")
    n = gates.size
    count = n if sparsity >= 1.0 else math.ceil(sparsity * (n - 1))
    order = np.argsort(gates.reshape(-1), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[:count]] = True
    return mask.reshape(gates.shape)


# per-layer attention parameters and the axis that indexes heads; "kv" axes hold KV heads, "q" axes query heads
_HEAD_AXES = {"q": ("q", 1), "q_bias": ("q", 0), "o": ("q", 0), "k": ("kv", 1), "k_bias": ("kv", 0)}
_HEAD_AXES |= {"v": ("kv", 1), "v_bias": ("kv", 0)}


def head_permutations(streaming_mask: np.ndarray, num_heads: int) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per layer, ``(kv_order, q_order)`` putting retrieval heads first (stable), or ``None`` if already ordered."""
    mask = np.asarray(streaming_mask, bool)
    groups = num_heads // mask.shape[1]
    perms = []
    for row in mask:
        kv = np.argsort(row, kind="stable")
        if np.array_equal(kv, np.arange(row.size)):
            perms.append(None)
            continue
        q = (kv[:, None] * groups + np.arange(groups)[None, :]).reshape(-1)
        perms.append((kv, q))
    return perms


def reorder_heads(state, streaming_mask, *, num_heads: int):
    """A copy of an NNX model state with, in every decoder layer, the retrieval KV heads first.

    Moves each KV head's k / v weights and biases together with its group's query weights, biases and output
    projection rows, so the model computes the same function. The input state is not modified.
    """
    import jax.numpy as jnp
    from flax import nnx

    perms = head_permutations(streaming_mask, num_heads)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if len(path) == 4 and path[:2] == ("text", "layers") and path[3] in _HEAD_AXES:
            perm = perms[path[2]]
            if perm is not None:
                which, axis = _HEAD_AXES[path[3]]
                order = perm[0] if which == "kv" else perm[1]
                var = var.replace(value=jnp.take(var.get_value(), jnp.asarray(order), axis=axis))
        flat.append((path, var))
    return nnx.from_flat_state(flat)
