"""What the commands print: a human summary on stdout, or with ``--json`` one JSON object per result (one line
each), progress and warnings staying on stderr so stdout parses. See docs/guide.md (Scripting with --json)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def add_output_options(parser: argparse.ArgumentParser, *, json_output: bool = True, bars: bool = True) -> None:
    """``--json`` (with ``json_output``) and ``--quiet`` (no progress bars; with ``bars``, for commands that draw
    them)."""
    group = parser.add_argument_group("output")
    if json_output:
        group.add_argument(
            "--json",
            action="store_true",
            help="print one JSON object per result on stdout instead of the text; progress and warnings stay on "
            "stderr (default: text)",
        )
    if bars:
        group.add_argument(
            "--quiet", action="store_true", help="no progress bars (default: bars when stderr is a terminal)"
        )


def plural(count: int, word: str) -> str:
    """``"1 group"``, ``"3 groups"``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def say(args: argparse.Namespace, *lines: str) -> None:
    """Print the human lines on stdout, or on stderr under ``--json`` (where stdout holds the JSON alone)."""
    out = sys.stderr if getattr(args, "json", False) else sys.stdout
    for line in lines:
        print(line, file=out)


def print_json(record: dict) -> None:
    print(json.dumps(record), flush=True)


def video_record(video, frames, plan) -> dict:
    """The frames and groups a run works on: ``frames`` a :class:`~qv_jax.video.plan.FramePlan` (a video file) or
    the :class:`~qv_jax.memory.MemoryInfo` of a saved memory, ``plan`` its group plan."""
    indices = getattr(frames, "frame_indices", None)
    indices = frames.indices if indices is None else indices
    record = {
        "video": str(video),
        "frames": len(indices),
        "width": frames.width,
        "height": frames.height,
        "sample_fps": float(frames.sample_fps),
        "frame_indices": [int(i) for i in indices],
        "groups": plan.num_groups,
        "group_frames": plan.group_frames,
        "video_tokens": plan.video_tokens,
    }
    if hasattr(frames, "frame_indices"):
        record["encoded_from"] = frames.video
    return record


def model_record(args: argparse.Namespace, model) -> dict:
    """The model and how it runs: directory, dtype, mesh, attention and sparse decoding as resolved."""
    sparsity = model.sparsity
    sparse = None
    if sparsity is not None:
        names = ("sink", "local", "page_size", "logical_page_size", "token_budget")
        sparse = {name: getattr(sparsity, name) for name in names}
        sparse["duo_attention"] = None if args.duo_attention is None else str(args.duo_attention)
        sparse["streaming_heads"] = sparsity.streaming_heads
        sparse["layers"] = sparsity.layers  # a LongGen hybrid's layer kinds (None: all full)
    return {
        "model": None if args.model is None else str(args.model),
        "dtype": str(model.dtype),
        "mesh": None if args.mesh is None else list(args.mesh),
        "attention": str(model.attention.backend),
        "attention_kernel": None if model.attention.kernel is None else str(model.attention.kernel),
        "sparsity": sparse,
    }


def videoqa_record(config, memory_info=None) -> dict:
    """The sampling and QuickPrefill settings: of ``config``, or those a saved memory was encoded with."""
    if memory_info is None:
        return {k: v for k, v in dataclasses.asdict(config).items() if k != "system_prompt"}
    names = ("group_frames", "retention", "prune", "layer_decay", "seed", "sample_fps")
    return {name: getattr(memory_info, name) for name in names}


def describe_source(qa, video) -> tuple:
    """``(plans, video record, settings)`` of what ``qa`` answers from: a video file's ``(FramePlan, GroupPlan)``
    (``None`` for a saved memory, which is loaded, not decoded), its :func:`video_record`, and the sampling and
    QuickPrefill settings that act on it (a memory's own)."""
    from qv_jax.memory import is_memory_dir, read_memory_info

    if is_memory_dir(video):
        info = read_memory_info(video)
        return None, video_record(video, info, info.group_plan(qa.model.config)), videoqa_record(None, info)
    frame_plan, plan = qa.plan(video)
    return (frame_plan, plan), video_record(video, frame_plan, plan), videoqa_record(qa.config)


def answer_record(answer, question: str) -> dict:
    """One answer: the question, the text, its token ids, the seconds of every stage and the KV bytes at the end."""
    return {
        "question": question,
        "answer": answer.text,
        "token_ids": [int(t) for t in answer.token_ids],
        "timings": answer.timings.as_dict(),
        "kv_bytes": int(answer.kv_bytes),
    }


def print_answer(answer) -> None:
    print(answer.text)
    print()
    print(answer.timings.table())
    print(f"KV cache at the end: {answer.kv_bytes / 2**20:.2f} MiB")
