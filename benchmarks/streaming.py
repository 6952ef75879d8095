"""Live streaming (``VideoQA.stream``, VideoScan carriers) against QuickPrefill on the same frames.

A generated stream (``--seconds`` of video sampled at ``--fps``, ``--side`` x ``--side`` frames) is watched patch
by patch into a bank of ``--carriers`` carriers; per-patch latency (vision + step) at the start, middle and end of
the stream, KV bytes over time, and the real-time factor (stream seconds per second of work). QuickPrefill
(``VideoQA.encode``, ``--retention``, the same frames) is what a user would run instead on a recorded file: its
memory grows with the video. Fidelity: the question's logits over the carrier memory against full attention on the
same stream (``carriers=None, keep_visual="all"``, equal to QuickPrefill at retention 1): mean KL divergence and
top-1 agreement over the question's tokens. The default model is ``--preset bench`` (41M parameters, random
weights: the fidelity numbers say how far the approximation moves the model's state, not answer quality). Run
``python -m benchmarks.streaming``; prints a table, writes ``benchmarks/results/streaming.json`` and a plot beside
it. Results: docs/streaming.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import format_table, write_json
from benchmarks.e2e import PRESETS, random_model

QUESTION = "What happens in the video? Describe the main events in order."


def question_logits(qa, stream, question: str) -> np.ndarray:
    """Float32 logits ``[tokens, V]`` of the question's tokens over a copy of ``stream``'s memory."""
    from qv_jax.model.rope_index import text_position_block
    from qv_jax.pipeline import prefill
    from qv_jax.pipeline.prefill import TextChunk

    suffix = qa.tokenizer.question_suffix(question)
    index = stream._token_index(stream.patches)
    chunk = TextChunk(
        ids=suffix,
        positions=text_position_block(suffix.size, stream._text_start),
        token_index=index + np.arange(suffix.size, dtype=np.int32),
        valid=np.ones(suffix.size, bool),
    )
    kv = stream._bank.kv
    m = qa.model
    logits, _ = prefill.prefill_text(m.graphdef, m.state, kv.padded(kv.capacity + suffix.size), chunk, all_logits=True)
    return np.asarray(logits, np.float64)


def fidelity(approx: np.ndarray, full: np.ndarray) -> dict:
    """Mean KL(full || approx) per token and the share of tokens whose top-1 prediction agrees."""

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p, q = log_softmax(full), log_softmax(approx)
    kl = float((np.exp(p) * (p - q)).sum(axis=-1).mean())
    return {"kl": kl, "top1_agree": float((full.argmax(-1) == approx.argmax(-1)).mean())}


def phase(values: list[float], where: str) -> float:
    """Median of the first, middle or last tenth of ``values`` (at least 2 of them)."""
    n = len(values)
    width = max(2, n // 10)
    start = {"start": 0, "middle": max(0, n // 2 - width // 2), "end": max(0, n - width)}[where]
    return float(np.median(values[start : start + width]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="bench", help="random model size (default bench)")
    parser.add_argument("--seconds", type=float, default=3600.0, help="stream length (default 1 hour)")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--side", type=int, default=112, help="frame side in pixels, a multiple of 28")
    parser.add_argument("--carriers", type=int, default=64)
    parser.add_argument("--keep-visual", type=int, default=0)
    parser.add_argument("--retention", type=float, default=0.5, help="QuickPrefill's retention")
    parser.add_argument("--group-frames", type=int, default=16)
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/streaming.json)")
    args = parser.parse_args()

    from qv_jax.testing.videos import make_sample_video
    from qv_jax.video import VideoReader
    from qv_jax.videoqa import VideoQA

    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    with tempfile.TemporaryDirectory(prefix="qv-jax-streaming-") as scratch:
        model = random_model(args.preset, dtype, Path(scratch))
        side = args.side
        video = make_sample_video(
            Path(scratch) / "stream.mp4", seconds=args.seconds, fps=2 * args.fps, size=(side, side)
        )
        options = {"min_pixels": side * side, "max_pixels": side * side, "fps": args.fps, "max_frames": 10**9}
        qa = VideoQA(model, retention=args.retention, group_frames=args.group_frames, **options)
        frame_plan, plan = qa.plan(video)
        with VideoReader(video) as reader:
            decoded = reader.read(frame_plan)
        times = np.arange(len(decoded)) / frame_plan.sample_fps

        stream = qa.stream(carriers=args.carriers, keep_visual=args.keep_visual, fps=frame_plan.sample_fps)
        stream.push(decoded.frames[:2], times[:2])  # compiles
        stream = qa.stream(carriers=args.carriers, keep_visual=args.keep_visual, fps=frame_plan.sample_fps)
        kv_over_time = []
        for i in range(0, len(decoded) - 1, 2):
            stream.push(decoded.frames[i : i + 2], times[i : i + 2])
            kv_over_time.append(stream.kv_bytes)
        latencies = list(stream.step_seconds)

        full = qa.stream(carriers=None, keep_visual="all", fps=frame_plan.sample_fps)
        full.push(decoded.frames, times)
        scores = fidelity(question_logits(qa, stream, QUESTION), question_logits(qa, full, QUESTION))

        qa.encode(video)  # compiles
        began = time.perf_counter()
        memory = qa.encode(video)
        quick_s = time.perf_counter() - began
        per_token = memory.kv_bytes // int(memory.tokens_per_layer.sum())
        quick_kv = [
            int((plan.prefix_len + plan.keep[: g + 1].sum(axis=0)).sum()) * per_token for g in range(len(plan.keep))
        ]

    stream_s = len(latencies) * 2 / frame_plan.sample_fps
    rows = [
        {
            "method": f"stream ({args.carriers} carriers, keep {args.keep_visual})",
            "patch ms start": 1e3 * phase(latencies, "start"),
            "patch ms middle": 1e3 * phase(latencies, "middle"),
            "patch ms end": 1e3 * phase(latencies, "end"),
            "KV MiB middle": kv_over_time[len(kv_over_time) // 2] / 2**20,
            "KV MiB end": kv_over_time[-1] / 2**20,
            "real-time factor": stream_s / sum(latencies),
        },
        {
            "method": f"QuickPrefill (retention {args.retention}, whole file)",
            "KV MiB middle": quick_kv[len(quick_kv) // 2] / 2**20,
            "KV MiB end": memory.kv_bytes / 2**20,
            "real-time factor": stream_s / quick_s,
        },
    ]
    columns = ["method", "patch ms start", "patch ms middle", "patch ms end", "KV MiB middle", "KV MiB end"]
    print(format_table(rows, [*columns, "real-time factor"]))
    print(f"fidelity vs full attention on the same stream: KL {scores['kl']:.4g}, top-1 {scores['top1_agree']:.2%}")
    payload = {
        "preset": args.preset,
        "stream_seconds": stream_s,
        "patches": len(latencies),
        "frame_side": side,
        "rows": rows,
        "fidelity": scores,
        "stream_kv_bytes": kv_over_time,
        "quickprefill_kv_bytes": quick_kv,
        "patch_seconds": latencies,
    }
    path = write_json("streaming", payload, args.out)
    plot(path.with_suffix(".png"), kv_over_time, quick_kv, latencies, 2 / frame_plan.sample_fps, args.group_frames)
    print(f"wrote {path}")


def plot(path: Path, stream_kv, quick_kv, latencies, patch_s: float, group_frames: int) -> None:
    """KV MiB over stream time (both methods) and per-patch latency, written whole (temporary file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kv_ax, lat_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    t = np.arange(1, len(stream_kv) + 1) * patch_s
    kv_ax.plot(t, np.array(stream_kv) / 2**20, label="stream (carriers)")
    group_s = patch_s * group_frames / 2
    kv_ax.plot(np.arange(1, len(quick_kv) + 1) * group_s, np.array(quick_kv) / 2**20, label="QuickPrefill")
    kv_ax.set(xlabel="stream time (s)", ylabel="KV MiB", title="memory")
    kv_ax.legend()
    lat_ax.plot(t, 1e3 * np.array(latencies))
    lat_ax.set(xlabel="stream time (s)", ylabel="ms per patch", title="latency per temporal patch")
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, format="png")
    plt.close(fig)
    os.replace(partial, path)


if __name__ == "__main__":
    main()
