"""What ``ask``, ``encode`` and ``demo`` share: the model placement, sparse decoding, QuickPrefill and sampling
options, and the settings they make. See docs/guide.md (Command line)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from qv_jax.attention.backends import AttentionConfig, Backend, Kernel
from qv_jax.errors import InputError
from qv_jax.pipeline.plan import PRUNE_RULES

DTYPES = ("bfloat16", "float32", "float16")  # what --dtype takes


def add_videoqa_options(parser: argparse.ArgumentParser, *, sampling: bool = True) -> None:
    """Frame sampling, QuickPrefill and decoder options (the keywords of ``VideoQA``); ``--seed``, which also
    seeds answer sampling when ``sampling``."""
    group = parser.add_argument_group(
        "video and QuickPrefill", "How a video is sampled and encoded; fixed in a saved memory, so refused with one."
    )
    group.add_argument("--fps", type=float, help="frames per second to sample (default 2)")
    group.add_argument("--max-frames", type=int, help="most frames to sample (default 768)")
    group.add_argument("--max-pixels", type=int, help="per-frame pixel cap (default: Qwen's video budget)")
    group.add_argument("--min-pixels", type=int, help="per-frame pixel floor (default: Qwen's, 128*28*28)")
    group.add_argument("--group-frames", type=int, help="frames per prefill group (default 16)")
    group.add_argument("--retention", type=float, help="fraction of each group's tokens kept per layer (default 0.5)")
    group.add_argument("--prune", choices=PRUNE_RULES, help="score rule (default key_norms_small)")
    group.add_argument("--layer-decay", type=float, help="per-layer decay of the retention (default: none)")
    group.add_argument(
        "--workers", type=int, help="decoder processes (default, and most: one per CPU this process may use)"
    )
    what = "of the random prune rule and of answer sampling" if sampling else "of the random prune rule"
    parser.add_argument("--seed", type=int, default=0, help=f"seed {what} (default 0)")


# The VideoQAConfig fields the options above set (``--seed`` is also sampling's, so it is always taken).
VIDEO_OPTIONS = (
    *("fps", "max_frames", "max_pixels", "min_pixels", "group_frames", "retention", "prune", "layer_decay", "workers"),
)


def refuse_video_options(args: argparse.Namespace, memory: Path) -> None:
    """InputError when options that only act on a video file are given with the saved memory ``memory``."""
    given = ["--" + name.replace("_", "-") for name in VIDEO_OPTIONS if getattr(args, name) is not None]
    if given:
        raise InputError(
            f"{', '.join(given)} {'act' if len(given) > 1 else 'acts'} when a video is encoded; {memory} is a saved "
            "memory, encoded with its own settings (encode the video again to change them)"
        )


def parse_mesh(text: str) -> tuple[int, int]:
    """``DATAxMODEL`` (e.g. ``1x8``) as ``(data, model)``; an argparse ``type``."""
    data, sep, model = text.lower().partition("x")
    if not (sep and data.isdigit() and model.isdigit() and int(data) > 0 and int(model) > 0):
        raise argparse.ArgumentTypeError(f"expected DATAxMODEL with positive sizes, e.g. 1x8, got {text!r}")
    return int(data), int(model)


def add_placement_options(parser: argparse.ArgumentParser, *, dtype: str, mesh: str) -> None:
    """``--dtype`` and ``--mesh``, with what each does in the command (their defaults are the same everywhere)."""
    parser.add_argument("--dtype", choices=DTYPES, help=f"{dtype} (default: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--mesh", type=parse_mesh, metavar="DATAxMODEL", help=f"{mesh} (default: one device)")


def add_model_options(parser: argparse.ArgumentParser, *, answers: bool = True) -> None:
    """``--dtype``, where the model runs (``--mesh``, ``--attention``) and the sparse decoding options.

    Without ``answers`` (``encode``) only the options that fix the memory's head order are offered: the page
    selection of answer-time decoding never acts there.
    """
    add_placement_options(
        parser,
        dtype="parameter dtype",
        mesh="split the model over a (data, model) mesh of the first DATA*MODEL devices, e.g. 1x8: tensor parallel "
        "over 8 devices",
    )
    parser.add_argument(
        "--attention",
        choices=[b.value for b in Backend],
        default=Backend.AUTO.value,
        help="what runs every attention of the model: auto (chunked on CPU, the Pallas kernels on TPU / GPU, "
        "cuDNN for GPU's dense calls), chunked, pallas, interpret, cudnn, jax (jax's shipped kernels where they "
        "serve a call, ours for the rest), jax-interpret or reference (the jnp oracle, "
        "O(tokens x slots) memory) (default auto)",
    )
    parser.add_argument(
        "--attention-kernel",
        choices=[k.value for k in Kernel],
        help="Pallas kernel family for pallas / interpret / jax / jax-interpret (default: the device's; tpu when "
        "interpreting)",
    )
    if answers:
        group = parser.add_argument_group(
            "sparse decoding (DuoAttention streaming heads, LServe page selection)",
            "On when --duo-attention or --token-budget is given. A memory made with --duo-attention is answered "
            "only with the same heads streaming.",
        )
    else:
        group = parser.add_argument_group(
            "DuoAttention head order",
            "A memory to be answered with sparse decoding over DuoAttention streaming heads must be encoded with "
            "the same pattern and fraction (they fix the order its heads are stored in); the other sparse "
            "decoding options act when answering, so `ask` takes them.",
        )
    group.add_argument(
        "--duo-attention",
        type=Path,
        metavar="TSV",
        help="DuoAttention pattern of this model (full_attention_heads.tsv, or its directory): its lowest-gated "
        "heads become streaming heads (default: none, every head reads the whole memory)",
    )
    group.add_argument(
        "--streaming-fraction",
        type=float,
        help="fraction of the KV heads that stream, with --duo-attention (default 0.5)",
    )
    if not answers:
        return
    group.add_argument(
        "--token-budget",
        type=int,
        help="tokens a retrieval head reads per decode step, chosen page by page (default 4096; 0 reads every page)",
    )
    group.add_argument("--sink", type=int, help="first tokens a streaming head keeps (default 64)")
    group.add_argument("--local", type=int, help="most recent tokens a streaming head keeps (default 256)")
    group.add_argument("--page-size", type=int, help="tokens per KV page of a retrieval head (default 64)")
    group.add_argument("--logical-page-size", type=int, help="sub-page whose key min / max scores a page (default 16)")


SPARSE_LAYOUT = ("sink", "local", "page_size", "logical_page_size")


def sparsity_config(args: argparse.Namespace):
    """The :class:`~qv_jax.attention.SparsityConfig` the options ask for, or ``None`` for dense decoding (or the
    model's saved one). A model saved with a sparsity config (a LongGen hybrid, DuoAttention heads) keeps it: the
    options change its settings, and add DuoAttention heads in the full layers of one that has none."""
    from qv_jax.attention import SparsityConfig
    from qv_jax.attention.heads import load_duo_attention_heads
    from qv_jax.model.checkpoint import read_sparsity

    # encode has no answer-time options: they read as not given
    layout = {name: getattr(args, name) for name in SPARSE_LAYOUT if getattr(args, name, None) is not None}
    budget = getattr(args, "token_budget", None)
    if args.duo_attention is None and args.streaming_fraction is not None:
        raise InputError("--streaming-fraction chooses heads of a --duo-attention pattern: give the pattern too")
    if args.duo_attention is None and budget is None:
        if layout:
            flags = ", ".join("--" + name.replace("_", "-") for name in layout)
            raise InputError(f"{flags} configure sparse decoding: give --duo-attention or --token-budget as well")
        return None
    if budget is not None:
        if budget < 0:
            raise InputError(f"--token-budget must be >= 0, got {budget}")
        layout["token_budget"] = budget or None
    model_dir = getattr(args, "model", None)
    saved = None if model_dir is None else read_sparsity(model_dir)
    base = None if saved is None else dataclasses.replace(saved, **layout)
    if args.duo_attention is None:
        return SparsityConfig(**layout) if base is None else base
    fraction = 0.5 if args.streaming_fraction is None else args.streaming_fraction
    if base is None:
        return SparsityConfig.from_duo_attention(args.duo_attention, sparsity=fraction, **layout)
    return base.with_duo_heads(load_duo_attention_heads(args.duo_attention, sparsity=fraction))


def model_options(args: argparse.Namespace) -> dict:
    """``mesh``, ``sparsity`` and ``attention`` keywords of ``VideoQA.from_pretrained`` /
    ``VisionLanguageModel.random``."""
    attention = AttentionConfig(args.attention, args.attention_kernel)
    return {"mesh": mesh_option(args.mesh), "sparsity": sparsity_config(args), "attention": attention}


def mesh_option(sizes: tuple[int, int] | None):
    """The mesh ``--mesh DATAxMODEL`` asks for (``None``: one device)."""
    if sizes is None:
        return None
    import jax

    from qv_jax.sharding import make_mesh

    data, model = sizes
    devices = jax.devices()
    if data * model > len(devices):
        raise InputError(f"--mesh {data}x{model} needs {data * model} devices, {len(devices)} visible")
    return make_mesh(data=data, model=model, devices=devices[: data * model])


def add_generation_options(parser: argparse.ArgumentParser, *, max_new_tokens: int = 128) -> None:
    """How the answer is generated: its length and greedy decoding or sampling."""
    group = parser.add_argument_group("answer")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"longest answer in tokens (default {max_new_tokens})",
    )
    group.add_argument(
        "--sample", action="store_true", help="sample the answer with --temperature, --top-k, --top-p (default: greedy)"
    )
    group.add_argument(
        "--temperature", type=float, default=1.0, help="divides the logits before sampling, with --sample (default 1)"
    )
    group.add_argument(
        "--top-k", type=int, default=0, help="sample among the K likeliest tokens, with --sample (default 0: all)"
    )
    group.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the likeliest tokens holding this much probability, with --sample (default 1: all)",
    )


def videoqa_config(args: argparse.Namespace):
    """The :class:`~qv_jax.videoqa.VideoQAConfig` the options ask for."""
    from qv_jax.cli.decode import capped_workers
    from qv_jax.videoqa import VideoQAConfig

    given = {name: getattr(args, name) for name in VIDEO_OPTIONS if getattr(args, name) is not None}
    if "workers" in given:
        given["workers"] = capped_workers(given["workers"])  # cut here, so the warning is one line
    return VideoQAConfig(**given, seed=args.seed)


def generation_options(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }
