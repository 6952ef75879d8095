"""QuickDecoder against sequential decoders, on a generated 1080p H.264 video (GOP 48, B-frames).

Cases, each timed side by side in one run:

- ``1fps`` / ``2fps``: Qwen's uniform sampling at 1 and 2 frames per second, resized to 448x448;
- ``sparse64``: 64 frames from a long (default 10 min, 640x360) video, where QuickDecoder must decode only the
  GOPs holding a wanted frame: the ``decoded`` column counts the frames each method's decoders produced.

Methods: sequential PyAV decode-and-pick (``thread_type="AUTO"``, decoding up to the last wanted frame, converting
only the wanted ones with the same swscale call as the workers), decord and torchcodec where they import, and
QuickDecoder with 1, 2, ... ``cpu_count`` workers. QuickDecoder times include opening and probing the file (the
probe cache is cleared); its worker pool is started once, before timing, as in a long-running process, and its
start-up time is reported separately. ``exact`` says whether the frames equal the sequential PyAV ones bit for bit.

Run ``python -m benchmarks.decode`` (``--help`` for the knobs). Prints a table and writes
``benchmarks/results/decode.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import av
import numpy as np

from benchmarks.common import RESULTS_DIR, format_table, time_call, write_json
from qv_jax.video import VideoReader, make_sample_video
from qv_jax.video._worker import convert_frame
from qv_jax.video.pool import WorkerPool
from qv_jax.video.probe import clear_probe_cache

SIZE = (448, 448)


def sample_video(path: Path | None, name: str, seconds: float, size: tuple[int, int]) -> Path:
    """``path``, or a generated H.264 video (GOP 48, 2 B-frames, 24 fps) cached under benchmarks/results."""
    if path is not None:
        return path
    path = RESULTS_DIR / "videos" / f"{name}_{size[0]}p_{seconds:g}s.mp4"
    if not path.exists():
        started = time.perf_counter()
        make_sample_video(path, seconds=seconds, fps=24, size=size, gop=48, bframes=2, preset="superfast")
        print(f"generated {path} in {time.perf_counter() - started:.0f} s")
    return path


def pyav_sequential(path: Path, indices: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Decode from the start with FFmpeg's own threading, keep the wanted frames; frames and frames decoded."""
    height, width = size
    wanted = {int(i): k for k, i in enumerate(indices)}
    last = int(indices.max())
    out = np.empty((len(indices), height, width, 3), np.uint8)
    reformatter = av.video.reformatter.VideoReformatter()
    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            decoded += 1
            if i in wanted:
                convert_frame(reformatter, frame, height, width, "bicubic", out[wanted[i]])
            if i == last:
                break
    return out, decoded


def decord_reader():
    try:
        import decord
    except ImportError as e:
        return None, f"not installed ({e})"

    def read(path: Path, indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        reader = decord.VideoReader(str(path), width=size[1], height=size[0], num_threads=0)
        return reader.get_batch(indices.tolist()).asnumpy()

    return read, None


def torchcodec_reader():
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as e:  # it imports CUDA and system FFmpeg libraries that may be missing
        return None, f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"

    def read(path: Path, indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        from torchvision.transforms.v2.functional import resize

        frames = VideoDecoder(str(path), num_ffmpeg_threads=0).get_frames_at(indices=indices.tolist()).data
        return resize(frames, list(size), antialias=True).permute(0, 2, 3, 1).numpy()

    return read, None


def run_case(name, path, plan_options, workers_list, repeats, baselines) -> list[dict]:
    with VideoReader(path, workers=max(workers_list)) as reader:
        plan = reader.plan(**plan_options)
        info = reader.info
    indices, size = plan.indices, plan.size
    print(f"{name}: {path.name}, {info.frame_count} frames {info.width}x{info.height}, {plan.num_frames} wanted")
    rows = []
    reference, decoded = pyav_sequential(path, indices, size)  # also the warm-up of the timing below
    timing = time_call(lambda: pyav_sequential(path, indices, size), repeats=repeats, warmup=0)
    base = timing["median_s"]
    row = {"case": name, "method": "pyav sequential (AUTO threads)", "workers": "-", "frames": plan.num_frames}
    rows.append({**row, **timing, "speedup": 1.0, "decoded": decoded, "exact": "reference"})
    for label, (read, problem) in baselines.items():
        if read is None:
            rows.append({"case": name, "method": label, "workers": "-", "frames": plan.num_frames, "note": problem})
            continue
        timing = time_call(lambda read=read: read(path, indices, size), repeats=repeats)
        rows.append(
            {
                "case": name,
                "method": label,
                "workers": "auto",
                "frames": plan.num_frames,
                **timing,
                "speedup": base / timing["median_s"],
                "exact": "n/a (own resize)",
            }
        )
    for workers in workers_list:
        last = {}

        def quick(workers=workers, last=last):
            clear_probe_cache()
            with VideoReader(path, workers=workers) as reader:
                last["frames"] = reader.read(indices=indices, size=size).frames
                last["stats"] = reader.last_stats

        timing = time_call(quick, repeats=repeats)
        stats = last["stats"]
        rows.append(
            {
                "case": name,
                "method": "QuickDecoder",
                "workers": workers,
                "frames": plan.num_frames,
                **timing,
                "speedup": base / timing["median_s"],
                "decoded": stats.frames_decoded,
                "gops": f"{stats.gops_decoded}/{stats.gops_total}",
                "exact": "yes" if np.array_equal(last["frames"], reference) else "NO",
            }
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", type=Path, help="the 1080p video (default: generate 1080p H.264)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the generated 1080p video")
    parser.add_argument("--sparse-video", type=Path, help="the long video for sparse sampling (default: generate)")
    parser.add_argument("--sparse-seconds", type=float, default=600.0, help="length of the generated long video")
    parser.add_argument("--workers", type=int, nargs="+", help="QuickDecoder worker counts (default: 1..cpu_count)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    cpus = os.cpu_count() or 1
    workers_list = args.workers or list(range(1, cpus + 1))
    video = sample_video(args.video, "decode", args.seconds, (1080, 1920))
    long_video = sample_video(args.sparse_video, "decode_long", args.sparse_seconds, (360, 640))

    started = time.perf_counter()
    fresh = WorkerPool()
    for worker in fresh.acquire(max(workers_list)):
        fresh.release(worker)
    pool_start_s = time.perf_counter() - started
    fresh.shutdown()
    print(f"worker pool start-up ({max(workers_list)} processes, one-time): {pool_start_s:.2f} s")

    baselines = {"decord": decord_reader(), "torchcodec": torchcodec_reader()}
    load_before = os.getloadavg()
    rows = []
    cases = [
        ("1fps", video, {"fps": 1.0, "size": SIZE}),
        ("2fps", video, {"fps": 2.0, "size": SIZE}),
        ("sparse64", long_video, {"num_frames": 64, "size": SIZE}),
    ]
    for name, path, options in cases:
        rows += run_case(name, path, options, workers_list, args.repeats, baselines)
    columns = ["case", "method", "workers", "frames", "median_s", "min_s", "speedup", "decoded", "gops", "exact"]
    print(format_table(rows, columns))
    for label, (_, problem) in baselines.items():
        if problem:
            print(f"{label}: {problem}")
    load_after = os.getloadavg()
    print(f"load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f} on {cpus} CPUs")
    out = write_json(
        "decode",
        {
            "videos": {"dense": str(video), "sparse": str(long_video)},
            "size": SIZE,
            "repeats": args.repeats,
            "pool_start_s": pool_start_s,
            "load_average_before_after": [load_before, load_after],
            "rows": rows,
        },
        args.out,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
