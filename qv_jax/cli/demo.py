"""``qv-jax demo``: the main job end to end — a question about a video, answered with parallel decoding, group-wise
pruned prefill and overlap — with progress lines and stage timings.

With no ``--model`` it needs nothing but the runtime dependencies: it builds a tiny random-weight model and a
small tokenizer, makes a sample video (kept in the cache directory for the next run), and says plainly that the
answer is noise. With ``--model`` it runs the real model. ``--save-model DIR`` writes the random model as a
directory the other commands load.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

# sample_video is the demo's clip: 20 s of 640x360 H.264 (40 frames at 2 fps)
from qv_jax.cli.decode import capped_workers, sample_video
from qv_jax.cli.options import (
    add_generation_options,
    add_model_options,
    add_videoqa_options,
    generation_options,
    model_options,
    videoqa_config,
)
from qv_jax.cli.progress import stage_bars
from qv_jax.cli.report import (
    add_output_options,
    answer_record,
    describe_source,
    model_record,
    plural,
    print_answer,
    print_json,
    say,
)
from qv_jax.errors import InputError

QUESTION = "What happens in the video?"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="answer a question about a video end to end (random tiny model unless --model)",
        description="Answer a question about a video with QuickVideo-style overlap of parallel decoding and "
        "group-wise pruned prefill, printing progress per stage and a timing table. Without --model a tiny "
        "random-weight model is built (its answer is noise); without VIDEO a sample video is made once and kept "
        "in the cache directory ($XDG_CACHE_HOME/qv-jax or ~/.cache/qv-jax).",
    )
    parser.add_argument(
        "video", nargs="?", type=Path, help="video file (default: the 20 s 640x360 sample in the cache directory)"
    )
    parser.add_argument("--question", default=QUESTION, help=f"the question (default: {QUESTION!r})")
    parser.add_argument("--model", type=Path, help="model directory (default: a tiny random-weight model)")
    parser.add_argument(
        "--save-model",
        type=Path,
        metavar="DIR",
        help="write the tiny random-weight model and its tokenizer to DIR as a qv-jax checkpoint that `ask`, "
        "`encode` and `info` take as --model, and stop (default: answer with it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --save-model DIR if qv-jax wrote it")
    add_model_options(parser)
    add_videoqa_options(parser)
    add_generation_options(parser, max_new_tokens=16)  # the demo answers briefly
    add_output_options(parser)
    parser.set_defaults(func=run)


def _random_model(scratch: Path, dtype: str | None, placement: dict):
    """A tiny random-weight Qwen2.5-VL with a trained test tokenizer (no downloads, no torch); ``placement``: its
    ``mesh``, ``sparsity`` and ``attention``."""
    from qv_jax.testing import random_model

    return random_model(tokenizer_dir=scratch / "tokenizer", dtype=dtype or "float32", **placement)


def _save_model(args: argparse.Namespace, placement: dict) -> int:
    from qv_jax.marker import check_output

    if args.model is not None:
        raise InputError("--save-model writes the random demo model; it takes no --model")
    check_output(args.save_model, overwrite=args.overwrite)  # before the model is built
    with tempfile.TemporaryDirectory(prefix="qv-jax-demo-") as scratch:
        model = _random_model(Path(scratch), args.dtype, placement)
        out = model.save(args.save_model, tokenizer_dir=Path(scratch) / "tokenizer", overwrite=args.overwrite)
    text = model.config.text
    print(
        f"wrote a tiny RANDOM-WEIGHT Qwen2.5-VL ({text.num_layers} layers, {text.hidden_size} wide, toy tokenizer) "
        f"to {out}: its answers are noise; try `qv-jax ask VIDEO QUESTION --model {out}`"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from qv_jax.video.pool import default_pool
    from qv_jax.videoqa import VideoQA

    if args.video is not None and not args.video.is_file():
        raise InputError(f"{args.video}: no such video file")
    config, placement = videoqa_config(args), model_options(args)
    if args.save_model is not None:
        return _save_model(args, placement)
    if args.overwrite:
        raise InputError("--overwrite replaces a --save-model directory: give --save-model too")
    default_pool().prestart(capped_workers(config.workers))  # decoders boot while the model is built
    video = sample_video(lambda line: say(args, line)) if args.video is None else args.video
    if args.model is None:
        with tempfile.TemporaryDirectory(prefix="qv-jax-demo-") as scratch:
            qa = VideoQA(_random_model(Path(scratch), args.dtype, placement), config)
        text = qa.model.config.text
        say(
            args,
            f"model: a tiny RANDOM-WEIGHT Qwen2.5-VL ({text.num_layers} layers, {text.hidden_size} wide) with a "
            "toy tokenizer — the answer below is noise; the stages and timings are real. Pass --model DIR for a "
            "real model.",
        )
    else:
        qa = VideoQA.from_pretrained(args.model, dtype=args.dtype, config=config, **placement)
        say(args, f"model: {args.model}")
    plans, record, video_settings = describe_source(qa, video)
    frame_plan, plan = plans
    say(
        args,
        f"{video}: {plural(frame_plan.num_frames, 'frame')} at {frame_plan.width}x{frame_plan.height}, "
        f"{plural(plan.num_groups, 'group')} of {plan.group_frames} frames ({plan.tokens_per_group} tokens each), "
        f"retention {config.retention} by {config.prune}",
        f"question: {args.question}",
    )
    with stage_bars(plans, answers=1, enabled=not args.quiet) as bars:
        answer = qa.ask(video, args.question, progress=bars, **generation_options(args))
    if args.json:
        settings = {**model_record(args, qa.model), "video": video_settings, "answer": generation_options(args)}
        print_json({"command": "demo", **answer_record(answer, args.question), "video": record, "settings": settings})
        return 0
    print("answer:" + (" (noise: random weights)" if args.model is None else ""))
    print_answer(answer)
    return 0
