"""The end of every answer, shared by ``VisionLanguageModel.generate`` and ``VideoQA``: the first token from the
prefill's logits, the rest from a cache's on-device decode loop, then the trim at stop tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.errors import InputError
from qv_jax.runtime.sampling import SamplingParams, jit_sample
from qv_jax.sharding.transfer import to_host

Array = jax.Array
Cache = TypeVar("Cache")

# (cache, first tokens [B], done [B], rng, stop ids, num_steps) -> (tokens [B, num_steps], cache)
DecodeLoop = Callable[[Cache, Array, Array, Array, Array, int], tuple[Array, Cache]]


@dataclasses.dataclass(frozen=True)
class DecodeRequest:
    """How an answer is generated: at most ``max_new_tokens`` tokens chosen by ``sampling`` from ``seed``; a row
    ends at its first token in ``stop_ids`` (included) and holds ``pad_id`` after it."""

    max_new_tokens: int
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")


def answer_request(
    model, max_new_tokens: int, do_sample: bool, *, temperature: float, top_k: int, top_p: float, seed: int
) -> DecodeRequest:
    """The request of one answer by ``model`` (a ``VisionLanguageModel``): the sampling options of ``ask``, ending
    at the model's stop tokens and padded with its pad token."""
    sampling = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    return DecodeRequest(max_new_tokens, sampling, stop_ids=model.eos_token_ids, pad_id=model.pad_token_id, seed=seed)


def decode_answer(logits_BV: Array, cache: Cache, request: DecodeRequest, loop: DecodeLoop) -> tuple[np.ndarray, Cache]:
    """New tokens ``[B, n]`` (host int32, ``n <= max_new_tokens``) after a prefill that left ``logits_BV`` and
    ``cache``, and the cache after decoding.

    Like transformers, the result ends at the step where the last row ended.
    """
    rng, key = jax.random.split(jax.random.key(request.seed))
    first_B = jit_sample(logits_BV, key, request.sampling)
    stop_ids = jnp.asarray(request.stop_ids, jnp.int32)
    parts = [first_B]
    if request.max_new_tokens > 1:
        rest, cache = loop(cache, first_B, jnp.isin(first_B, stop_ids), rng, stop_ids, request.max_new_tokens - 1)
        parts.append(rest)
    # fetched only now: the decode loop is queued without waiting for the prefill to finish
    tokens = np.concatenate([to_host(p).reshape(first_B.shape[0], -1) for p in parts], axis=1).astype(np.int32)
    ended = np.isin(tokens, request.stop_ids)
    ends = np.where(ended.any(axis=1), ended.argmax(axis=1) + 1, tokens.shape[1])
    return tokens[:, : int(ends.max())], cache


def until_stop(tokens: np.ndarray, stop_ids: tuple[int, ...]) -> np.ndarray:
    """A row of new tokens up to and including its first stop token (all of it when none stops it)."""
    hits = np.flatnonzero(np.isin(tokens, stop_ids))
    return tokens[: hits[0] + 1] if hits.size else tokens
