"""``qv-jax decode``: decode frames from a video with QuickDecoder, with a progress bar and a one-line summary."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qv_jax.errors import InputError
from qv_jax.marker import atomic_output, check_output
from qv_jax.video.sampling import MAX_SIDE

# The clip `qv-jax decode` makes when no video is given: long enough to show parallel decoding, quick to encode.
SAMPLE = {"seconds": 20.0, "fps": 24.0, "size": (360, 640), "gop": 48, "bframes": 2}


def generate_sample(directory: Path) -> Path:
    """Encode SAMPLE as ``directory/sample.mp4`` (what a command given no video works on), say so, return its path."""
    from qv_jax.testing.videos import make_sample_video

    started = time.perf_counter()
    video = make_sample_video(directory / "sample.mp4", **SAMPLE)
    seconds = time.perf_counter() - started
    height, width = SAMPLE["size"]
    print(f"generated {video.name}: {SAMPLE['seconds']:g} s of {width}x{height} H.264 in {seconds:.1f} s")
    return video


def capped_workers(workers: int | None) -> int:
    """``--workers`` (None: the default) as the decoder pool will run it: at most one per CPU this process may
    use (:func:`qv_jax.video.pool.cap_workers`); a larger request is cut, with one warning line on stderr."""
    from qv_jax.video.pool import cap_workers

    if workers is not None and workers < 1:
        raise InputError(f"--workers must be positive, got {workers}")
    count, note = cap_workers(workers)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return count


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 448x448, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return height, width


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "decode",
        help="decode video frames in parallel (QuickDecoder)",
        description="Decode frames from VIDEO in parallel, exactly as a sequential decode would, sampled with "
        "Qwen2.5-VL's rules (2 fps by default). Without VIDEO, a sample video is generated and decoded.",
    )
    parser.add_argument("video", nargs="?", help="video file (default: a generated 20 s 640x360 H.264 sample)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fps", type=float, help="frames per second to sample (Qwen rule; default 2)")
    which.add_argument("--num-frames", type=int, help="number of frames to sample uniformly")
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument(
        "--size", type=_size, metavar="HxW", help=f"output size, at most {MAX_SIDE} per side (default: native)"
    )
    sizing.add_argument("--max-pixels", type=int, help="Qwen smart_resize to at most this many pixels per frame")
    parser.add_argument(
        "--workers", type=int, help="decoder processes (default, and most: one per CPU this process may use)"
    )
    parser.add_argument("--group-size", type=int, default=16, help="frames per streamed group (default 16)")
    parser.add_argument(
        "--out",
        type=Path,
        help="write the frames to this .npy file (uint8 [frames, height, width, 3]), whole or not at all",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--info",
        action="store_true",
        help="print what the probe found in VIDEO (streams, codec, pixel format, colour tags, rotation, frame "
        "count and how it was counted, keyframes, whether pts are unique) and decode nothing",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qv_jax.video import VideoReader
    from qv_jax.video.pool import default_pool

    if args.info:
        if args.video is None:
            raise InputError("--info needs a VIDEO")
        from qv_jax.video.probe import describe

        print(describe(args.video))
        return 0
    workers = capped_workers(args.workers)
    if args.out is not None:
        if args.out.suffix != ".npy":
            raise InputError(f"--out must name a .npy file, got {args.out}")
        inputs = () if args.video is None else (args.video,)
        check_output(args.out, overwrite=args.overwrite, inputs=inputs, directory=False)
    default_pool().prestart(workers)  # workers boot while we encode or probe
    # Only a generated sample needs a scratch directory (a run killed outright would leave it behind).
    scratch = tempfile.TemporaryDirectory(prefix="qv-jax-sample-") if args.video is None else contextlib.nullcontext()
    with scratch as directory:
        video = args.video if args.video is not None else generate_sample(Path(directory))
        started = time.perf_counter()
        with VideoReader(video, workers=workers) as reader:
            info = reader.info
            plan = reader.plan(fps=args.fps, num_frames=args.num_frames, size=args.size, max_pixels=args.max_pixels)
            print(
                f"{video}: {info.frame_count} frames, {info.duration_s:.1f} s at {info.avg_fps:.3g} fps, "
                f"{info.width}x{info.height} {info.codec}; decoding {plan.num_frames} frames at "
                f"{plan.width}x{plan.height} with {reader.workers} workers"
            )
            with contextlib.ExitStack() as stack:
                out = None
                if args.out is not None:
                    partial = stack.enter_context(atomic_output(args.out, overwrite=args.overwrite, directory=False))
                    shape = (plan.num_frames, plan.height, plan.width, 3)
                    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
                with tqdm(total=plan.num_frames, unit="frame", file=sys.stderr, disable=None) as bar:
                    for group in reader.stream(plan, group_size=args.group_size):
                        if out is not None:
                            out[group.offset : group.offset + len(group)] = group.frames
                        bar.update(len(group))
                if out is not None:
                    out.flush()
                    del out  # the mapping closes before the file is renamed into place
            stats = reader.last_stats
        seconds = time.perf_counter() - started
    print(
        f"decoded {plan.num_frames} frames in {seconds:.2f} s ({plan.num_frames / seconds:.1f} frames/s returned; "
        f"{stats.frames_decoded} video frames decoded, {stats.frames_decoded / seconds:.0f} frames/s of video; "
        f"{stats.gops_decoded}/{stats.gops_total} GOPs)" + (f" -> {args.out}" if args.out else "")
    )
    return 0
