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

With ``--hf``, also what users run today on the same model (written once as a Hugging Face directory, loaded by
both sides) and video: transformers' Qwen2.5-VL with qwen-vl-utils' sampling (``benchmarks/hf_pipeline.py``), and
``quick`` at ρ = 1, whose answer tokens must equal HF's. ``--no-baseline`` skips the baseline (an hour-long video);
the JSON holds the process's peak RSS after ``quick`` and at the end.

The overlap target: the quick wall time within 20 % of its longest lane, the host lane (probe + decode) or the
device lane (vision + prefill + answer), which run at the same time. Run ``python -m benchmarks.e2e``; prints a
table and writes ``benchmarks/results/e2e.json``. The default video (generated once into
``benchmarks/results/videos``) is 60 s of 1920x1080 H.264 at 30 fps, sampled at 1 fps with Qwen's pixel budget.
``--preset bench`` is a 42M-parameter model (8 layers each side); ``--preset 7b`` a random-weight Qwen2.5-VL-7B
(bfloat16) for the GPU target. Results: docs/benchmarks/e2e.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import RESULTS_DIR, format_table, write_json

QUESTION = "What happens in the video? Describe the main events in order."
PRESETS = ("tiny", "bench", "3b", "7b")
VIDEO = {"seconds": 60.0, "fps": 30.0, "size": (1080, 1920), "gop": 60, "bframes": 2}


def bench_config():
    """A 41M-parameter random Qwen2.5-VL (8 text layers of width 512, 8 vision blocks of width 384): big enough
    that the vision tower's and the LLM's arithmetic, not the frameworks' overheads, set the times."""
    from qv_jax.model.config import TextConfig, VisionConfig
    from qv_jax.testing import tiny_config

    text = TextConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        mrope_section=(8, 12, 12),
        max_position_embeddings=128000,
    )
    vision = VisionConfig(
        variant="qwen2_5_vl",
        depth=8,
        hidden_size=384,
        num_heads=6,
        intermediate_size=1024,
        out_hidden_size=512,
        fullatt_block_indexes=(3, 7),
    )
    return dataclasses.replace(tiny_config(), text=text, vision=vision)


def default_video() -> Path:
    from qv_jax.testing.videos import make_sample_video

    path = RESULTS_DIR / "videos" / "e2e_1080p_60s.mp4"
    if not path.is_file():
        print(f"generating {path} ...", flush=True)
        make_sample_video(path, **VIDEO)
    return path


def preset_config(preset: str):
    from qv_jax.model.config import ModelConfig
    from qv_jax.testing import tiny_config

    configs = {"tiny": tiny_config, "bench": bench_config}
    return (configs | {"3b": ModelConfig.qwen2_5_vl_3b, "7b": ModelConfig.qwen2_5_vl_7b})[preset]()


def random_model(preset: str, dtype: str, scratch: Path):
    """A random-weight model of a preset size with a trained test tokenizer, built in memory."""
    from qv_jax.testing import random_model

    return random_model(preset_config(preset), tokenizer_dir=scratch / "tokenizer", dtype=dtype)


def random_model_dir(preset: str, scratch: Path) -> Path:
    """The same as a Hugging Face model directory, which qv-jax and transformers both load (identical weights)."""
    from qv_jax.testing import write_hf_dir

    return write_hf_dir(scratch / f"random-{preset}", preset_config(preset))


def peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (the model and every run before this point included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    return {
        "stages": stages,
        "wall_s": answer.timings.wall_s,
        "kv_bytes": answer.kv_bytes,
        "token_ids": [int(t) for t in answer.token_ids],
    }


def median_run(fn, repeats: int) -> dict:
    fn()  # compile
    runs = [fn() for _ in range(repeats)]
    walls = [r["wall_s"] for r in runs]
    return runs[walls.index(statistics.median_low(walls))]


# stages of the rows: qv-jax's, then HF's processor (normalise + patchify) and generate (vision + prefill + answer)
STAGES = ("decode", "vision", "prefill", "answer", "wait", "processor", "generate")


def row(name: str, result: dict, frames: int, tokens: int, peak: int | None) -> dict:
    stages = result["stages"]
    busy = sum(v for k, v in stages.items() if k != "wait")
    return {
        "variant": name,
        "frames": frames,
        "video tokens": tokens,
        **{f"{s} s": stages.get(s, 0.0) for s in STAGES},
        "sum s": busy,
        "wall s": result["wall_s"],
        "KV MiB": None if result.get("kv_bytes") is None else result["kv_bytes"] / 2**20,
        "peak MiB": None if peak is None else peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, help="video file (default: a generated 60 s 720p clip)")
    parser.add_argument("--model", type=Path, help="model directory (default: a random --preset model)")
    parser.add_argument("--preset", choices=PRESETS, default="tiny", help="random model size (default tiny)")
    parser.add_argument("--dtype", help="default: float32 on CPU, bfloat16 on GPU/TPU")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--max-pixels", type=int, help="per-frame pixel cap (default: Qwen's video budget)")
    parser.add_argument("--min-pixels", type=int, help="per-frame pixel floor (default: Qwen's, 128 x 28 x 28)")
    parser.add_argument("--max-frames", type=int, default=768)
    parser.add_argument("--group-frames", type=int, default=16)
    parser.add_argument("--retention", type=float, default=0.5)
    parser.add_argument("--workers", type=int, help="decoder processes of the quick variant (default: CPU count)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attention", default="auto", help="qv-jax's attention backend (default auto)")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the sequential qv-jax baseline (an hour-long video's RSS)"
    )
    parser.add_argument(
        "--hf",
        action="store_true",
        help="also run Hugging Face transformers + qwen-vl-utils on the same model and video "
        "(benchmarks/hf_pipeline.py; needs torchvision, qwen-vl-utils and decord), and qv-jax at retention 1 to "
        "compare its answer tokens",
    )
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/e2e.json)")
    args = parser.parse_args()

    from qv_jax.runtime import load_model
    from qv_jax.videoqa import VideoQA

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    video = args.video or default_video()
    with tempfile.TemporaryDirectory(prefix="qv-jax-e2e-") as scratch:
        started = time.perf_counter()
        model_dir = args.model
        if model_dir is None and args.hf:
            model_dir = random_model_dir(args.preset, Path(scratch))
        model = load_model(model_dir, dtype) if model_dir else random_model(args.preset, dtype, Path(scratch))
        model = model.with_attention(args.attention)
        print(f"model ready in {time.perf_counter() - started:.1f} s", flush=True)
        options = {"group_frames": args.group_frames, "fps": args.fps, "max_frames": args.max_frames}
        options |= {"max_pixels": args.max_pixels, "min_pixels": args.min_pixels, "workers": args.workers}
        qa = VideoQA(model, retention=args.retention, **options)
        frame_plan, plan = qa.plan(video)
        print(
            f"{video}: {frame_plan.num_frames} frames at {frame_plan.width}x{frame_plan.height}, "
            f"{plan.video_tokens} video tokens in {plan.num_groups} groups of {plan.tokens_per_group}",
            flush=True,
        )
        quick = median_run(lambda: run_quick(qa, video, args.max_new_tokens), args.repeats)
        quick_peak, quick_rss = peak_device_bytes(), peak_rss_bytes()
        baseline = baseline_peak = None
        if not args.no_baseline:
            baseline = median_run(
                lambda: run_baseline(model, video, frame_plan, plan, args.max_new_tokens), args.repeats
            )
            baseline_peak = peak_device_bytes()
        hf = exact = None
        if args.hf:
            exact_qa = VideoQA(model, retention=1.0, **options)
            exact = median_run(lambda: run_quick(exact_qa, video, args.max_new_tokens), args.repeats)
            from benchmarks.hf_pipeline import HFPipeline

            pipeline = HFPipeline(
                model_dir,
                model.tokenizer,
                model.config,
                fps=args.fps,
                max_pixels=args.max_pixels,
                min_pixels=args.min_pixels,
                max_frames=args.max_frames,
                dtype=dtype,
            )
            hf = median_run(lambda: pipeline(video, QUESTION, args.max_new_tokens), args.repeats)

    rows = (
        [] if baseline is None else [row("baseline", baseline, frame_plan.num_frames, plan.video_tokens, baseline_peak)]
    )
    name = f"quick (G={args.group_frames}, ρ={args.retention})"
    rows.append(row(name, quick, frame_plan.num_frames, plan.video_tokens, quick_peak))
    if hf is not None:
        rows.append(row("quick (ρ=1)", exact, frame_plan.num_frames, plan.video_tokens, None))
        rows.append(row("HF transformers + qwen-vl-utils", hf | {"kv_bytes": None}, hf["frames"], None, None))
    columns = list(rows[0])
    print(format_table(rows, columns))
    stages = quick["stages"]
    host = stages.get("probe", 0.0) + stages.get("decode", 0.0)
    device = sum(stages.get(s, 0.0) for s in ("vision", "prefill", "answer"))
    ratio = quick["wall_s"] / max(host, device)
    speedup = None if baseline is None else baseline["wall_s"] / quick["wall_s"]
    print(
        f"quick: wall / longest lane (host {host:.2f} s, device {device:.2f} s) = {ratio:.2f} (target <= 1.20); "
        f"peak RSS after it {quick_rss / 2**30:.2f} GiB"
        + ("" if speedup is None else f"; end-to-end speedup over the baseline {speedup:.2f}x")
    )
    comparison = {}
    if hf is not None:
        same = exact["token_ids"] == hf["token_ids"]
        comparison = {
            "hf": hf,
            "quick_exact": exact,
            "speedup_over_hf": hf["wall_s"] / quick["wall_s"],
            "speedup_over_hf_exact": hf["wall_s"] / exact["wall_s"],
            "same_tokens_as_hf_at_retention_1": same,
            "same_frames_as_hf": [hf["frames"], *hf["frame_size"]] == [frame_plan.num_frames, *frame_plan.size],
        }
        print(
            f"over HF transformers + qwen-vl-utils: {comparison['speedup_over_hf']:.2f}x at ρ={args.retention}, "
            f"{comparison['speedup_over_hf_exact']:.2f}x at ρ=1 (target >= 2x); answer tokens at ρ=1 "
            f"{'equal' if same else 'differ'}: {exact['token_ids']} vs {hf['token_ids']}"
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
            "parameters": sum(int(a.size) for a in jax.tree.leaves(model.state)),
            "attention": args.attention,
            "quick_peak_rss_bytes": quick_rss,
            "peak_rss_bytes": peak_rss_bytes(),
            "rows": rows,
            **comparison,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
