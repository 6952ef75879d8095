"""``qv-jax identify-heads --model DIR --out DIR``: find a model's retrieval heads (DuoAttention) and write its
``full_attention_heads.tsv`` and a heat map of the gates. See docs/duo.md."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from qv_jax.cli.options import add_placement_options
from qv_jax.cli.report import add_output_options, print_json, say

CHECKPOINTS = "checkpoints"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "identify-heads",
        help="find which KV heads may stream (DuoAttention) and write full_attention_heads.tsv",
        description=(
            "Train DuoAttention's gates (one per layer and KV head, the model frozen) on synthetic retrieval samples "
            "(text passkeys, needle frames in a generated video) made with the model's tokenizer, or score the heads "
            "without training (--method on-the-fly). "
            "Writes OUT/full_attention_heads.tsv, which --duo-attention reads, and a heat map beside it."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="model directory, Hugging Face or qv-jax")
    parser.add_argument("--out", type=Path, required=True, help="output directory (tsv, png, checkpoints)")
    parser.add_argument(
        "--method", choices=("optimize", "on-the-fly"), default="optimize", help="default: optimize (train gates)"
    )
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    parser.add_argument("--lr", type=float, default=0.02, help="AdamW learning rate (default: 0.02)")
    parser.add_argument("--reg", type=float, default=0.05, help="weight of mean |gate| in the loss (default: 0.05)")
    parser.add_argument("--sink", type=int, default=128, help="sink tokens of a streaming head (default: 128)")
    parser.add_argument("--recent", type=int, default=256, help="recent tokens of a streaming head (default: 256)")
    parser.add_argument("--min-length", type=int, default=1024, help="shortest sample in tokens (default: 1024)")
    parser.add_argument("--max-length", type=int, default=32768, help="longest sample in tokens (default: 32768)")
    parser.add_argument(
        "--data",
        choices=("passkey", "video", "both"),
        default="both",
        help="synthetic samples: text passkeys, needle frames in a video, or both alternating (default: both)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples (default: 0)")
    parser.add_argument(
        "--checkpoint-every", type=int, default=50, help="steps between checkpoints in OUT/checkpoints (default: 50)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/full_attention_heads.tsv")
    add_placement_options(
        parser,
        dtype="model dtype",
        mesh="run on a (data, model) mesh of the first DATA*MODEL devices: a sample per data shard each step, heads "
        "split over model",
    )
    add_output_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    from qv_jax.attention.heads import TSV_NAME
    from qv_jax.cli.options import mesh_option
    from qv_jax.duo.train import check_inputs, identify_heads
    from qv_jax.errors import InputError
    from qv_jax.marker import check_output
    from qv_jax.runtime import load_model

    if args.checkpoint_every < 1:
        raise InputError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    tsv = check_output(args.out / TSV_NAME, overwrite=args.overwrite or args.resume, directory=False)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    start = time.perf_counter()
    model = load_model(args.model, dtype, mesh=mesh_option(args.mesh))
    settings = dict(
        method=args.method,
        steps=args.steps,
        sink=args.sink,
        recent=args.recent,
        min_length=args.min_length,
        max_length=args.max_length,
        data=args.data,
    )
    check_inputs(model, **settings)
    total = args.steps if args.method == "optimize" else None
    with tqdm(desc="identifying heads", total=total, file=sys.stderr, disable=True if args.quiet else None) as bar:

        def progress(step: int, loss: float) -> None:
            bar.update(step - bar.n)
            if not math.isnan(loss):
                bar.set_postfix(loss=f"{loss:.4g}")

        gates = identify_heads(
            model,
            lr=args.lr,
            reg=args.reg,
            seed=args.seed,
            checkpoint_dir=args.out / CHECKPOINTS if args.method == "optimize" else None,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            progress=progress,
            **settings,
        )
    gates.save(tsv, overwrite=args.overwrite or args.resume)
    seconds = time.perf_counter() - start
    losses = gates.losses[np.isfinite(gates.losses)]
    if args.json:
        print_json(
            {
                "command": "identify-heads",
                "model": str(args.model),
                "out": str(tsv),
                "heat_map": str(tsv.with_suffix(".png")),
                "gates": gates.gates.tolist(),
                "losses": losses.tolist(),
                "timings": {"wall_s": seconds},
                "settings": settings
                | {"lr": args.lr, "reg": args.reg, "seed": args.seed, "resume": args.resume, "mesh": args.mesh},
            }
        )
        return 0
    layers, heads = gates.gates.shape
    loss = f", loss {losses[0]:.4g} -> {losses[-1]:.4g}" if losses.size else ""
    say(args, f"{args.method}: gates of {layers} layers x {heads} KV heads{loss} -> {tsv} in {seconds:.1f} s")
    return 0
