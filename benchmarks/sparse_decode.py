"""Sparse decoding: decode step time and KV bytes, dense vs streaming heads vs streaming heads + page selection.

(The issue names this ``benchmarks/decode.py``; that name holds the video-decoding benchmark, so it lives here.)

One model, three decode paths measured in the same run at each context length:

- ``dense``: ``qv_jax.runtime.dense.decode_loop`` over a dense :class:`~qv_jax.cache.KVCache`;
- ``streaming``: ``qv_jax.runtime.sparse.decode_loop`` with half of each layer's KV heads streaming (sink 64 + ring
  256, DuoAttention's deployment setting) and retrieval heads reading every page;
- ``streaming+select``: the same plus LServe page selection for retrieval heads (``--budget`` tokens, selection
  reused for 4 steps).

The model has Qwen2.5-VL-7B's attention geometry (28 query heads, 4 KV heads of 128) with a narrow MLP, a small
vocabulary and ``--layers`` layers, so that attention, the part sparsity changes, is a realistic share of a step.
Caches are filled with random keys / values up to the context length (decode cost does not depend on their values);
the sparse caches are built from the same dense cache with ``SparseKVCache.from_dense``. A timed call runs
``--steps`` greedy decode steps in one on-device loop (so page re-selection every 4 steps is averaged in); the table
reports time per step (median of ``--repeats`` calls after a warm-up call) and the KV bytes each cache allocates.

Run ``python -m benchmarks.sparse_decode``; prints a table and writes ``benchmarks/results/sparse_decode.json``.
On CPU the sparse paths run the ``xla`` backend (jnp references); on TPU / GPU the Pallas kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp

from benchmarks.common import format_table, time_call, write_json
from qv_jax.attention import SparsityConfig, reorder_heads
from qv_jax.cache import KVCache, SparseKVCache
from qv_jax.model.config import ModelConfig, TextConfig
from qv_jax.runtime import SamplingParams, VisionLanguageModel, dense
from qv_jax.runtime import sparse as sparse_steps
from qv_jax.testing import tiny_config

DEFAULT_CONTEXTS = (8192, 16384, 32768, 65536, 131072)


def bench_config(layers: int) -> ModelConfig:
    """Qwen2.5-VL-7B's attention (28 x 128 query heads, 4 KV heads) with a narrow MLP and a 1K vocabulary."""
    base = tiny_config(vocab_size=1024)
    text = TextConfig(
        vocab_size=1024,
        hidden_size=28 * 128,
        intermediate_size=1024,
        num_layers=layers,
        num_heads=28,
        num_kv_heads=4,
        max_position_embeddings=262144,
    )
    vision = dataclasses.replace(base.vision, out_hidden_size=text.hidden_size)
    return dataclasses.replace(base, text=text, vision=vision)


def filled_cache(text: TextConfig, batch: int, context: int, capacity: int, dtype, seed: int) -> KVCache:
    """A dense cache holding ``context`` random tokens (segment 0) out of ``capacity`` slots."""
    cache = KVCache.create(
        num_layers=text.num_layers,
        batch=batch,
        capacity=capacity,
        num_kv_heads=text.num_kv_heads,
        head_dim=text.head_dim,
        dtype=dtype,
    )
    keys = jax.random.split(jax.random.key(seed), 2 * text.num_layers)
    shape = (batch, text.num_kv_heads, capacity, text.head_dim)
    filled = jnp.arange(capacity) < context

    @jax.jit
    def fill(key):
        return jnp.where(filled[:, None], jax.random.normal(key, shape, jnp.float32), 0.0).astype(dtype)

    return dataclasses.replace(
        cache,
        k=tuple(fill(k) for k in keys[::2]),
        v=tuple(fill(k) for k in keys[1::2]),
        segment_ids=jnp.where(filled, 0, -1)[None].repeat(batch, 0).astype(jnp.int32),
        length=jnp.int32(context),
    )


@functools.partial(jax.jit, static_argnames=("sparsity", "capacity"))
def to_sparse(cache: KVCache, sparsity: SparsityConfig, capacity: int) -> SparseKVCache:
    return SparseKVCache.from_dense(cache, sparsity, capacity=capacity)


def time_steps(module, graphdef, state, cache, *, batch, context, num_steps, repeats):
    """Median seconds per decode step of ``module.decode_loop`` (each call continues from the last one's cache)."""
    holder = {"cache": cache, "pos": jnp.full((batch,), context, jnp.int32)}

    def call():
        out, _, holder["cache"] = module.decode_loop(
            graphdef,
            state,
            holder["cache"],
            jnp.zeros((batch,), jnp.int32),
            holder["pos"],
            jnp.zeros((batch,), bool),
            jax.random.key(0),
            jnp.zeros((0,), jnp.int32),
            jnp.int32(0),
            SamplingParams(),
            num_steps=num_steps,
        )
        holder["pos"] = holder["pos"] + num_steps
        jax.block_until_ready(out)

    timing = time_call(call, repeats=repeats, warmup=1)
    return timing["median_s"] / num_steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)), help="comma-separated tokens")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=int, default=4096, help="page-selection token budget")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on TPU / GPU")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sparse_decode.json)")
    args = parser.parse_args(argv)

    contexts = [int(c) for c in args.contexts.split(",")]
    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    config = bench_config(args.layers)
    text = config.text
    model = VisionLanguageModel.random(config, dtype=dtype.name, seed=0)
    half = [[False] * (text.num_kv_heads // 2) + [True] * (text.num_kv_heads - text.num_kv_heads // 2)]
    streaming = SparsityConfig(streaming_heads=half * text.num_layers, token_budget=None)
    variants = {
        "dense": None,
        "streaming": streaming,
        "streaming+select": dataclasses.replace(streaming, token_budget=args.budget),
    }
    # retrieval heads first in every layer: the same model for every variant
    state = reorder_heads(model.state, streaming.streaming_mask(text.num_layers, text.num_kv_heads), num_heads=28)
    backend = streaming.resolve_backend()[0]

    rows = []
    for context in contexts:
        capacity = -(-(context + args.steps * (args.repeats + 1) + 1) // 128) * 128
        dense_ms = None
        for name, sparsity in variants.items():
            cache = filled_cache(text, args.batch, context, capacity, dtype, seed=context)
            module = dense
            if sparsity is not None:
                cache = to_sparse(cache, sparsity, capacity)
                module = sparse_steps
            kv_bytes = cache.nbytes
            per_step = time_steps(
                module,
                model.graphdef,
                state,
                cache,
                batch=args.batch,
                context=context,
                num_steps=args.steps,
                repeats=args.repeats,
            )
            del cache
            ms = per_step * 1e3
            if name == "dense":
                dense_ms, dense_bytes = ms, kv_bytes
            rows.append(
                {
                    "context": context,
                    "variant": name,
                    "kv_MiB": kv_bytes / 2**20,
                    "kv_vs_dense": dense_bytes / kv_bytes,
                    "step_ms": ms,
                    "speedup": dense_ms / ms,
                }
            )
            print(format_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)

    columns = ["context", "variant", "kv_MiB", "kv_vs_dense", "step_ms", "speedup"]
    print(format_table(rows, columns))
    path = write_json(
        "sparse_decode",
        {
            "dtype": dtype.name,
            "backend": backend,
            "layers": args.layers,
            "batch": args.batch,
            "budget": args.budget,
            "steps_per_call": args.steps,
            "repeats": args.repeats,
            "model": "Qwen2.5-VL-7B attention geometry (28 q / 4 KV heads x 128), MLP 1024, vocab 1024",
            "streaming_heads": "2 of 4 KV heads per layer, sink 64, local 256",
            "rows": rows,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
