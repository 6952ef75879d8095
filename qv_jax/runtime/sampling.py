"""Next-token selection: greedy, or sampling with temperature, top-k and top-p (nucleus), as transformers does.

The order is the one of transformers' logits processors: divide by the temperature, keep the ``top_k`` largest
logits, then keep the smallest set of the most likely tokens whose probability reaches ``top_p`` (always at least
one token). :class:`SamplingParams` travels into jitted code whole, as a pytree whose only static part is
``do_sample``, so other temperatures or filters reuse the compiled steps. :func:`sampling_loop` is the on-device
generation loop every cache's decoder runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from qv_jax.errors import InputError

Array = jax.Array
Cache = TypeVar("Cache")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens. ``do_sample=False`` is greedy (argmax) and ignores the other fields.

    A pytree: ``temperature``, ``top_k`` and ``top_p`` are its leaves (traced inside ``jit``), ``do_sample`` its
    static part. Values are checked when constructed by the user, not when jax rebuilds it from traced leaves.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


def _flatten(params: SamplingParams):
    leaves = (jnp.float32(params.temperature), jnp.int32(params.top_k), jnp.float32(params.top_p))
    return leaves, params.do_sample


def _unflatten(do_sample: bool, leaves) -> SamplingParams:
    params = object.__new__(SamplingParams)  # no validation: the leaves may be tracers
    for name, value in zip(("temperature", "top_k", "top_p"), leaves, strict=True):
        object.__setattr__(params, name, value)
    object.__setattr__(params, "do_sample", do_sample)
    return params


jax.tree_util.register_pytree_node(SamplingParams, _flatten, _unflatten)


def filter_logits(logits_BV: Array, *, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Temperature-scaled float32 logits with everything outside the top-k / top-p set at ``-inf``."""
    x_BV = logits_BV.astype(jnp.float32) / temperature
    vocab = x_BV.shape[-1]
    sorted_BV = -jnp.sort(-x_BV, axis=-1)  # descending
    rank_V = jnp.arange(vocab)
    in_top_k_BV = jnp.broadcast_to((top_k <= 0) | (rank_V < top_k), sorted_BV.shape)
    sorted_BV = jnp.where(in_top_k_BV, sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = in_top_k_BV & ((mass_before_BV < top_p) | (rank_V == 0))
    # the smallest kept logit is the threshold; ties with it are kept too
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x_BV >= threshold_B1, x_BV, -jnp.inf)


def sample(logits_BV: Array, key: Array, sampling: SamplingParams) -> Array:
    """One token id per row, int32 ``[B]``."""
    if not sampling.do_sample:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered_BV = filter_logits(logits_BV, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    return jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)


# ``sample`` on its own (the first token of an answer, chosen from the prefill's logits outside the decode loop)
jit_sample = jax.jit(sample)


def sampling_loop(
    step_fn: Callable[[Cache, Array, Any], tuple[Array, Cache]],
    cache: Cache,
    tokens_B: Array,
    positions: Any,
    done_B: Array,
    rng: Array,
    stop_ids: Array,
    pad_id: Array,
    sampling: SamplingParams,
    *,
    num_steps: int,
) -> tuple[Array, Array, Array, Cache]:
    """Feed ``tokens_B`` (already sampled) and generate up to ``num_steps`` more tokens per row (``lax.while_loop``).

    ``step_fn(cache, tokens_B, positions) -> (logits [B, V], cache)`` runs one decode step; ``positions`` is any
    pytree of integer arrays that advance by one per step (the rotary position, and e.g. the prompt token index).
    A row is done once it has produced one of ``stop_ids``; its later tokens are ``pad_id``. The loop ends early
    when every row is done. Returns ``(tokens [B, num_steps], done [B], steps run, cache)``; columns after an early
    end hold ``pad_id``.
    """
    generated = jnp.full((tokens_B.shape[0], num_steps), pad_id, jnp.int32)

    def cond(carry):
        step, _, _, _, done_B, _, _ = carry
        return (step < num_steps) & ~jnp.all(done_B)

    def body(carry):
        step, cache, tokens_B, positions, done_B, generated, rng = carry
        logits_BV, cache = step_fn(cache, tokens_B, positions)
        rng, key = jax.random.split(rng)
        new_B = sample(logits_BV, key, sampling)
        new_B = jnp.where(done_B, pad_id, new_B).astype(jnp.int32)
        generated = jax.lax.dynamic_update_slice(generated, new_B[:, None], (0, step))
        done_B = done_B | jnp.isin(new_B, stop_ids)
        positions = jax.tree.map(lambda p: p + 1, positions)
        return step + 1, cache, new_B, positions, done_B, generated, rng

    carry = (jnp.zeros((), jnp.int32), cache, tokens_B.astype(jnp.int32), positions, done_B, generated, rng)
    steps, cache, _, _, done_B, generated, _ = jax.lax.while_loop(cond, body, carry)
    return generated, done_B, steps, cache
