"""End to end: one question about one video, the baseline pipeline against QuickVideo-style, on the same model.

- **baseline**: sequential decoding of the sampled frames (one decoder process), then the vision tower over all
  frames at once, then one prefill of the whole prompt into a dense cache, then greedy decoding — each stage
  waits for the one before;
- **quick**: ``VideoQA.ask`` — parallel decoding (all cores) drained ahead of the device, groups of
  ``--group-frames`` frames encoded and prefilled over the pruned memory of earlier groups (``--retention``,
  ``key_norms_small``), overlapped with decoding; then the question and greedy decoding.

Both variants see the same frames (same plan), the same model and the same question. Each runs once to compile,
then ``--repeats`` times; the run with the median wall time is reported. Per variant: busy seconds per stage,
their sum (without "wait", the time the device loop sat idle waiting for frames), the wall time, KV bytes at the
end, and the device's peak memory where the backend reports it (the peak is process-wide and only grows: quick
runs first, so the baseline's figure is the larger of the two).
"answer" is the question prefill plus decoding for quick, decoding alone for the baseline (whose prompt prefill
includes the question).

The overlap target: the quick wall time within 20 % of its longest lane, the host lane (probe + decode) or the
device lane (vision + prefill + answer), which run at the same time. Run ``python -m benchmarks.e2e``; prints a
table and writes ``benchmarks/results/e2e.json``. The default video (generated once into
``benchmarks/results/videos``) is 60 s of 1280x720 H.264 at 30 fps, sampled at 1 fps, at most 448x448 pixels.
``--preset 7b`` builds a random-weight Qwen2.5-VL-7B (bfloat16) for the GPU target.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import RESULTS_DIR, format_table, write_json

QUESTION = "What happens in the video? Describe the main events in order."
PRESETS = ("tiny", "3b", "7b")
VIDEO = {"seconds": 60.0, "fps": 30.0, "size": (720, 1280), "gop": 60, "bframes": 2}


def default_video() -> Path:
    from qv_jax.testing.videos import make_sample_video

    path = RESULTS_DIR / "videos" / "e2e_720p_60s.mp4"
    if not path.is_file():
        print(f"generating {path} ...", flush=True)
        make_sample_video(path, **VIDEO)
    return path


def random_model(preset: str, dtype: str, scratch: Path):
    """A random-weight model of a preset size with a trained test tokenizer."""
    from qv_jax.model.config import ModelConfig
    from qv_jax.testing import random_model, tiny_config

    config = {"tiny": tiny_config, "3b": ModelConfig.qwen2_5_vl_3b, "7b": ModelConfig.qwen2_5_vl_7b}[preset]()
    return random_model(config, tokenizer_dir=scratch / "tokenizer", dtype=dtype)


def peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def run_baseline(model, video: Path, frame_plan, plan, max_new_tokens: int) -> dict:
    """Sequential decode, vision over all frames, one full prefill, then decoding; seconds per stage.

    ``plan`` is the quick variant's group plan of the same frames: the baseline takes its video grid from it."""
    from qv_jax.runtime import SamplingParams, dense, encode
    from qv_jax.video import VideoReader

    stages, graphdef, state = {}, model.graphdef, model.state
    started = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = now - since
        return now

    with VideoReader(video, workers=1) as reader:
        frames = reader.read(frame_plan).frames
    mark = lap("decode", started)
    embeds = encode.encode_frames(graphdef, state, jnp.asarray(frames))
    embeds.block_until_ready()
    mark = lap("vision", mark)

    grid = plan.grid
    ids = model.tokenizer.video_prompt(QUESTION, grid).input_ids[None]
    seconds = model.config.vision.temporal_patch_size / frame_plan.sample_fps
    positions, deltas = model.position_ids(ids, video_grid_thw=[grid], second_per_grid_ts=[seconds])
    length = ids.shape[1]
    x = encode.embed(graphdef, state, jnp.asarray(ids, jnp.int32), None, embeds)
    cache = model.new_cache(1, -(-(length + max_new_tokens) // 128) * 128)
    logits, cache = dense.prefill(graphdef, state, cache, x, jnp.asarray(positions), jnp.zeros((1, length), jnp.int32))
    logits.block_until_ready()
    mark = lap("prefill", mark)

    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    stop = jnp.asarray(model.eos_token_ids, jnp.int32)
    rest, _, cache = dense.decode_loop(
        graphdef,
        state,
        cache,
        first,
        jnp.asarray(length + deltas[:, 0], jnp.int32),
        jnp.isin(first, stop),
        jax.random.key(0),
        stop,
        jnp.int32(model.pad_token_id),
        SamplingParams(),
        num_steps=max_new_tokens - 1,
    )
    rest.block_until_ready()
    lap("answer", mark)
    wall = time.perf_counter() - started
    text = model.config.text
    kv_tokens = int(cache.length) * text.num_layers
    kv_bytes = kv_tokens * 2 * text.num_kv_heads * text.head_dim * jnp.dtype(model.dtype).itemsize
    return {"stages": stages, "wall_s": wall, "kv_bytes": kv_bytes}


def run_quick(qa, video: Path, max_new_tokens: int) -> dict:
    answer = qa.ask(video, QUESTION, max_new_tokens=max_new_tokens)
    stages = dict(answer.timings.stages)
    return {"stages": stages, "wall_s": answer.timings.wall_s, "kv_bytes": answer.kv_bytes}


def median_run(fn, repeats: int) -> dict:
    fn()  # compile
    runs = [fn() for _ in range(repeats)]
    walls = [r["wall_s"] for r in runs]
    return runs[walls.index(statistics.median_low(walls))]


def row(name: str, result: dict, frames: int, tokens: int, peak: int | None) -> dict:
    stages = result["stages"]
    busy = sum(v for k, v in stages.items() if k != "wait")
    return {
        "variant": name,
        "frames": frames,
        "video tokens": tokens,
        **{f"{s} s": stages.get(s, 0.0) for s in ("decode", "vision", "prefill", "answer", "wait")},
        "sum s": busy,
        "wall s": result["wall_s"],
        "KV MiB": result["kv_bytes"] / 2**20,
        "peak MiB": None if peak is None else peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, help="video file (default: a generated 60 s 720p clip)")
    parser.add_argument("--model", type=Path, help="model directory (default: a random --preset model)")
    parser.add_argument("--preset", choices=PRESETS, default="tiny", help="random model size (default tiny)")
    parser.add_argument("--dtype", help="default: float32 on CPU, bfloat16 on GPU/TPU")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--max-frames", type=int, default=768)
    parser.add_argument("--group-frames", type=int, default=16)
    parser.add_argument("--retention", type=float, default=0.5)
    parser.add_argument("--workers", type=int, help="decoder processes of the quick variant (default: CPU count)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/e2e.json)")
    args = parser.parse_args()

    from qv_jax.runtime import load_model
    from qv_jax.videoqa import VideoQA

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    video = args.video or default_video()
    with tempfile.TemporaryDirectory(prefix="qv-jax-e2e-") as scratch:
        started = time.perf_counter()
        model = load_model(args.model, dtype) if args.model else random_model(args.preset, dtype, Path(scratch))
        print(f"model ready in {time.perf_counter() - started:.1f} s", flush=True)
        qa = VideoQA(
            model,
            group_frames=args.group_frames,
            retention=args.retention,
            fps=args.fps,
            max_frames=args.max_frames,
            max_pixels=args.max_pixels,
            workers=args.workers,
        )
        frame_plan, plan = qa.plan(video)
        print(
            f"{video}: {frame_plan.num_frames} frames at {frame_plan.width}x{frame_plan.height}, "
            f"{plan.video_tokens} video tokens in {plan.num_groups} groups of {plan.tokens_per_group}",
            flush=True,
        )
        quick = median_run(lambda: run_quick(qa, video, args.max_new_tokens), args.repeats)
        quick_peak = peak_device_bytes()
        baseline = median_run(lambda: run_baseline(model, video, frame_plan, plan, args.max_new_tokens), args.repeats)
        baseline_peak = peak_device_bytes()

    rows = [
        row("baseline", baseline, frame_plan.num_frames, plan.video_tokens, baseline_peak),
        row(
            f"quick (G={args.group_frames}, ρ={args.retention})",
            quick,
            frame_plan.num_frames,
            plan.video_tokens,
            quick_peak,
        ),
    ]
    columns = list(rows[0])
    print(format_table(rows, columns))
    stages = quick["stages"]
    host = stages.get("probe", 0.0) + stages.get("decode", 0.0)
    device = sum(stages.get(s, 0.0) for s in ("vision", "prefill", "answer"))
    ratio = quick["wall_s"] / max(host, device)
    speedup = baseline["wall_s"] / quick["wall_s"]
    print(
        f"quick: wall / longest lane (host {host:.2f} s, device {device:.2f} s) = {ratio:.2f} "
        f"(target <= 1.20); end-to-end speedup over the baseline {speedup:.2f}x"
    )
    config = model.config
    path = write_json(
        "e2e",
        {
            "video": str(video),
            "model": str(args.model) if args.model else f"random {args.preset}",
            "dtype": dtype,
            "params_text": {"layers": config.text.num_layers, "hidden": config.text.hidden_size},
            "frames": frame_plan.num_frames,
            "frame_size": [frame_plan.height, frame_plan.width],
            "video_tokens": plan.video_tokens,
            "group_frames": args.group_frames,
            "retention": args.retention,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "baseline": baseline,
            "quick": quick,
            "baseline_peak_bytes": baseline_peak,
            "quick_peak_bytes": quick_peak,
            "quick_wall_over_longest_lane": ratio,
            "speedup": speedup,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
