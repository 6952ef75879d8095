"""``qv-jax decode``: decode frames from a video with QuickDecoder, with a progress bar and a one-line summary."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qv_jax.cli.report import add_output_options, plural, print_json, say
from qv_jax.errors import InputError
from qv_jax.marker import atomic_output, check_output
from qv_jax.video.sampling import MAX_SIDE

# The clip `qv-jax decode` makes when no video is given: long enough to show parallel decoding, quick to encode.
SAMPLE = {"seconds": 20.0, "fps": 24.0, "size": (360, 640), "gop": 48, "bframes": 2}


def cache_dir() -> Path:
    """Where qv-jax keeps files it can make again: ``$XDG_CACHE_HOME/qv-jax``, else ``~/.cache/qv-jax``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qv-jax"


def sample_video(say: Callable[[str], None] = print) -> Path:
    """The SAMPLE clip (what a command given no video works on) in :func:`cache_dir`: encoded once, written whole
    or not at all, reused by later runs; ``say`` is told where it is."""
    from qv_jax.testing.videos import make_sample_video

    height, width = SAMPLE["size"]
    path = cache_dir() / f"sample-{SAMPLE['seconds']:g}s-{width}x{height}-{SAMPLE['fps']:g}fps.mp4"
    if path.is_file():
        say(f"sample video: {path}")
        return path
    started = time.perf_counter()
    # overwrite: another run may have made it meanwhile; either copy is the same clip
    with atomic_output(path, overwrite=True, directory=False) as partial:
        make_sample_video(partial, **SAMPLE)
    seconds = time.perf_counter() - started
    say(f"sample video: {path} ({SAMPLE['seconds']:g} s of {width}x{height} H.264, made in {seconds:.1f} s, kept)")
    return path


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
        "Qwen2.5-VL's rules (2 fps by default). Without VIDEO, a sample video is made (once, in the cache "
        "directory) and decoded.",
    )
    parser.add_argument(
        "video",
        nargs="?",
        help="video file (default: a 20 s 640x360 H.264 sample kept in $XDG_CACHE_HOME/qv-jax or ~/.cache/qv-jax)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fps", type=float, help="frames per second to sample (Qwen rule; default 2)")
    which.add_argument("--num-frames", type=int, help="number of frames to sample uniformly (default: by --fps)")
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument(
        "--size", type=_size, metavar="HxW", help=f"output size, at most {MAX_SIDE} per side (default: native)"
    )
    sizing.add_argument(
        "--max-pixels", type=int, help="Qwen smart_resize to at most this many pixels per frame (default: native)"
    )
    parser.add_argument(
        "--workers", type=int, help="decoder processes (default, and most: one per CPU this process may use)"
    )
    parser.add_argument("--group-size", type=int, default=16, help="frames per streamed group (default 16)")
    parser.add_argument(
        "--out",
        type=Path,
        help="write the frames to this .npy file (uint8 [frames, height, width, 3]), whole or not at all "
        "(default: decode, keep nothing)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--info",
        action="store_true",
        help="print what the probe found in VIDEO (streams, codec, pixel format, colour tags, rotation, frame "
        "count and how it was counted, keyframes, whether pts are unique) and decode nothing",
    )
    add_output_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qv_jax.video import VideoReader
    from qv_jax.video.pool import default_pool

    if args.info:
        if args.video is None:
            raise InputError("--info needs a VIDEO")
        if args.json:
            raise InputError("--info prints the probe as text; --json is for decoding")
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
    video = args.video if args.video is not None else sample_video(lambda line: say(args, line))
    started = time.perf_counter()
    with VideoReader(video, workers=workers) as reader:
        info = reader.info
        plan = reader.plan(fps=args.fps, num_frames=args.num_frames, size=args.size, max_pixels=args.max_pixels)
        probed = time.perf_counter() - started
        say(
            args,
            f"{video}: {plural(info.frame_count, 'frame')}, {info.duration_s:.1f} s at {info.avg_fps:.3g} fps, "
            f"{info.width}x{info.height} {info.codec}; decoding {plural(plan.num_frames, 'frame')} at "
            f"{plan.width}x{plan.height} with {plural(reader.workers, 'worker')}",
        )
        with contextlib.ExitStack() as stack:
            out = None
            if args.out is not None:
                partial = stack.enter_context(atomic_output(args.out, overwrite=args.overwrite, directory=False))
                shape = (plan.num_frames, plan.height, plan.width, 3)
                out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            bar = tqdm(total=plan.num_frames, unit="frame", file=sys.stderr, disable=True if args.quiet else None)
            with bar:
                for group in reader.stream(plan, group_size=args.group_size):
                    if out is not None:
                        out[group.offset : group.offset + len(group)] = group.frames
                    bar.update(len(group))
            if out is not None:
                out.flush()
                del out  # the mapping closes before the file is renamed into place
        stats = reader.last_stats
        workers_used = reader.workers
    seconds = time.perf_counter() - started
    if args.json:
        print_json(
            {
                "command": "decode",
                "video": str(video),
                "source": {
                    "frames": info.frame_count,
                    "duration_s": info.duration_s,
                    "avg_fps": info.avg_fps,
                    "width": info.width,
                    "height": info.height,
                    "codec": info.codec,
                },
                "frames": plan.num_frames,
                "width": plan.width,
                "height": plan.height,
                "frame_indices": [int(i) for i in plan.indices],
                "timings": {"probe_s": probed, "decode_s": seconds - probed, "wall_s": seconds},
                "frames_decoded": stats.frames_decoded,
                "gops_decoded": stats.gops_decoded,
                "gops_total": stats.gops_total,
                "out": None if args.out is None else str(args.out.absolute()),
                "settings": {
                    "fps": args.fps,
                    "num_frames": args.num_frames,
                    "size": None if args.size is None else list(args.size),
                    "max_pixels": args.max_pixels,
                    "workers": workers_used,
                    "group_size": args.group_size,
                },
            }
        )
        return 0
    print(
        f"decoded {plural(plan.num_frames, 'frame')} in {seconds:.2f} s ({plan.num_frames / seconds:.1f} frames/s "
        f"returned; {plural(stats.frames_decoded, 'video frame')} decoded, {stats.frames_decoded / seconds:.0f} "
        f"frames/s of video; {stats.gops_decoded}/{stats.gops_total} GOPs)" + (f" -> {args.out}" if args.out else "")
    )
    return 0
