"""``qv-jax encode``: turn a video into a saved, reusable video memory (the pruned KV cache of QuickPrefill)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qv_jax.cli.options import add_model_options, add_videoqa_options, model_options, videoqa_config
from qv_jax.cli.progress import stage_bars
from qv_jax.cli.report import add_output_options, describe_source, model_record, plural, print_json
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
    parser.add_argument(
        "--model", type=Path, required=True, help="model directory: Hugging Face or qv-jax checkpoint (required)"
    )
    parser.add_argument("--out", type=Path, required=True, help="memory directory to write (required)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds a memory (or other qv-jax output)"
    )
    add_model_options(parser, answers=False)
    add_videoqa_options(parser, sampling=False)
    add_output_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qv_jax.marker import check_output
    from qv_jax.videoqa import VideoQA

    if not args.video.is_file():
        raise InputError(f"{args.video}: no such video file")
    inputs = (args.video, args.model)
    check_output(args.out, overwrite=args.overwrite, inputs=inputs)  # before the minutes encoding takes
    qa = VideoQA.from_pretrained(args.model, dtype=args.dtype, config=videoqa_config(args), **model_options(args))
    plans, video, video_settings = describe_source(qa, args.video)
    with stage_bars(plans, answers=0, enabled=not args.quiet) as bars:
        memory = qa.encode(args.video, progress=bars)
    out = memory.save(args.out, overwrite=args.overwrite, inputs=inputs)
    tokens = memory.tokens_per_layer
    if args.json:
        record = {
            "command": "encode",
            "out": str(out),
            "timings": memory.timings.as_dict(),
            "kv_bytes": int(memory.kv_bytes),
            "tokens_per_layer": [int(t) for t in tokens],
            "video": video,
            "settings": {**model_record(args, qa.model), "video": video_settings},
        }
        print_json(record)
        return 0
    plan = memory.plan
    print(
        f"{args.video}: {plural(len(memory.info.frame_indices), 'frame')} at {memory.info.width}x"
        f"{memory.info.height} in {plural(plan.num_groups, 'group')} of {plan.group_frames}; "
        f"{plural(plan.video_tokens, 'video token')}, {int(tokens.min())}-{int(tokens.max())} kept per layer "
        f"({memory.kv_bytes / 2**20:.2f} MiB) -> {out}"
    )
    print()
    print(memory.timings.table())
    return 0
