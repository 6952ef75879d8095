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
        "Prints the answer and a table of time per stage, or with --json one JSON object per answer. Several "
        "questions (-q, --questions) are answered in one packed pass over the video's memory.",
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
        help="a question; repeat it for several, all answered in one packed pass over the video's memory "
        "(default: none)",
    )
    parser.add_argument(
        "--questions", type=Path, metavar="FILE", help="a text file of questions, one per line (default: none)"
    )
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
    questions = ([args.question] if args.question else []) + args.more_questions
    if args.questions is not None:
        try:
            questions += [line.strip() for line in args.questions.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{args.questions}: cannot read the questions ({e})") from e
    if not questions:
        raise InputError("no question: give QUESTION, -q QUESTION (repeatable) or --questions FILE")
    qa = VideoQA.from_pretrained(args.model, dtype=args.dtype, config=videoqa_config(args), **model_options(args))
    plans, video, video_settings = describe_source(qa, args.video)
    options = generation_options(args)
    # ask_many answers all questions in one pass, or one after the other where decoding is sparse
    per_answer = 1 if qa.model.sparsity is not None else len(questions)
    with stage_bars(plans, answers=len(questions), per_answer=per_answer, enabled=not args.quiet) as bars:
        if len(questions) == 1:
            answers = [qa.ask(args.video, questions[0], progress=bars, **options)]
        else:
            answers = qa.ask_many(args.video, questions, progress=bars, **options)
    if args.json:
        settings = {**model_record(args, qa.model), "video": video_settings, "answer": options}
        for question, answer in zip(questions, answers, strict=True):
            print_json({"command": "ask", **answer_record(answer, question), "video": video, "settings": settings})
    elif len(answers) == 1:
        print_answer(answers[0])
    else:
        for question, answer in zip(questions, answers, strict=True):
            print(f"Q: {question}\nA: {answer.text}\n")
        print(answers[0].timings.table())
        print(
            f"KV cache at the end (the memory once, every question and answer): {answers[0].kv_bytes / 2**20:.2f} MiB"
        )
    return 0
