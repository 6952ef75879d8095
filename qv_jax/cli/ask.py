"""``qv-jax ask``: answer a question about a video (or a saved video memory), with a progress line per stage and
a timing table, or one JSON object per answer with ``--json``."""

from __future__ import annotations

import argparse
from pathlib import Path

from qv_jax.cli.options import (
    add_generation_options,
    add_model_options,
    add_videoqa_options,
    generation_options,
    model_options,
    refuse_video_options,
    videoqa_config,
)
from qv_jax.cli.progress import stage_bars
from qv_jax.cli.report import add_output_options, answer_record, describe_source, model_record, print_answer, print_json
from qv_jax.errors import InputError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ask",
        help="answer a question about a video or a saved video memory",
        description="Answer QUESTION about VIDEO (a video file, or a memory directory written by `qv-jax encode`): "
        "parallel decoding, group-wise prefill with KV pruning and overlap (QuickVideo), then generation. "
        "Prints the answer and a table of time per stage, or with --json one JSON object.",
    )
    parser.add_argument("video", type=Path, help="video file, or a memory directory from `qv-jax encode`")
    parser.add_argument("question", help="the question")
    parser.add_argument(
        "--model", type=Path, required=True, help="model directory: Hugging Face or qv-jax checkpoint (required)"
    )
    add_model_options(parser)
    add_videoqa_options(parser)
    add_generation_options(parser)
    add_output_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qv_jax.memory import is_memory_dir
    from qv_jax.videoqa import VideoQA

    if not args.video.exists():
        raise InputError(f"{args.video}: no such video file or memory directory")
    if is_memory_dir(args.video):
        refuse_video_options(args, args.video)
    qa = VideoQA.from_pretrained(args.model, dtype=args.dtype, config=videoqa_config(args), **model_options(args))
    plans, video, video_settings = describe_source(qa, args.video)
    with stage_bars(plans, answers=1, enabled=not args.quiet) as bars:
        answer = qa.ask(args.video, args.question, progress=bars, **generation_options(args))
    if not args.json:
        print_answer(answer)
        return 0
    settings = {**model_record(args, qa.model), "video": video_settings, "answer": generation_options(args)}
    print_json({"command": "ask", **answer_record(answer, args.question), "video": video, "settings": settings})
    return 0
