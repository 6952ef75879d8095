"""Block-sparse prefill attention: work saved by streaming heads, and time against a dense kernel in the same run.

For each sequence length and fraction of streaming KV heads (DuoAttention / LServe: the rest stay dense), at
Qwen2.5-VL-7B's text shape (28 query heads, 4 KV heads, head dim 128, bf16):

- always: the tiles the kernels visit (``visited_blocks``) against the dense causal triangle, i.e. the fraction of
  dense work left and the speedup a kernel whose run time is proportional to visited tiles would reach;
- on TPU / GPU, per call kind of the model (``qv_jax.attention.calls``: a chunk over itself with and without segment
  ids, a ``--call-chunk``-token chunk over a memory of that many slots with empty slots, one decode token over a
  left-padded cache), dense and with 50 % streaming heads: ours (``pallas``) against jax's shipped kernels
  (``jax``: splash attention on TPU, Pallas ``mha`` / ``gqa`` decode on GPU) and cuDNN (GPU, dense calls without
  segment ids), and, per call kind, the backend that was fastest over the lengths: what ``auto`` should run
  (``qv_jax.attention.backends.AUTO``). ``--call-backends`` rehearses this on CPU (e.g. ``chunked jax-interpret``);
- on CPU: the ``reference`` backend (dense math under the pattern's mask, so no speedup is expected) against
  ``jax.nn.dot_product_attention``, at the shorter lengths that fit in memory;
- on CPU, at ``--chunked-lengths`` (8K / 32K / 64K) with ``--cpu-heads`` (fewer heads than 7B, so that a dense
  64K call takes a minute on two cores): the ``chunked`` backend's wall time, dense against 50 % streaming heads,
  and its compiled temporary bytes against the ``reference``'s (compiled, not run where it would not fit).

Run ``python -m benchmarks.attention`` (``--help`` for the knobs). Prints a table and writes
``benchmarks/results/attention.json``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks.common import format_table, time_call, write_json
from qv_jax.attention import HeadPattern, calls, sparse_attention, visited_blocks
from qv_jax.attention.backends import DEFAULT_BLOCKS, AttentionConfig, CallKind

HQ, HKV, HEAD_DIM = 28, 4, 128
CALL_BACKENDS = {"tpu": ("pallas", "jax"), "gpu": ("pallas", "jax", "cudnn")}


def head_patterns(fraction: float, sink: int, local: int) -> tuple[HeadPattern, ...]:
    """``round(fraction * HKV)`` streaming heads (the last ones), the others dense."""
    n_streaming = round(fraction * HKV)
    return (HeadPattern.dense(),) * (HKV - n_streaming) + (HeadPattern.streaming(sink, local),) * n_streaming


def dense_baseline(platform: str):
    """``jax.nn.dot_product_attention`` (cuDNN on GPU, XLA elsewhere) in our ``[B, H, T, D]`` layout."""
    implementation = "cudnn" if platform == "gpu" else "xla"

    def attend(q, k, v):
        out = jax.nn.dot_product_attention(
            q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), is_causal=True, implementation=implementation
        )
        return out.swapaxes(1, 2)

    return f"jax.nn.dot_product_attention[{implementation}]", attend


def call_operands(kind: CallKind, n: int, chunk: int) -> tuple[tuple, dict]:
    """Arguments of ``calls.<kind>`` at ``n`` tokens / slots (Qwen2.5-VL-7B's text heads, bf16, batch 1)."""
    keys = jax.random.split(jax.random.key(n), 3)
    T = {CallKind.MEMORY: chunk, CallKind.DECODE: 1}.get(kind, n)
    q = jax.random.normal(keys[0], (1, HQ, T, HEAD_DIM), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, HKV, n, HEAD_DIM), jnp.bfloat16) for key in keys[1:])
    slot = jnp.arange(n)
    if kind == CallKind.SELF:
        return (q, k, v), {}
    if kind == CallKind.SELF_SEGMENTS:  # two packed prompts
        return (q, k, v), {"segment_ids": (slot >= n // 2).astype(jnp.int32)[None]}
    kv_ids = jnp.where(slot % 8 == 7, -1, 0)[None] if kind == CallKind.MEMORY else jnp.where(slot < n // 10, -1, 0)
    ids = {"q_segment_ids": jnp.zeros((1, T), jnp.int32), "kv_segment_ids": kv_ids.reshape(1, n).astype(jnp.int32)}
    return (q, k, v), ids


def call_fn(kind: CallKind, config: AttentionConfig, patterns):
    """``calls.<kind>`` as a jitted function of ``(q, k, v, ids)``."""
    if kind in (CallKind.SELF, CallKind.SELF_SEGMENTS):
        return jax.jit(
            lambda q, k, v, ids: calls.self_attention(config, q, k, v, causal=True, patterns=patterns, **ids)
        )
    call = calls.memory_attention if kind == CallKind.MEMORY else calls.decode_attention
    return jax.jit(lambda q, k, v, ids: call(config, q, k, v, **ids))


def call_rows(rows: list[dict], backends, kernel, lengths, fractions, sink: int, local: int, chunk: int, repeats: int):
    """Append to ``rows`` one row per call kind, length and head mix: each backend's median time (or its error),
    and the fastest. Rows are appended as they are timed, so an interrupted run keeps the ones it finished.

    The memory and decode calls take no head patterns (a memory or cache is read densely), so they run once per
    length; cuDNN only differs from ``pallas`` on a dense call without segment ids.
    """
    for n in lengths:
        for kind in CallKind:
            for fraction in fractions if kind in (CallKind.SELF, CallKind.SELF_SEGMENTS) else fractions[:1]:
                patterns = head_patterns(fraction, sink, local)
                (q, k, v), ids = call_operands(kind, n, chunk)
                row = {"call": str(kind), "tokens_T": q.shape[2], "slots_S": n}
                row["streaming_heads"] = f"{round(fraction * HKV)}/{HKV}"
                for backend in backends:
                    if backend == "cudnn" and (kind != CallKind.SELF or fraction):
                        continue
                    config = AttentionConfig(backend, kernel if backend != "cudnn" else None)
                    fn = call_fn(kind, config, patterns)
                    try:
                        timing = time_call(functools.partial(_run, fn, q, k, v, ids), repeats=repeats)
                    except Exception as e:  # one kernel failing to compile here must not hide the others' times
                        row[f"{backend}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    else:
                        row[f"{backend}_ms"] = timing["median_s"] * 1e3
                timed = {b: row[f"{b}_ms"] for b in backends if f"{b}_ms" in row}
                row["fastest"] = min(timed, key=timed.get) if timed else None
                rows.append(row)
                print(f"{kind} T={row['tokens_T']} S={n} {row['streaming_heads']} streaming: {timed}", flush=True)


def fastest_per_call(rows: list[dict], backends) -> list[dict]:
    """Per call kind: the backend with the least total time over the rows every backend ran, and its speedup over
    ours (``pallas``, or the first backend)."""
    summary = []
    for kind in dict.fromkeys(r["call"] for r in rows):
        mine = [r for r in rows if r["call"] == kind]
        ran = [b for b in backends if any(f"{b}_ms" in r for r in mine)]
        complete = [r for r in mine if all(f"{b}_ms" in r for b in ran)]
        if not complete:
            continue
        totals = {b: sum(r[f"{b}_ms"] for r in complete) for b in ran}
        ours = "pallas" if "pallas" in totals else ran[0]
        best = min(totals, key=totals.get)
        summary.append(
            {"call": kind, "fastest": best, "rows": len(complete), "speedup_vs_" + ours: totals[ours] / totals[best]}
        )
    return summary


def chunked_rows(lengths, fractions, heads: tuple[int, int, int], sink: int, local: int, repeats: int) -> list[dict]:
    """CPU rows: ``chunked`` wall time per pattern mix and compiled temporary bytes against ``reference``."""
    N, K, H = heads
    rows = []
    for n in lengths:
        kq, kk, kv = jax.random.split(jax.random.key(n), 3)
        q = jax.random.normal(kq, (1, N, n, H), jnp.float32)
        k, v = (jax.random.normal(x, (1, K, n, H), jnp.float32) for x in (kk, kv))
        dense_ms = None
        for fraction in fractions:
            streaming = round(fraction * K)
            patterns = (HeadPattern.dense(),) * (K - streaming) + (HeadPattern.streaming(sink, local),) * streaming
            temp = {}
            for backend in ("chunked", "reference"):
                fn = jax.jit(functools.partial(sparse_attention, patterns=patterns, backend=backend))
                compiled = fn.trace(q, k, v).lower().compile()
                temp[backend] = compiled.memory_analysis().temp_size_in_bytes
                if backend == "chunked":
                    timing = time_call(functools.partial(_run, compiled, q, k, v), repeats=repeats, warmup=0)
            ms = timing["median_s"] * 1e3
            dense_ms = ms if streaming == 0 else dense_ms
            rows.append(
                {
                    "tokens": n,
                    "streaming_heads": f"{streaming}/{K}",
                    "chunked_ms": ms,
                    "speedup_vs_dense": None if dense_ms is None else dense_ms / ms,
                    "chunked_temp_MiB": temp["chunked"] / 2**20,
                    "reference_temp_MiB": temp["reference"] / 2**20,
                    "temp_ratio": temp["reference"] / max(temp["chunked"], 1),
                }
            )
            print(f"{n} tokens, {streaming}/{K} streaming: chunked {ms:.0f} ms", flush=True)
    return rows


def _run(fn, *args):
    return jax.block_until_ready(fn(*args))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--cpu-lengths", type=int, nargs="+", default=[1024, 2048], help="timed lengths on CPU")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--local", type=int, default=256)
    parser.add_argument("--block-q", type=int, default=None, help="default: the kernel's production tile")
    parser.add_argument("--block-kv", type=int, default=None)
    parser.add_argument(
        "--chunked-lengths",
        type=int,
        nargs="*",
        default=[8192, 32768, 65536],
        help="CPU: lengths of the chunked-against-reference rows (none to skip)",
    )
    parser.add_argument(
        "--cpu-heads",
        type=int,
        nargs=3,
        default=[4, 2, 128],
        metavar=("N", "K", "H"),
        help="CPU chunked rows: query heads, KV heads, head dim (default 4 2 128)",
    )
    parser.add_argument(
        "--call-backends",
        nargs="*",
        default=None,
        help="backends timed per call kind (default on TPU: pallas jax; GPU: pallas jax cudnn; CPU: none)",
    )
    parser.add_argument("--call-lengths", type=int, nargs="*", default=None, help="default: --lengths")
    parser.add_argument("--call-chunk", type=int, default=2048, help="tokens of the chunk over a memory")
    parser.add_argument("--kernel", choices=("tpu", "gpu"), default=None, help="kernel family of the call rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true", help="only count visited tiles")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    platform = jax.default_backend()
    accelerated = platform in ("tpu", "gpu")
    kernel = "tpu" if platform == "tpu" else "gpu"
    block_q = args.block_q or DEFAULT_BLOCKS[kernel][0]
    block_kv = args.block_kv or DEFAULT_BLOCKS[kernel][1]
    # on an accelerator the call rows time ours against jax's kernels and cuDNN; the CPU times the reference
    timed_lengths = set() if accelerated else set(args.cpu_lengths)
    lengths = sorted(set(args.lengths) | (set() if args.no_timing else timed_lengths))

    # tiles of the kernel that runs here (or the ones asked for); on CPU, the production tiles of both kernels
    tiles = [(block_q, block_kv)]
    if not (accelerated or args.block_q or args.block_kv):
        tiles = list(dict.fromkeys(DEFAULT_BLOCKS[name] for name in ("tpu", "gpu")))
    counts, timings = [], []
    for n in lengths:
        key = jax.random.key(n)
        q = k = v = None
        if n in timed_lengths and not args.no_timing:
            kq, kk, kv = jax.random.split(key, 3)
            q = jax.random.normal(kq, (1, HQ, n, HEAD_DIM), jnp.bfloat16)
            k = jax.random.normal(kk, (1, HKV, n, HEAD_DIM), jnp.bfloat16)
            v = jax.random.normal(kv, (1, HKV, n, HEAD_DIM), jnp.bfloat16)
            base_name, base_fn = dense_baseline(platform)
            base_fn = jax.jit(base_fn)
            baseline = time_call(functools.partial(_run, base_fn, q, k, v), repeats=args.repeats)
        for fraction in args.fractions:
            patterns = head_patterns(fraction, args.sink, args.local)
            for tile_q, tile_kv in tiles:
                visited = visited_blocks(patterns, n, n, num_kv_heads=HKV, block_q=tile_q, block_kv=tile_kv)
                dense = visited_blocks(HeadPattern.dense(), n, n, num_kv_heads=HKV, block_q=tile_q, block_kv=tile_kv)
                counts.append(
                    {
                        "tokens": n,
                        "streaming_heads": f"{round(fraction * HKV)}/{HKV}",
                        "tiles": f"{tile_q}x{tile_kv}",
                        "visited": int(visited.sum()),
                        "dense_visited": int(dense.sum()),
                        "work_fraction": float(visited.sum() / dense.sum()),
                        "ideal_speedup": float(dense.sum() / visited.sum()),
                    }
                )
                print(
                    f"{n} tokens, {counts[-1]['streaming_heads']} streaming, {counts[-1]['tiles']} tiles: "
                    f"{counts[-1]['visited']} visited",
                    flush=True,
                )
            if q is None:
                continue
            backend = "reference"
            fn = jax.jit(functools.partial(sparse_attention, patterns=patterns, backend=backend))
            timing = time_call(functools.partial(_run, fn, q, k, v), repeats=args.repeats)
            timings.append(
                {
                    "tokens": n,
                    "streaming_heads": f"{round(fraction * HKV)}/{HKV}",
                    "backend": backend,
                    "time_ms": timing["median_s"] * 1e3,
                    "baseline": base_name,
                    "baseline_ms": baseline["median_s"] * 1e3,
                    "speedup": baseline["median_s"] / timing["median_s"],
                }
            )
            print(
                f"{n} tokens, {timings[-1]['streaming_heads']} streaming: {timings[-1]['time_ms']:.2f} ms "
                f"({backend}) vs {timings[-1]['baseline_ms']:.2f} ms ({base_name})",
                flush=True,
            )

    chunked = []
    if not accelerated and not args.no_timing and args.chunked_lengths:
        chunked = chunked_rows(
            args.chunked_lengths, (0.0, 0.5), tuple(args.cpu_heads), args.sink, args.local, max(1, args.repeats - 2)
        )
    call_backends = CALL_BACKENDS.get(platform, ()) if args.call_backends is None else tuple(args.call_backends)
    per_call, fastest, interrupted = [], [], False
    if call_backends and not args.no_timing:
        lengths_ = args.lengths if args.call_lengths is None else args.call_lengths
        try:
            call_rows(
                per_call, call_backends, args.kernel, lengths_, (0.0, 0.5), args.sink, args.local, args.call_chunk,
                args.repeats,
            )  # fmt: skip
        except KeyboardInterrupt:  # benchmarks/accelerator.sh stops a step past its limit with SIGINT: keep the rows
            interrupted = True
            print("interrupted: writing the call rows timed so far", flush=True)
        fastest = fastest_per_call(per_call, call_backends)
    print()
    print(format_table(counts, list(counts[0])))
    for rows in (per_call, fastest):
        if rows:
            print()
            print(format_table(rows, list(dict.fromkeys(c for r in rows for c in r if not c.endswith("_error")))))
    if chunked:
        print()
        print(format_table(chunked, list(chunked[0])))
    if timings:
        print()
        print(format_table(timings, list(timings[0])))
    shape = {"q_heads": HQ, "kv_heads": HKV, "head_dim": HEAD_DIM, "dtype": "bfloat16", "batch": 1}
    config = {**vars(args), "platform": platform, "block_q": block_q, "block_kv": block_kv, "shape": shape}
    config["call_rows_interrupted"] = interrupted
    payload = {
        "config": config,
        "visited": counts,
        "timings": timings,
        "chunked": chunked,
        "calls": per_call,
        "fastest_per_call": fastest,
    }
    path = write_json("attention", payload, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
