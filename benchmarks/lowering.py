"""Lower the model's jitted steps for TPU or CUDA from any machine, and count the ``[T, S]``-shaped tensors in them.

The prefill of a prompt chunk, QuickPrefill's group step over a memory of ``--memory`` slots and the dense decode
step of a preset (Qwen2.5-VL-7B by default) are traced with every parameter and cache a ``jax.ShapeDtypeStruct``
(nothing is allocated) and lowered for ``--platform``. In each lowered module we count the tensors (read from the
types in its text) with one dimension of size T (query tokens) and another of size S (key slots), or two of size
T when T = S: the shape of materialised logits or masks. T and S are chosen so that no other dimension of the
model (width, vocabulary, heads, MLP) has their sizes. A fused attention leaves none; the jnp reference leaves
several per layer.

Run ``python -m benchmarks.lowering --platform tpu`` (``--help`` for the knobs). Prints a table and writes a JSON
list, one record per step, to ``benchmarks/results/lowering-<platform>.json``; ``--hlo-dir DIR`` also saves each
module's text as ``DIR/<platform>-<step>.mlir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import RESULTS_DIR, format_table
from qv_jax.attention.backends import AttentionConfig
from qv_jax.cache.dense import KVCache
from qv_jax.cache.layered import LayeredKV
from qv_jax.model.config import ModelConfig
from qv_jax.model.qwen2_5_vl import abstract_model
from qv_jax.pipeline.prefill import prefill_group
from qv_jax.runtime import dense
from qv_jax.testing import tiny_config

PRESETS = {"7b": ModelConfig.qwen2_5_vl_7b, "3b": ModelConfig.qwen2_5_vl_3b, "tiny": tiny_config}
KERNELS = {"tpu": "tpu", "cuda": "gpu"}
STEPS = ("prefill", "group", "decode")
KERNEL_BACKENDS = ("pallas", "interpret", "jax", "jax-interpret")  # the backends that take a kernel family
# a ranked tensor type of the StableHLO text: tensor<2x28x1664x128xbf16>
TENSOR_TYPE = re.compile(r"tensor<((?:\d+x)+)[a-z]\w*>")


def tensors_with(text: str, T: int, S: int) -> int:
    """Tensor types in ``text`` with one dimension of size ``T`` and another of size ``S`` (two of ``T`` if T = S)."""
    count = 0
    for match in TENSOR_TYPE.finditer(text):
        dims = [int(d) for d in match.group(1).rstrip("x").split("x")]
        if T == S:
            count += dims.count(T) >= 2
        else:
            count += T in dims and S in dims
    return count


def clashing_sizes(config: ModelConfig) -> set[int]:
    """Dimension sizes of the model's parameters and activations that T and S must avoid."""
    t, v = config.text, config.vision
    return {
        t.hidden_size, t.vocab_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim, t.num_layers,
        v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size, v.patch_dim, 3, 2, 1,
    }  # fmt: skip


def steps(
    config: ModelConfig, attention: AttentionConfig, *, tokens: int, memory: int, dtype
) -> dict[str, tuple[Callable, tuple, int, int]]:
    """``step -> (jitted function, abstract arguments, T, S)`` for the three steps of ``config``."""
    graphdef, state = abstract_model(config, dtype, attention)
    t = config.text
    D, L, K, H = t.hidden_size, t.num_layers, t.num_kv_heads, t.head_dim
    f32, i32 = jax.ShapeDtypeStruct, jnp.int32

    def dense_cache(capacity: int) -> KVCache:
        return jax.eval_shape(
            lambda: KVCache.create(num_layers=L, batch=1, capacity=capacity, num_kv_heads=K, head_dim=H, dtype=dtype)
        )

    prefill_slots = tokens + memory
    group_memory = jax.eval_shape(
        lambda: LayeredKV.create(num_layers=L, capacity=memory, num_kv_heads=K, head_dim=H, dtype=dtype)
    )

    def group(graphdef, state, cache, embeds, positions, index, valid, keep, key):
        return prefill_group(
            graphdef, state, cache, embeds, positions, index, valid, keep, key, rule="key_norms_small",
            max_keep=(tokens // 2,) * L,
        )  # fmt: skip

    return {
        "prefill": (
            lambda *a: dense.prefill(*a),
            (graphdef, state, dense_cache(prefill_slots), f32((1, tokens, D), dtype), f32((3, 1, tokens), i32),
             f32((1, tokens), i32)),
            tokens,
            prefill_slots,
        ),
        "group": (
            group,
            (graphdef, state, group_memory, f32((tokens, D), dtype), f32((3, tokens), i32), f32((tokens,), i32),
             f32((tokens,), jnp.bool_), f32((L,), i32), jax.eval_shape(lambda: jax.random.key(0))),
            tokens,
            memory,
        ),
        "decode": (
            lambda *a: dense.decode_step(*a),
            (graphdef, state, dense_cache(memory), f32((1,), i32), f32((1,), i32)),
            1,
            memory,
        ),
    }  # fmt: skip


def lower_steps(
    config: ModelConfig,
    platform: str,
    *,
    backend: str = "pallas",
    tokens: int,
    memory: int,
    dtype=jnp.bfloat16,
    which: tuple[str, ...] = STEPS,
    hlo_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Lower the steps ``which`` for ``platform`` (``tpu`` / ``cuda``); one record per step."""
    sizes = clashing_sizes(config)
    if {tokens, memory} & sizes:
        raise SystemExit(f"--tokens {tokens} / --memory {memory} equal a model dimension: pick other sizes")
    attention = AttentionConfig(backend, KERNELS[platform] if backend in KERNEL_BACKENDS else None)
    records = []
    for name, (fn, args, T, S) in steps(config, attention, tokens=tokens, memory=memory, dtype=dtype).items():
        if name not in which:
            continue
        start = time.perf_counter()
        record = {"step": name, "platform": platform, "backend": backend, "tokens_T": T, "slots_S": S}
        try:
            graphdef, *rest = args
            text = jax.jit(fn, static_argnums=0).trace(graphdef, *rest).lower(lowering_platforms=(platform,))
            text = text.as_text()
        except Exception as e:  # reported per step: one step failing to lower must not hide the others
            record.update(lowered=False, error=f"{type(e).__name__}: {str(e)[:500]}", tensors_with_T_and_S=None)
        else:
            # with T = 1 every [1, S] vector would count: a decode step's logits are O(S) whatever the kernel
            record.update(lowered=True, tensors_with_T_and_S=tensors_with(text, T, S) if T > 1 else None)
            if hlo_dir is not None:
                _write_text(Path(hlo_dir) / f"{platform}-{name}.mlir", text)
        record["seconds"] = round(time.perf_counter() - start, 1)
        records.append(record)
    return records


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` whole or not at all (temporary sibling, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="7b", help="model geometry (default 7b)")
    parser.add_argument("--platform", choices=KERNELS, default="tpu", help="platform to lower for (default tpu)")
    parser.add_argument("--attention", default="pallas", help="attention backend (default pallas; try reference)")
    parser.add_argument("--layers", type=int, help="keep only this many decoder layers (same shapes per layer)")
    parser.add_argument("--tokens", type=int, default=1664, help="T: prompt chunk / group tokens (default 1664)")
    parser.add_argument("--memory", type=int, default=65536, help="S: memory / cache slots (default 65536)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--hlo-dir", help="also save each lowered module as DIR/<platform>-<step>.mlir")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/lowering-<platform>.json)")
    args = parser.parse_args(argv)
    which = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    if unknown := set(which) - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    config = PRESETS[args.preset]()
    if args.layers is not None:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=args.layers))
    records = lower_steps(
        config,
        args.platform,
        backend=args.attention,
        tokens=args.tokens,
        memory=args.memory,
        which=which,
        hlo_dir=args.hlo_dir,
    )
    print(format_table(records, ("step", "platform", "backend", "lowered", "tokens_T", "slots_S",
                                 "tensors_with_T_and_S", "seconds")))  # fmt: skip
    out = Path(args.out or RESULTS_DIR / f"lowering-{args.platform}.json")
    _write_text(out, json.dumps(records, indent=2) + "\n")
    print(f"wrote {out}")
    return records


if __name__ == "__main__":
    main()
