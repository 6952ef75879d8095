"""``qv-jax ask``: answer a question about a video (or a saved video memory), with progress bars per stage and a
timing table."""

from __future__ import annotations

import argparse
from pathlib import Path

from qv_jax.cli.options import (
    DTYPES,
    add_generation_options,
    add_model_options,
    add_videoqa_options,
    generation_options,
    model_options,
    print_answer,
    refuse_video_options,
    run_with_bars,
    videoqa_config,
)
from qv_jax.errors import InputError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ask",
        help="answer a question about a video or a saved video memory",
        description="Answer QUESTION about VIDEO (a video file, or a memory directory written by `qv-jax encode`): "
        "parallel decoding, group-wise prefill with KV pruning and overlap (QuickVideo), then generation. "
        "Prints the answer and a table of time per stage.",
    )
    parser.add_argument("video", type=Path, help="video file, or a memory directory from `qv-jax encode`")
    parser.add_argument("question", nargs="?", help="the question (or give -q / --questions)")
    parser.add_argument(
        "-q",
        "--question",
        dest="more_questions",
        action="append",
        default=[],
        metavar="Q",
        help="a question; repeat it for several, all answered in one packed pass over the video's memory",
    )
    parser.add_argument("--questions", type=Path, metavar="FILE", help="a text file of questions, one per line")
    parser.add_argument("--model", type=Path, required=True, help="model directory (HF or qv-jax checkpoint)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="parameter dtype (default: bfloat16 on GPU/TPU, float32 on CPU)"
    )
    add_model_options(parser)
    add_videoqa_options(parser)
    add_generation_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qv_jax.memory import is_memory_dir
    from qv_jax.videoqa import VideoQA

    if not args.video.exists():
        raise InputError(f"{args.video}: no such video file or memory directory")
    if is_memory_dir(args.video):
        refuse_video_options(args, args.video)
    questions = ([args.question] if args.question else []) + args.more_questions
    if args.questions is not None:
        try:
            questions += [line.strip() for line in args.questions.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{args.questions}: cannot read the questions ({e})") from e
    if not questions:
        raise InputError("no question: give QUESTION, -q QUESTION (repeatable) or --questions FILE")
    qa = VideoQA.from_pretrained(args.model, dtype=args.dtype, config=videoqa_config(args), **model_options(args))
    options = generation_options(args)
    if len(questions) == 1:
        print_answer(
            run_with_bars(qa, args.video, lambda bars: qa.ask(args.video, questions[0], progress=bars, **options))
        )
        return 0
    answers = run_with_bars(qa, args.video, lambda bars: qa.ask_many(args.video, questions, progress=bars, **options))
    for question, answer in zip(questions, answers, strict=True):
        print(f"Q: {question}\nA: {answer.text}\n")
    print(answers[0].timings.table())
    print(f"KV cache at the end (the memory once, every question and answer): {answers[0].kv_bytes / 2**20:.2f} MiB")
    return 0
