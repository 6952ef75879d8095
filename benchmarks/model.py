"""The jitted Flax model against transformers (eager PyTorch) on the same random Qwen2.5-VL weights and inputs.

Three measurements, each for both implementations in the same run:

- vision: encoding one video's patches (patches/s), ours ``encode.encode_patches`` vs HF ``model.visual``;
- prefill: the LLM over a text prompt of ``--prompt-len`` tokens into a fresh cache, logits of the last token
  (tokens/s), ours ``dense.prefill`` vs HF's forward with ``use_cache=True``;
- decode: ``--new-tokens`` greedy steps after the token the prefill chose (tokens/s), ours ``dense.decode_loop``
  (one on-device loop) vs an HF loop of cached forward calls, timed without the prefill.

The model is a random config of a few hundred million parameters (``--size``), built with transformers, saved and
loaded by ``qv_jax.load_model``, so both sides hold identical weights. On CPU both run in float32, on GPU in
bfloat16; HF runs eagerly (no ``torch.compile``) with its default ``attn_implementation="sdpa"``. Run
``python -m benchmarks.model``; prints a table with the speedup (HF time / ours) and writes
``benchmarks/results/model.json``. Ours is timed first, then HF, so that neither runs while the other library's
worker threads still spin. The greedy tokens of both are compared as a sanity check (``same_greedy_tokens``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import format_table, time_call, write_json

SIZES = {
    # ~250M parameters: 160M text (untied 32K vocab), 25M vision
    "base": {
        "text": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 8, "heads": (16, 4)},
        "vision": {"depth": 8, "hidden_size": 512, "num_heads": 8, "intermediate_size": 1536},
        "vocab": 32768,
    },
    # for a quick check of the script
    "small": {
        "text": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "heads": (4, 2)},
        "vision": {"depth": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256},
        "vocab": 4096,
    },
}


def hf_config(size: str):
    from transformers import Qwen2_5_VLConfig

    spec = SIZES[size]
    text, vision, vocab = spec["text"], spec["vision"], spec["vocab"]
    heads, kv_heads = text["heads"]
    half = text["hidden_size"] // heads // 2
    sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # Qwen's 16:24:24 split
    return Qwen2_5_VLConfig(
        text_config={
            "hidden_size": text["hidden_size"],
            "intermediate_size": text["intermediate_size"],
            "num_hidden_layers": text["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": vocab,
            "rope_scaling": {"type": "mrope", "mrope_section": sections},
            "bos_token_id": vocab - 9,
            "eos_token_id": vocab - 8,
        },
        vision_config={
            **vision,
            "out_hidden_size": text["hidden_size"],
            "fullatt_block_indexes": sorted({vision["depth"] // 2 - 1, vision["depth"] - 1}),
        },
        vision_start_token_id=vocab - 5,
        vision_end_token_id=vocab - 4,
        image_token_id=vocab - 3,
        video_token_id=vocab - 2,
    )


def _median_excluding_setup(setup, run, repeats: int) -> float:
    """Median seconds of ``run(setup())`` over ``repeats`` after one warm-up, ``setup`` untimed."""
    run(setup())
    times = []
    for _ in range(repeats):
        state = setup()
        start = time.perf_counter()
        run(state)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_qv_jax(ours, pixels, grid, ids, positions, new_tokens: int, repeats: int):
    """Median seconds of vision / prefill / decode with our jitted steps, and the greedy tokens decoded."""
    from qv_jax.runtime import SamplingParams, dense, encode

    g, s = ours.graphdef, ours.state
    B, T = ids.shape
    pixels_j = jnp.asarray(pixels)
    x = encode.embed(g, s, jnp.asarray(ids, jnp.int32))
    pos_j, seg_j = jnp.asarray(positions), jnp.zeros((B, T), jnp.int32)
    capacity = -(-(T + new_tokens + 1) // 128) * 128
    out = {}
    out["vision"] = time_call(lambda: encode.encode_patches(g, s, pixels_j, grid).block_until_ready(), repeats=repeats)[
        "median_s"
    ]

    def prefill(cache):
        logits, cache = dense.prefill(g, s, cache, x, pos_j, seg_j)
        return jnp.argmax(logits, -1).astype(jnp.int32).block_until_ready(), cache

    out["prefill"] = _median_excluding_setup(lambda: ours.new_cache(B, capacity), prefill, repeats)
    tokens = []

    def decode(state):
        first, cache = state
        rest, _, _ = dense.decode_loop(
            g,
            s,
            cache,
            first,
            jnp.full((B,), T, jnp.int32),
            jnp.zeros((B,), bool),
            jax.random.key(0),
            jnp.zeros((0,), jnp.int32),
            jnp.int32(0),
            SamplingParams(),
            num_steps=new_tokens,
        )
        tokens[:] = [np.concatenate([np.asarray(first)[:, None], np.asarray(rest)], axis=1)]

    out["decode"] = _median_excluding_setup(lambda: prefill(ours.new_cache(B, capacity)), decode, repeats)
    return out, tokens[0]


def time_hf(hf, pixels, grid, ids, positions, new_tokens: int, repeats: int, device: str, dtype):
    """The same three measurements for the transformers model (eager PyTorch), and its greedy tokens."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    pixels_t = torch.from_numpy(pixels).to(device, dtype)
    grid_t = torch.tensor(grid, device=device)
    ids_t = torch.from_numpy(ids).to(device)
    pos_t = torch.from_numpy(positions.astype(np.int64)).to(device)
    B, T = ids.shape
    out = {}

    def vision():
        with torch.no_grad():
            hf.model.visual(pixels_t, grid_thw=grid_t)
        sync()

    out["vision"] = time_call(vision, repeats=repeats)["median_s"]

    def prefill():
        with torch.no_grad():
            result = hf(input_ids=ids_t, position_ids=pos_t, use_cache=True, logits_to_keep=1)
        sync()
        return result.logits[:, -1].argmax(-1), result.cache

    out["prefill"] = time_call(prefill, repeats=repeats)["median_s"]
    tokens = []

    def decode(state):
        token, cache = state
        generated = [token]
        with torch.no_grad():
            for i in range(new_tokens):
                step_pos = torch.full((3, B, 1), T + i, device=device, dtype=torch.long)
                result = hf(input_ids=token[:, None], position_ids=step_pos, cache=cache, use_cache=True)
                token, cache = result.logits[:, -1].argmax(-1), result.cache
                generated.append(token)
        sync()
        tokens[:] = [torch.stack(generated, dim=1).cpu().numpy()]

    out["decode"] = _median_excluding_setup(prefill, decode, repeats)
    return out, tokens[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="base")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--video-grid", type=int, nargs=3, default=[4, 16, 16], metavar=("T", "H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on accelerators")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    import qv_jax

    platform = jax.default_backend()
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = hf_config(args.size)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    hf = hf.to(getattr(torch, dtype)).to(device).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = qv_jax.load_model(tmp, dtype=dtype, tokenizer=False)
    print(f"{n_params / 1e6:.0f}M parameters, {dtype}, jax on {platform}, torch on {device}")

    rng = np.random.default_rng(0)
    B, T, N = args.batch, args.prompt_len, args.new_tokens
    grid = (tuple(args.video_grid),)
    n_patches = int(np.prod(args.video_grid))
    pixels = rng.standard_normal((n_patches, ours.config.vision.patch_dim)).astype(np.float32)
    ids = rng.integers(0, config.text_config.vocab_size - 16, (B, T))
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (3, B, T))
    # all of ours first, then all of HF: neither runs while the other's worker threads are still spinning
    ours_s, ours_tokens = time_qv_jax(ours, pixels, grid, ids, positions, N, args.repeats)
    hf_s, hf_tokens = time_hf(hf, pixels, grid, ids, positions, N, args.repeats, device, getattr(torch, dtype))
    work = {"vision": n_patches, "prefill": B * T, "decode": B * N}
    units = {"vision": "patches/s", "prefill": "tokens/s", "decode": "tokens/s"}
    rows = [(stage, units[stage], work[stage], ours_s[stage], hf_s[stage]) for stage in work]
    same_tokens = bool(np.array_equal(ours_tokens, hf_tokens))
    print(f"greedy tokens identical: {same_tokens}")

    table = [
        {
            "stage": stage,
            "unit": unit,
            "work": work,
            "qv_jax_s": ours_s,
            "hf_s": hf_s,
            "qv_jax_rate": work / ours_s,
            "hf_rate": work / hf_s,
            "speedup": hf_s / ours_s,
        }
        for stage, unit, work, ours_s, hf_s in rows
    ]
    print(format_table(table, ["stage", "unit", "work", "qv_jax_s", "hf_s", "qv_jax_rate", "hf_rate", "speedup"]))
    path = write_json(
        "model",
        {
            "args": vars(args),
            "dtype": dtype,
            "parameters": n_params,
            "torch_device": device,
            "hf_attention": hf.config._attn_implementation,
            "same_greedy_tokens": same_tokens,
            "rows": table,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
