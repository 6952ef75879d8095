"""One model on device meshes: per-device parameter and KV bytes, and step times, against one device in the same run.

For each ``(data, model)`` mesh of the visible devices (on CPU, ``--cpu-devices`` forced host devices, 8 by
default), the same random Qwen2.5-VL weights are laid out by ``qv_jax.sharding`` and measured:

- bytes: parameters and a dense KV cache (``--batch`` rows of ``--capacity`` slots) held by the fullest device;
- prefill: ``--batch`` rows of ``--prompt-len`` tokens into a fresh cache (tokens/s over the whole batch);
- decode: ``--new-tokens`` greedy steps in one on-device loop (tokens/s over the whole batch);
- vision: one video of ``--video-grid`` patches through the vision tower, three ways: as qv-jax runs it
  (``vision_s``: frames split over ``"data"``, weights split over ``"model"``), tensor parallel only
  (``vision_tp_only_s``: every data shard encodes the whole video), and frame parallel over every device
  (``vision_frames_all_s``: weights whole on each device). All exact: vision attention never crosses frames;
- the greedy tokens of every mesh are compared with the one-device run (``same_tokens``).

A second table needs no devices: the released Qwen2.5-VL 3B and 7B in bfloat16, which meshes the head rule
accepts, and their parameter and KV bytes per device (KV per 32K tokens of one video).

On forced CPU devices all "devices" share the host's cores, so step times show the overhead of the collectives
rather than any speed-up; the bytes are the point. Run ``python -m benchmarks.sharding``; writes
``benchmarks/results/sharding.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-devices", type=int, default=8, help="forced host devices when running on CPU")
    p.add_argument("--size", choices=("base", "small"), default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--video-grid", type=int, nargs=3, default=(8, 16, 16), metavar=("T", "H", "W"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    return p.parse_args()


def _config(size: str):
    from qv_jax.testing import tiny_config

    base = tiny_config(vocab_size=32768 if size == "base" else 4096)
    if size == "base":  # ~250M parameters, the shape of benchmarks/model.py's "base" model
        text = dataclasses.replace(
            base.text,
            hidden_size=1024,
            intermediate_size=3072,
            num_layers=8,
            num_heads=16,
            num_kv_heads=4,
            mrope_section=(8, 12, 12),
        )
        vision = dataclasses.replace(
            base.vision,
            depth=8,
            hidden_size=512,
            num_heads=8,
            intermediate_size=1536,
            out_hidden_size=1024,
            window_size=112,
            fullatt_block_indexes=(3, 7),
        )
    else:  # a quick check of the script
        text = dataclasses.replace(
            base.text, hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2, mrope_section=(4, 6, 6)
        )
        vision = dataclasses.replace(base.vision, hidden_size=128, num_heads=4, intermediate_size=256)
        vision = dataclasses.replace(vision, out_hidden_size=256)
    return dataclasses.replace(base, text=text, vision=vision)


def _meshes(n: int) -> list[tuple[int, int]]:
    return [(n // m, m) for m in sorted({m for m in range(1, n + 1) if n % m == 0}, reverse=True)]


def _timed(setup, run, repeats: int) -> float:
    """Median seconds of ``run(setup())`` (the setup, e.g. a fresh donated cache, not timed), after a warm-up."""
    import jax

    jax.block_until_ready(run(setup()))
    times = []
    for _ in range(repeats):
        arg = jax.block_until_ready(setup())
        start = time.perf_counter()
        jax.block_until_ready(run(arg))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _frame_parallel_encoder(model, patches, grid):
    """Vision tower with whole weights on every device, frames split over all devices (``shard_map``)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qv_jax.sharding import AXES

    mesh = model.mesh
    (t, h, w), n = grid[0], mesh.size
    if t % n:
        return None
    # the vision tower alone, its weights whole on every device
    graphdef, state = nnx.split(model.model.vision)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    local_grid = ((t // n, h, w),)

    def encode(state, patches):
        return nnx.merge(graphdef, state)(patches, local_grid, model.attention)

    run = jax.jit(jax.shard_map(encode, mesh=mesh, in_specs=(P(), P(AXES)), out_specs=P(AXES), check_vma=False))
    patches = jax.device_put(patches, NamedSharding(mesh, P(AXES)))
    return functools.partial(run, state, patches)


def _measure(m, inputs, args, baseline_tokens=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qv_jax.runtime import SamplingParams, dense, encode
    from qv_jax.sharding import bytes_per_device

    B, T = inputs["ids"].shape
    cache_bytes = bytes_per_device(m.new_cache(B, args.capacity))
    row = {
        "param_bytes_per_device": max(bytes_per_device(m.state).values()),
        "kv_bytes_per_device": max(cache_bytes.values()),
    }
    x = encode.embed(m.graphdef, m.state, m._batch(inputs["ids"]))
    positions, segments = m._batch(inputs["positions"], 1), m._batch(inputs["segments"])

    def prefill(cache):
        return dense.prefill(m.graphdef, m.state, cache, x, positions, segments)

    row["prefill_s"] = _timed(lambda: m.new_cache(B, args.capacity), prefill, args.repeats)
    filled = prefill(m.new_cache(B, args.capacity))
    first = jnp.argmax(filled[0], axis=-1).astype(jnp.int32)
    next_pos = m._batch(np.full((B,), T, np.int32))

    def decode(cache):
        done = jnp.zeros((B,), bool)
        key, stop, pad = jax.random.key(0), jnp.asarray([-1], jnp.int32), jnp.int32(0)
        loop = functools.partial(dense.decode_loop, m.graphdef, m.state, num_steps=args.new_tokens)
        return loop(cache, first, next_pos, done, key, stop, pad, SamplingParams())

    row["decode_s"] = _timed(lambda: prefill(m.new_cache(B, args.capacity))[1], decode, args.repeats)
    tokens = np.asarray(decode(prefill(m.new_cache(B, args.capacity))[1])[0])
    row["prefill_tok_s"] = B * T / row["prefill_s"]
    row["decode_tok_s"] = B * args.new_tokens / row["decode_s"]
    row["same_tokens"] = None if baseline_tokens is None else bool(np.array_equal(tokens, baseline_tokens))

    grid = (tuple(args.video_grid),)
    patches = jnp.asarray(inputs["patches"])
    tensor_parallel = functools.partial(encode.encode_patches, m.graphdef, m.state, patches, grid)
    row["vision_s"] = _timed(lambda: None, lambda _: m.encode_pixels(patches, np.array(grid)), args.repeats)
    if m.mesh is not None:
        row["vision_tp_only_s"] = _timed(lambda: None, lambda _: tensor_parallel(), args.repeats)
        frames = _frame_parallel_encoder(m, patches, grid)
        row["vision_frames_all_s"] = None if frames is None else _timed(lambda: None, lambda _: frames(), args.repeats)
    return row, tokens


def _released_models(devices: int) -> list[dict]:
    """Bytes per device of the released 3B / 7B in bfloat16 on each mesh the head rule accepts (no allocation)."""
    import jax.numpy as jnp

    import qv_jax
    from qv_jax.errors import ShardingError
    from qv_jax.model.config import ModelConfig
    from qv_jax.sharding import ShardingPlan, describe

    rows = []
    for name, config in (("3B", ModelConfig.qwen2_5_vl_3b()), ("7B", ModelConfig.qwen2_5_vl_7b())):
        for data, model in _meshes(devices):
            row = {"model": name, "mesh": f"{data}x{model}"}
            try:
                plan = ShardingPlan.create(config, qv_jax.make_mesh(data=data, model=model))
            except ShardingError as e:
                rows.append(row | {"note": str(e).split(":")[0]})
                continue
            info = describe(plan, jnp.bfloat16)
            t = plan.config.text
            kv = 2 * t.num_layers * t.num_kv_heads * 32768 * t.head_dim * 2  # one 32K-token video, bf16
            rows.append(
                row
                | {
                    "kv_repeat": plan.kv_repeat,
                    "param_GB_per_device": info["param_bytes_per_device"] / 1e9,
                    "kv_GB_per_device_32k": kv / model / 1e9,
                    "moved_params": len(info["moved"]),
                }
            )
    return rows


def main() -> None:
    args = _parse()
    flag = f"--xla_force_host_platform_device_count={args.cpu_devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax
    import numpy as np

    import qv_jax
    from benchmarks.common import format_table, write_json
    from qv_jax.model.rope_index import text_position_block
    from qv_jax.runtime import VisionLanguageModel

    config = _config(args.size)
    rng = np.random.default_rng(0)
    B, T = args.batch, args.prompt_len
    t, h, w = args.video_grid
    inputs = {
        "ids": rng.integers(0, config.text.vocab_size - 16, (B, T)).astype(np.int32),
        "positions": np.broadcast_to(text_position_block(T, 0)[:, None], (3, B, T)).astype(np.int32),
        "segments": np.zeros((B, T), np.int32),
        "patches": rng.standard_normal((t * h * w, config.vision.patch_dim)).astype(np.float32),
    }
    devices = jax.device_count()
    rows = []
    single = VisionLanguageModel.random(config, seed=0)
    params = sum(x.size for x in jax.tree.leaves(single.state))
    base, baseline_tokens = _measure(single, inputs, args)
    rows.append({"mesh": "1 device", **base})
    del single
    for data, model in _meshes(devices):
        m = VisionLanguageModel.random(config, seed=0, mesh=qv_jax.make_mesh(data=data, model=model))
        row, _ = _measure(m, inputs, args, baseline_tokens)
        rows.append({"mesh": f"{data}x{model}", "kv_repeat": m.plan.kv_repeat, **row})
        del m
    for row in rows:
        row["param_MB"] = row.pop("param_bytes_per_device") / 2**20
        row["kv_MB"] = row.pop("kv_bytes_per_device") / 2**20

    columns = ["mesh", "kv_repeat", "param_MB", "kv_MB", "prefill_tok_s", "decode_tok_s", "vision_s"]
    columns += ["vision_tp_only_s", "vision_frames_all_s", "same_tokens"]
    platform = jax.devices()[0].platform
    print(f"{config.variant} random model of {params / 1e6:.0f}M parameters, {devices} {platform} devices")
    print(format_table(rows, columns))
    released = _released_models(devices)
    print()
    print(format_table(released, ["model", "mesh", "kv_repeat", "param_GB_per_device", "kv_GB_per_device_32k"]))
    for row in released:
        if "note" in row:
            print(f"  {row['model']} {row['mesh']}: {row['note']}")
    path = write_json(
        "sharding",
        {
            "args": vars(args),
            "parameters": int(params),
            "meshes": rows,
            "released_models": released,
            "load_average": os.getloadavg(),  # the machine may be shared: read timings with it
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
