"""``qv-jax finetune --model DIR --data FILE --out DIR``: finetune a model's text decoder on token data, dense or
as a LongGen hybrid sparse model, and save the result as a model directory. See docs/training.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qv_jax.cli.options import add_placement_options
from qv_jax.cli.report import add_output_options, print_json, say


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="finetune a model's text decoder (dense or LongGen hybrid) and save it",
        description=(
            "Next-token training of the text decoder on packed documents of a token file (.npy / .bin uint32, "
            "documents ending with the separator id), a text file (.txt, tokenised with the model's tokenizer) "
            "or a synthetic long-range task (synthetic:copy, synthetic:passkey). Writes OUT/checkpoints, "
            "OUT/log.jsonl, OUT/loss.png and the finetuned model as OUT/model."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="model directory, Hugging Face or qv-jax")
    parser.add_argument(
        "--data", required=True, help="token file (.npy, .bin), text file (.txt) or synthetic:copy / synthetic:passkey"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (checkpoints, log, model)")
    parser.add_argument("--seq-len", type=int, default=32768, help="tokens per packed row (default: 32768)")
    parser.add_argument("--batch-tokens", type=int, help="tokens per step, a multiple of --seq-len (default: one row)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (default: 1000)")
    parser.add_argument("--lr", type=float, default=2e-5, help="peak AdamW learning rate (default: 2e-5)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine (default: 100)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of matrices (default: 0)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient global-norm clip (default: 1)")
    parser.add_argument("--separator", type=int, help="document separator id (default: the model's eos)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic tasks (default: 0)")
    parser.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between checkpoints in OUT/checkpoints (default: 100)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    group = parser.add_argument_group(
        "LongGen hybrid", "Full attention in some layers, sparse in the others; saved with the model's config."
    )
    group.add_argument(
        "--sparsity",
        choices=("longgen", "none"),
        help="longgen: make the model a LongGen hybrid; none: train it dense (default: as it was saved)",
    )
    group.add_argument(
        "--full-layers",
        default="middle",
        help="with longgen: 'middle' (the middle third) or comma-separated layer indices (default: middle)",
    )
    group.add_argument(
        "--sparse", choices=("streaming", "strided"), default="streaming",
        help="with longgen: sink + window, or local + strided blocks (default: streaming)",
    )  # fmt: skip
    group.add_argument("--sink", type=int, default=64, help="with longgen: sink tokens (default: 64)")
    group.add_argument("--local", type=int, default=256, help="with longgen: window tokens (default: 256)")
    add_placement_options(
        parser,
        dtype="parameter and compute dtype; the master weights and optimizer state are float32",
        mesh="train on a (data, model) mesh of the first DATA*MODEL devices: rows on data, heads on model",
    )
    add_output_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from qv_jax.cli.options import mesh_option
    from qv_jax.runtime import load_model
    from qv_jax.training import finetune, open_data

    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    start = time.perf_counter()
    model = load_model(args.model, dtype, mesh=mesh_option(args.mesh))
    sparsity = longgen_option(args, model)
    data = open_data(args.data, model, separator=args.separator, seed=args.seed)
    with tqdm(desc="finetuning", total=args.steps, file=sys.stderr, disable=True if args.quiet else None) as bar:

        def progress(step: int, loss: float, tokens_per_s: float) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tokens_per_s:.4g}")

        result = finetune(
            model,
            data,
            args.out,
            seq_len=args.seq_len,
            batch_tokens=args.batch_tokens,
            steps=args.steps,
            lr=args.lr,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            clip=args.clip,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            sparsity=sparsity,
            progress=progress,
        )
    seconds = time.perf_counter() - start
    losses = result.losses
    if args.json:
        print_json(
            {
                "command": "finetune",
                "model": str(args.model),
                "data": args.data,
                "out": str(result.out),
                "saved_model": str(result.out / "model"),
                "losses": losses.tolist(),
                "timings": {"wall_s": seconds},
                "settings": {
                    "seq_len": args.seq_len,
                    "batch_tokens": args.batch_tokens or args.seq_len,
                    "steps": args.steps,
                    "lr": args.lr,
                    "warmup": args.warmup,
                    "dtype": dtype,
                    "mesh": None if args.mesh is None else list(args.mesh),
                    "resume": args.resume,
                    "sparsity": None if result.model.sparsity is None else result.model.sparsity.to_dict(),
                },
            }
        )
        return 0
    say(args, f"{args.steps} steps, loss {losses[0]:.4g} -> {losses[-1]:.4g}; model in {result.out / 'model'} "
              f"({seconds:.1f} s)")  # fmt: skip
    return 0


def longgen_option(args: argparse.Namespace, model):
    """The :class:`~qv_jax.attention.SparsityConfig` ``--sparsity longgen`` asks for (``None`` otherwise);
    :class:`InputError` for ``--sparsity none`` on a saved hybrid or a malformed ``--full-layers``."""
    from qv_jax.attention import SparsityConfig
    from qv_jax.errors import InputError

    if args.sparsity == "none":
        if model.sparsity is not None:
            raise InputError(f"{args.model} is a saved hybrid (its config.json has a sparsity config): omit --sparsity")
        return None
    if args.sparsity != "longgen":
        return None
    full = args.full_layers
    if full != "middle":
        try:
            full = [int(i) for i in full.split(",")]
        except ValueError:
            raise InputError(f"--full-layers takes 'middle' or comma-separated layer indices, got {full!r}") from None
    layers = model.config.text.num_layers
    return SparsityConfig.longgen(layers, full, sparse=args.sparse, sink=args.sink, local=args.local)
