"""``qv-jax convert HF_DIR OUT_DIR``: a Hugging Face Qwen2.5-VL / Qwen2-VL directory -> a qv-jax checkpoint."""

from __future__ import annotations

import argparse
import sys
import time

from qv_jax.cli.options import DTYPES
from qv_jax.cli.report import add_output_options, plural, print_json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert Hugging Face safetensors weights to a qv-jax (orbax) checkpoint",
        description=(
            "Convert a Hugging Face Qwen2.5-VL / Qwen2-VL model directory (config.json + *.safetensors, either key "
            "naming) into a qv-jax checkpoint: orbax parameters, config json and the tokenizer files."
        ),
    )
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output checkpoint directory")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="parameter dtype (default: bfloat16)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it holds a qv-jax checkpoint (or another qv-jax output)",
    )
    add_output_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qv_jax.converters.qwen2_5_vl import convert
    from qv_jax.model.checkpoint import read_config

    start = time.perf_counter()
    names: list[str] = []

    def progress(name: str) -> None:
        names.append(name)
        bar.update()

    with tqdm(desc="converting", unit="tensor", file=sys.stderr, disable=True if args.quiet else None) as bar:
        out = convert(args.hf_dir, args.out_dir, args.dtype, overwrite=args.overwrite, progress=progress)
    config, _ = read_config(out)
    seconds = time.perf_counter() - start
    if args.json:
        record = {
            "command": "convert",
            "input": str(args.hf_dir),
            "out": str(out),
            "variant": config.variant,
            "tensors": len(names),
            "text_layers": config.text.num_layers,
            "vision_blocks": config.vision.depth,
            "timings": {"wall_s": seconds},
            "settings": {"dtype": args.dtype, "overwrite": args.overwrite},
        }
        print_json(record)
        return 0
    print(
        f"{config.variant}: {plural(len(names), 'tensor')} -> {out} ({args.dtype}, "
        f"{plural(config.text.num_layers, 'text layer')}, {plural(config.vision.depth, 'vision block')}) in "
        f"{seconds:.1f} s"
    )
    return 0
