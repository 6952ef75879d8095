"""Prepacking: packed against padded prefill of a batch of prompts, and ``VideoQA.ask_many`` against one ``ask``
per question, in one run on one model.

Prefill: ``--prompts`` prompts with log-normal lengths (clipped to ``--min-len``..``--max-len``, like a chat log)
go to their first answer token's logits either padded to the longest (what ``generate`` runs on a batch: one
prefill chunk over ``[B, longest]``) or packed by best-fit decreasing (``qv_jax.runtime.packing``: packed bins,
unpacked into decode rows, then the held-back last tokens). Both are timed warm, and their compiled temporary
memory is read from XLA's memory analysis; the first tokens must agree. Questions: for each ``--memories``
setting ``FRAMESxTOKENS`` one video memory of that many frames, then ``--questions`` questions of that many answer
tokens through ``ask_many`` and through ``ask`` one by one (``--skip-prefill`` runs only this part).
``python -m benchmarks.packing``; prints a table and writes ``benchmarks/results/packing.json``. Results:
docs/benchmarks/packing.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import RESULTS_DIR, format_table, time_call, write_json
from benchmarks.e2e import PRESETS, random_model

QUESTIONS = (
    "What happens in the video?",
    "Who speaks first?",
    "What was decided at the end of the meeting?",
    "When does the train arrive at the station?",
    "How many people appear in the first minute?",
    "Where does the scene take place?",
    "Describe the weather.",
    "Which object falls from the shelf?",
    "Why is the audience clapping?",
    "What color is the bird on the fence?",
    "Count the cars that pass the camera.",
    "Is the person in the video happy or sad?",
    "Summarize the lecture in one sentence.",
    "What does the chef cut first?",
    "What is the score at the end?",
    "Options: (A) a dog (B) a cat (C) a horse (D) a bird. Which animal appears?",
)


def prompt_lengths(count: int, low: int, high: int, seed: int) -> np.ndarray:
    """Chat-log-like lengths: log-normal (median 150 tokens), clipped to ``[low, high]``."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(150.0), 1.1, count), low, high).astype(int)


def _temp_bytes(jitted, *args, **static) -> int:
    return int(jitted.lower(*args, **static).compile().memory_analysis().temp_size_in_bytes)


def prefill_rows(model, prompts: list[np.ndarray], repeats: int) -> tuple[list[dict], bool]:
    """Padded and packed prefill to the first answer token: time, temp memory, tokens; and whether the first
    tokens agree."""
    import jax.numpy as jnp

    from qv_jax.numeric import round_up
    from qv_jax.runtime import dense, encode, packing

    g, s = model.graphdef, model.state
    count, longest = len(prompts), max(p.size for p in prompts)
    # padded: generate's layout (left-aligned rows, one chunk, capacity for 1 new token)
    width = round_up(longest, 64)
    ids = np.zeros((count, width), np.int32)
    segments = np.full((count, width), -1, np.int32)
    positions = np.zeros((3, count, width), np.int32)
    for b, p in enumerate(prompts):
        ids[b, width - p.size :], segments[b, width - p.size :] = p, 0
        positions[:, b, width - p.size :] = np.arange(p.size)
    x = encode.embed(g, s, jnp.asarray(ids))
    capacity = round_up(width + 1, 128)
    last = jnp.full((count,), width - 1, jnp.int32)
    padded_args = (jnp.asarray(positions), jnp.asarray(segments), last)

    def padded():
        cache = model.new_cache(count, capacity)
        logits, _ = dense.prefill(g, s, cache, x, *padded_args)
        return jnp.argmax(logits, -1).block_until_ready()

    packed = packing.pack_prompts(prompts, [np.broadcast_to(np.arange(p.size), (3, p.size)) for p in prompts])
    extra = packed.rows - count
    rows = tuple(jnp.asarray(np.pad(a, (0, extra))) for a in (packed.bin_of, packed.start, packed.length))
    px = encode.embed(g, s, jnp.asarray(packed.ids))
    static = {"history": packed.history, "capacity": round_up(packed.history + 1, 128)}
    packed_args = (px, jnp.asarray(packed.positions), jnp.asarray(packed.segment_ids), *rows)
    last_ids = jnp.asarray(np.pad([int(p[-1]) for p in prompts], (0, extra)).astype(np.int32))
    last_pos = jnp.asarray(np.pad([p.size - 1 for p in prompts], (0, extra)).astype(np.int32))

    def packed_run():
        cache = packing.prefill_packed(g, s, *packed_args, **static)
        logits, _ = dense.decode_step(g, s, cache, last_ids, last_pos)
        return jnp.argmax(logits, -1)[:count].block_until_ready()

    same = bool(np.array_equal(np.asarray(padded()), np.asarray(packed_run())))
    cache = model.new_cache(count, capacity)
    padded_temp = _temp_bytes(dense.prefill, g, s, cache, x, *padded_args)
    packed_temp = _temp_bytes(packing.prefill_packed, g, s, *packed_args, **static)
    tokens = int(sum(p.size for p in prompts))
    out = []
    for name, fn, temp, shape in (
        ("padded", padded, padded_temp, (count, width)),
        ("packed", packed_run, packed_temp, packed.ids.shape),
    ):
        t = time_call(fn, repeats=repeats)
        out.append(
            {
                "prefill": name,
                "rows x tokens": f"{shape[0]} x {shape[1]}",
                "token_slots": shape[0] * shape[1],
                "useful_fraction": tokens / (shape[0] * shape[1]),
                "time_s": t["median_s"],
                "temp_mib": temp / 2**20,
            }
        )
    return out, same


def parse_memory(text: str) -> tuple[int, int]:
    """``FRAMESxTOKENS`` (e.g. ``16x8``): frames of the memory, answer tokens per question; an argparse type."""
    frames, sep, tokens = text.lower().partition("x")
    if not (sep and frames.isdigit() and tokens.isdigit() and int(frames) > 0 and int(tokens) > 0):
        raise argparse.ArgumentTypeError(f"expected FRAMESxTOKENS, e.g. 16x8, got {text!r}")
    return int(frames), int(tokens)


def question_rows(model, video: Path, count: int, frames: int, max_new_tokens: int) -> tuple[list[dict], int]:
    """``ask_many`` against ``ask`` per question on one memory of ``frames`` frames: total time, KV bytes; and how
    many answers agree."""
    import qv_jax

    qa = qv_jax.VideoQA(
        model, group_frames=4, fps=1.0, max_frames=frames, min_pixels=224 * 224, max_pixels=224 * 224, workers=2
    )
    memory = qa.encode(video)
    questions = list(QUESTIONS[:count])
    qa.ask_many(memory, questions, max_new_tokens=max_new_tokens)  # warm: compile
    for q in questions:
        qa.ask(memory, q, max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    many = qa.ask_many(memory, questions, max_new_tokens=max_new_tokens)
    many_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = [qa.ask(memory, q, max_new_tokens=max_new_tokens) for q in questions]
    alone_s = time.perf_counter() - start
    same = sum(bool(np.array_equal(a.token_ids, b.token_ids)) for a, b in zip(many, alone, strict=True))
    setting = {"frames": frames, "memory_tokens": int(memory.tokens_per_layer.max()), "new_tokens": max_new_tokens}
    rows = [
        setting | {"questions": f"{count} x ask", "time_s": alone_s, "kv_mib": sum(a.kv_bytes for a in alone) / 2**20},
        setting | {"questions": "ask_many", "time_s": many_s, "kv_mib": many[0].kv_bytes / 2**20},
    ]
    return rows, same


def prefill_record(model, args) -> dict:
    """Packed against padded prefill of ``args.prompts`` log-normal prompts, printed and as record fields."""
    rng = np.random.default_rng(args.seed + 1)
    lengths = prompt_lengths(args.prompts, args.min_len, args.max_len, args.seed)
    prompts = [rng.integers(10, 500, n).astype(np.int32) for n in lengths]
    prefill, same_first = prefill_rows(model, prompts, args.repeats)
    print(format_table(prefill, ["prefill", "rows x tokens", "useful_fraction", "time_s", "temp_mib"]), flush=True)
    print(f"prompt lengths: {args.prompts} log-normal, {lengths.min()}-{lengths.max()}, sum {lengths.sum()}")
    speed, memory = (prefill[0][k] / prefill[1][k] for k in ("time_s", "temp_mib"))
    print(f"packed: {speed:.2f}x faster, {memory:.2f}x less temp memory; same first tokens: {same_first}")
    return {
        "lengths": [int(n) for n in lengths],
        "prefill": prefill,
        "prefill_speedup": speed,
        "temp_memory_ratio": memory,
        "same_first_tokens": same_first,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS[:2], default="bench", help="random model size (default bench)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=2000)
    parser.add_argument("--questions", type=int, default=16, choices=range(1, len(QUESTIONS) + 1), metavar="N")
    parser.add_argument(
        "--memories",
        type=parse_memory,
        nargs="+",
        default=[(16, 8), (128, 32)],
        metavar="FRAMESxTOKENS",
        help="memory frames and answer tokens of each question setting (default: 16x8 128x32)",
    )
    parser.add_argument("--skip-prefill", action="store_true", help="only the questions")
    parser.add_argument("--video", type=Path, help="video for the questions (default: a generated clip, 1 s a frame)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/packing.json)")
    args = parser.parse_args(argv)

    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as scratch:
        model = random_model(args.preset, "float32", Path(scratch))
        record |= {"model": f"random {args.preset}", "parameters": sum(x.size for x in jax.tree.leaves(model.state))}
        print(f"model: random {args.preset} ({record['parameters'] / 1e6:.1f}M parameters)")
        if not args.skip_prefill:
            record |= prefill_record(model, args)
        video = args.video
        if video is None:
            from qv_jax.testing.videos import make_sample_video

            seconds = max(20, max(frames for frames, _ in args.memories))
            video = RESULTS_DIR / "videos" / f"packing_{seconds}s.mp4"
            if not video.is_file():
                make_sample_video(video, seconds=seconds, size=(360, 640), gop=30)
        questions, speedups, same_answers = [], [], 0
        for frames, tokens in args.memories:
            rows, same = question_rows(model, video, args.questions, frames, tokens)
            questions += rows
            speedups.append(rows[0]["time_s"] / rows[1]["time_s"])
            same_answers += same
    print(format_table(questions, ["frames", "memory_tokens", "new_tokens", "questions", "time_s", "kv_mib"]))
    for (frames, tokens), speed in zip(args.memories, speedups, strict=True):
        print(f"ask_many with {frames} frames, {tokens} answer tokens: {speed:.2f}x faster")
    total = args.questions * len(args.memories)
    print(f"{same_answers}/{total} answers as ask gives them")
    record |= {"questions": questions, "ask_many_speedup": speedups, "same_answers": same_answers}
    print(f"wrote {write_json('packing', record, args.out)}")


if __name__ == "__main__":
    main()
