"""``qv-jax encode``: turn a video into a saved, reusable video memory (the pruned KV cache of QuickPrefill)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qv_jax.cli.options import (
    DTYPES,
    add_model_options,
    add_videoqa_options,
    model_options,
    run_with_bars,
    videoqa_config,
)
from qv_jax.errors import InputError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "encode",
        help="encode a video into a reusable memory directory",
        description="Decode VIDEO in parallel and prefill it group by group with KV pruning; save the pruned "
        "memory to --out, which `qv-jax ask MEMDIR QUESTION --model DIR` answers questions from without "
        "touching the video again. The score rule must not depend on the question.",
    )
    parser.add_argument("video", type=Path, help="video file")
    parser.add_argument("--model", type=Path, required=True, help="model directory (HF or qv-jax checkpoint)")
    parser.add_argument("--out", type=Path, required=True, help="memory directory to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds a memory (or other qv-jax output)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, help="parameter dtype (default: bfloat16 on GPU/TPU, float32 on CPU)"
    )
    add_model_options(parser)
    add_videoqa_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qv_jax.marker import check_output
    from qv_jax.videoqa import VideoQA

    if not args.video.is_file():
        raise InputError(f"{args.video}: no such video file")
    inputs = (args.video, args.model)
    check_output(args.out, overwrite=args.overwrite, inputs=inputs)  # before the minutes encoding takes
    qa = VideoQA.from_pretrained(args.model, dtype=args.dtype, config=videoqa_config(args), **model_options(args))
    memory = run_with_bars(qa, args.video, lambda bars: qa.encode(args.video, progress=bars))
    out = memory.save(args.out, overwrite=args.overwrite, inputs=inputs)
    tokens = memory.tokens_per_layer
    print(
        f"{args.video}: {len(memory.info.frame_indices)} frames at {memory.info.width}x{memory.info.height} in "
        f"{memory.plan.num_groups} groups of {memory.plan.group_frames}; {memory.plan.video_tokens} video tokens, "
        f"{int(tokens.min())}-{int(tokens.max())} kept per layer ({memory.kv_bytes / 2**20:.2f} MiB) -> {out}"
    )
    print()
    print(memory.timings.table())
    return 0
