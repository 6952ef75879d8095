"""LongGen's hybrid sparse-layer model against the dense one: KV memory, prefill and one training step.

Hybrid (``SparsityConfig.longgen``): full attention in the middle third of the layers, sink + window
(``--sparse streaming``) or local + strided blocks (``--sparse strided``) in the others. Per length, on the
``--preset`` model (``bench``: the 42M-parameter, 8-layer model of benchmarks/e2e.py) with the chunked attention:
one forward over the whole prompt (the prefill's arithmetic, without writing a cache) and one training step
(forward, rematerialised backward, AdamW) of ``qv_jax.training``, dense and hybrid in the same run, as time
ratios. Then the KV cache bytes of both at ``--kv-lengths`` for the preset and for Qwen2.5-VL-7B's geometry (28
layers, 4 KV heads of 128, bfloat16), from the cache byte functions (the paper: -62 %). Run
``python -m benchmarks.longgen``; prints tables and writes ``benchmarks/results/longgen.json``. Results:
docs/benchmarks/longgen.md.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import format_table, time_call, write_json
from benchmarks.e2e import random_model
from qv_jax.attention import SparsityConfig
from qv_jax.cache.sparse import sparse_kv_bytes
from qv_jax.model.config import ModelConfig
from qv_jax.training.data import Synthetic
from qv_jax.training.step import StepConfig, batch_arrays, hidden_states, make_init, make_step, split_text


def longgen(num_layers: int, args) -> SparsityConfig:
    """The hybrid of the run: full attention in the middle third, ``--sparse`` layers elsewhere."""
    strided = {"local_blocks": max(1, args.local // args.block), "vert_stride": args.vert_stride, "block": args.block}
    return SparsityConfig.longgen(
        num_layers, sparse=args.sparse, sink=args.sink, local=args.local, token_budget=None, **strided
    )


def kv_bytes(sparsity: SparsityConfig, *, layers: int, kv_heads: int, head_dim: int, dtype, tokens: int) -> dict:
    """KV cache bytes of one sequence of ``tokens``: dense (``VisionLanguageModel.kv_cache_bytes``' formula) and
    the hybrid's cache (``qv_jax.cache.sparse.sparse_kv_bytes``)."""
    item = jnp.dtype(dtype).itemsize
    dense = 2 * layers * kv_heads * tokens * head_dim * item + 4 * tokens + 4
    shape = {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype}
    hybrid = sparse_kv_bytes(sparsity, batch=1, capacity=tokens, **shape)
    return {"tokens": tokens, "dense_mib": dense / 2**20, "hybrid_mib": hybrid / 2**20, "saving": 1 - hybrid / dense}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def forward(text_def, treedef, config, params, ids_BT, segments_BT, positions_BT):
    """The whole prompt through every layer: the prefill's arithmetic, without writing a cache."""
    text = nnx.merge(text_def, jax.tree.unflatten(treedef, [p.astype(config.compute_dtype) for p in params]))
    return hidden_states(text, config, ids_BT, segments_BT, positions_BT)


def time_one(model, arrays, layer_patterns, *, repeats: int, step: bool) -> dict:
    """Seconds of one prefill and (with ``step``) one training step of the model with these patterns."""
    text_def, treedef, params = split_text(model)
    config = StepConfig(
        steps=10, attention=model.attention, layer_patterns=layer_patterns, compute_dtype=str(model.dtype)
    )
    fwd = time_call(
        lambda: forward(text_def, treedef, config, params, *arrays[:3]).block_until_ready(), repeats=repeats
    )
    row = {"prefill_s": fwd["median_s"]}
    if step:
        train = make_step(text_def, treedef, config)
        holder = {"params": params, "opt": make_init(config)(params)}

        def one_step():
            holder["params"], holder["opt"], loss = train(holder["params"], holder["opt"], arrays)
            loss.block_until_ready()

        row["train_step_s"] = time_call(one_step, repeats=repeats)["median_s"]
    return row


def time_length(model, length: int, patterns, *, repeats: int, step: bool) -> list[dict]:
    """Dense then hybrid at one length; the hybrid row carries the time ratios (hybrid / dense)."""
    task = Synthetic("copy", separator=model.eos_token_ids[0], vocab_size=model.config.text.vocab_size)
    arrays = tuple(jnp.asarray(a) for a in batch_arrays(task.batch(0, 1, length)[0]))
    dense = {"tokens": length, "model": "dense"} | time_one(model, arrays, None, repeats=repeats, step=step)
    hybrid = {"tokens": length, "model": "hybrid"} | time_one(model, arrays, patterns, repeats=repeats, step=step)
    hybrid["prefill_ratio"] = hybrid["prefill_s"] / dense["prefill_s"]
    if step:
        hybrid["train_step_ratio"] = hybrid["train_step_s"] / dense["train_step_s"]
    return [dense, hybrid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", choices=("tiny", "bench", "7b"), default="bench", help="random model (default bench)"
    )
    parser.add_argument("--dtype", help="parameter dtype (default: float32 on CPU, bfloat16 on GPU / TPU)")
    parser.add_argument("--attention", default="auto", help="attention backend (default auto: chunked on CPU)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384], help="prompt lengths to time")
    parser.add_argument("--step-lengths", type=int, nargs="*", help="lengths to time a train step at (default all)")
    parser.add_argument("--sparse", choices=("streaming", "strided"), default="streaming")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--local", type=int, default=1024, help="window (streaming) or local tokens (strided)")
    parser.add_argument("--block", type=int, default=64, help="block of a strided layer")
    parser.add_argument("--vert-stride", type=int, default=8)
    parser.add_argument("--kv-lengths", type=int, nargs="+", default=[32768, 131072], help="contexts of the KV rows")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/longgen.json)")
    args = parser.parse_args()
    step_lengths = args.lengths if args.step_lengths is None else args.step_lengths
    with tempfile.TemporaryDirectory() as scratch:
        dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        model = random_model(args.preset, dtype, Path(scratch)).with_attention(args.attention)
    t = model.config.text
    sparsity = longgen(t.num_layers, args)
    patterns = sparsity.layer_patterns(t.num_layers, t.num_kv_heads)
    rows = []
    for n in args.lengths:
        rows += time_length(model, n, patterns, repeats=args.repeats, step=n in step_lengths)
    print(format_table(rows, ["tokens", "model", "prefill_s", "prefill_ratio", "train_step_s", "train_step_ratio"]))
    seven = ModelConfig.qwen2_5_vl_7b().text
    geometries = {
        args.preset: (t, "float32", sparsity),
        "7b": (seven, "bfloat16", longgen(seven.num_layers, args)),
    }
    kv = [
        {"geometry": name, "layers": g.num_layers}
        | kv_bytes(sp, layers=g.num_layers, kv_heads=g.num_kv_heads, head_dim=g.head_dim, dtype=dtype, tokens=n)
        for name, (g, dtype, sp) in geometries.items()
        for n in args.kv_lengths
    ]
    print(format_table(kv, ["geometry", "layers", "tokens", "dense_mib", "hybrid_mib", "saving"]))
    record = {
        "args": vars(args) | {"out": str(args.out) if args.out else None},
        "model": {"preset": args.preset, "layers": t.num_layers, "kv_heads": t.num_kv_heads, "width": t.hidden_size},
        "layers": list(sparsity.layer_kinds(t.num_layers)),
        "rows": rows,
        "kv": kv,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(model.state))),
    }
    print(f"wrote {write_json('longgen', record, args.out)}")


if __name__ == "__main__":
    main()
