"""``qv-jax demo``: the main job end to end — a question about a video, answered with parallel decoding, group-wise
pruned prefill and overlap — with progress bars and stage timings.

With no ``--model`` it needs nothing but the runtime dependencies: it builds a tiny random-weight model and a
small tokenizer, generates a sample video, and says plainly that the answer is noise. With ``--model`` it runs the
real model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

# generate_sample makes the demo's clip: 20 s of 640x360 H.264 (40 frames at 2 fps)
from qv_jax.cli.decode import capped_workers, generate_sample
from qv_jax.cli.options import (
    DTYPES,
    add_generation_options,
    add_model_options,
    add_videoqa_options,
    generation_options,
    model_options,
    print_answer,
    run_with_bars,
    videoqa_config,
)
from qv_jax.errors import InputError

QUESTION = "What happens in the video?"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="answer a question about a video end to end (random tiny model unless --model)",
        description="Answer a question about a video with QuickVideo-style overlap of parallel decoding and "
        "group-wise pruned prefill, printing progress per stage and a timing table. Without --model a tiny "
        "random-weight model is built (its answer is noise); without VIDEO a sample video is generated.",
    )
    parser.add_argument("video", nargs="?", type=Path, help="video file (default: a generated 20 s 640x360 clip)")
    parser.add_argument("--question", default=QUESTION, help=f"the question (default: {QUESTION!r})")
    parser.add_argument("--model", type=Path, help="model directory (default: a tiny random-weight model)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="parameter dtype (default: bfloat16 on GPU/TPU, float32 on CPU)"
    )
    add_model_options(parser)
    add_videoqa_options(parser)
    add_generation_options(parser)
    parser.set_defaults(func=run, max_new_tokens=16)


def _random_videoqa(scratch: Path, dtype: str | None, placement: dict, config):
    """A VideoQA over a tiny random-weight Qwen2.5-VL with a trained test tokenizer (no downloads, no torch);
    ``placement``: its ``mesh`` and ``sparsity``."""
    from qv_jax.testing import random_model
    from qv_jax.videoqa import VideoQA

    model = random_model(tokenizer_dir=scratch / "tokenizer", dtype=dtype or "float32", **placement)
    return VideoQA(model, config)


def run(args: argparse.Namespace) -> int:
    from qv_jax.video.pool import default_pool

    if args.video is not None and not args.video.is_file():
        raise InputError(f"{args.video}: no such video file")
    config, placement = videoqa_config(args), model_options(args)
    default_pool().prestart(capped_workers(config.workers))  # decoders boot while the model is built
    with tempfile.TemporaryDirectory(prefix="qv-jax-demo-") as scratch:
        video = generate_sample(Path(scratch)) if args.video is None else args.video
        if args.model is None:
            qa = _random_videoqa(Path(scratch), args.dtype, placement, config)
            text = qa.model.config.text
            print(
                f"model: a tiny RANDOM-WEIGHT Qwen2.5-VL ({text.num_layers} layers, {text.hidden_size} wide) with a "
                "toy tokenizer — the answer below is noise; the stages and timings are real. Pass --model DIR for a "
                "real model."
            )
        else:
            from qv_jax.videoqa import VideoQA

            qa = VideoQA.from_pretrained(args.model, dtype=args.dtype, config=config, **placement)
            print(f"model: {args.model}")
        frame_plan, plan = qa.plan(video)
        print(
            f"{video}: {frame_plan.num_frames} frames at {frame_plan.width}x{frame_plan.height}, {plan.num_groups} "
            f"groups of {plan.group_frames} frames ({plan.tokens_per_group} tokens each), retention {config.retention} "
            f"by {config.prune}"
        )
        print(f"question: {args.question}")
        answer = run_with_bars(
            qa, video, lambda bars: qa.ask(video, args.question, progress=bars, **generation_options(args))
        )
        print("answer:" + (" (noise: random weights)" if args.model is None else ""))
        print_answer(answer)
    return 0
