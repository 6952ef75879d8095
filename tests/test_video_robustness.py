"""The decoder against hostile conditions: killed runs leave no shared memory past the next start (and `qv-jax
doctor` finds what they left), the worker count has a ceiling, non-videos and impossible requests are refused with
typed errors, random worker kills and stalls fail reads cleanly, and mutated files give frames or typed errors."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from ffmpeg_videos import FFMPEG, ffmpeg, has_encoder
from video_helpers import buffer_files, long_video, scratch, sequential_decode, video

from qv_jax.cli import main
from qv_jax.errors import InputError, QVError, VideoError
from qv_jax.testing.videos import make_sample_video
from qv_jax.video import VideoReader, buffer
from qv_jax.video.pool import WorkerPool, cpu_limit, default_pool

POOL = default_pool()
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _segments(pid: int) -> list[Path]:
    prefix = buffer.buffer_prefix(pid)
    return [p for d in buffer.buffer_dirs() for p in Path(d).glob(prefix + "*")]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z"  # a zombie has exited
    except OSError:
        return True


def _wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_decode_leaves_no_segment_after_the_next_start(signum):
    command = [sys.executable, "-m", "qv_jax", "decode", str(long_video()), "--num-frames", "1500", "--workers", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(lambda: _segments(proc.pid) or proc.poll() is not None, 120, "the decode allocates its buffer")
        workers = _children(proc.pid)
        for pid in workers:  # the read cannot end before the signal lands
            os.kill(pid, signal.SIGSTOP)
        assert proc.poll() is None, "the read ended before it could be interrupted"
        assert 1 <= len(workers) <= 2 and _segments(proc.pid)
        proc.send_signal(signum)
        if signum == signal.SIGKILL:
            proc.wait(30)
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        proc.wait(30)
        # Workers whose parent is gone exit by themselves, quietly (their stderr is this pipe).
        _wait_until(lambda: all(map(_gone, workers)), 30, "the orphaned workers exit")
        stderr = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in stderr, stderr
    if signum == signal.SIGTERM:
        assert proc.returncode == 130 and stderr.strip().splitlines() == ["qv-jax decode: interrupted (SIGTERM)"]
        assert not _segments(proc.pid)  # it cleaned up itself
    else:
        assert proc.returncode == -signal.SIGKILL
        (left,) = _segments(proc.pid)
        (entry,) = [x for x in buffer.leftovers() if x.path == str(left)]
        assert entry.state == "dead" and entry.nbytes > 0
        WorkerPool()  # the next start removes it
        assert not left.exists()


@needs_proc
def test_doctor_lists_and_removes_only_dead_owners_buffers(capsys):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert buffer.buffer_prefix(sleeper.pid).count("-") == 5  # qv-jax-PID-START-PIDNS-
        live = Path(buffer.SHM_DIR if os.path.isdir(buffer.SHM_DIR) else buffer.buffer_dirs()[0])
        live_file = live / f"{buffer.buffer_prefix(sleeper.pid)}live0001"
        pid, start, ns = buffer.buffer_prefix(sleeper.pid).split("-")[2:5]
        reused = live / f"qv-jax-{pid}-{int(start) + 1}-{ns}-reused01"  # same pid, another process: dead
        other_ns = live / f"qv-jax-{pid}-{start}-1-otherns1"  # another pid namespace: cannot tell, kept
        for path in (live_file, reused, other_ns):
            path.write_bytes(b"\0" * 8192)
        assert main(["doctor"]) == 0
        out = capsys.readouterr().out
        assert f"{live_file}  " in out and "in use" in out.split(str(live_file))[1].splitlines()[0]
        assert "owner gone" in out.split(str(reused))[1].splitlines()[0]
        assert "`qv-jax doctor --clean` removes them" in out
        assert reused.exists()  # listing removes nothing
        assert main(["doctor", "--clean"]) == 0
        assert "removed 1 frame buffer of dead processes" in capsys.readouterr().out
        assert live_file.exists() and other_ns.exists() and not reused.exists()
        WorkerPool()  # a pool start-up leaves the live owner's buffer too
        assert live_file.exists()
        sleeper.kill()
        sleeper.wait()
        assert main(["doctor", "--clean"]) == 0
        assert not live_file.exists() and other_ns.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        for path in live.glob(f"qv-jax-{sleeper.pid}-*"):
            path.unlink()


def test_doctor_with_nothing_left(capsys):
    assert main(["doctor", "--clean"]) == 0
    assert not buffer_files()


def test_workers_beyond_the_cpus_are_cut_with_one_warning(capsys):
    limit = cpu_limit()
    with pytest.warns(UserWarning, match=f"1000 decoder workers asked for.*using {limit}$") as record:
        reader = VideoReader(video("h264_bframes"), workers=1000)
    assert len(record) == 1 and reader.workers == limit
    reader.read(indices=[0])
    assert reader.last_stats.workers == 1  # one interval, one worker
    assert main(["decode", str(video("h264_bframes")), "--workers", "1000", "--num-frames", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"warning: 1000 decoder workers asked for, but this process may use {limit} CPUs: using {limit}"
    ]
    assert f"with {limit} workers" in captured.out
    assert len(POOL.pids()) <= limit


def test_ask_encode_and_demo_cut_workers_in_one_line(capsys):
    from qv_jax.cli import build_parser
    from qv_jax.cli.options import videoqa_config

    limit = cpu_limit()
    for command in (["ask", "v.mp4", "?", "--model", "m"], ["encode", "v.mp4", "--model", "m", "--out", "o"], ["demo"]):
        config = videoqa_config(build_parser().parse_args([*command, "--workers", "1000"]))
        assert config.workers == limit
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("warning: 1000 decoder workers asked for")


def _png(name: str) -> Path:
    path = scratch(name)
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 32, 24, "rgb24"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24")))
        out.mux(stream.encode(None))
    return path


NOT_VIDEOS = {
    "notes.txt": (lambda: scratch("notes.txt").write_text("hello\n" * 3000), "is a text file"),
    "picture.png": (lambda: _png("picture.png"), r"is a still image \(png_pipe\)"),
}


@pytest.mark.parametrize("name", sorted(NOT_VIDEOS))
def test_a_non_video_is_refused_with_one_line(name, capsys):
    make, cause = NOT_VIDEOS[name]
    make()
    path = scratch(name)
    with pytest.raises(VideoError, match=cause):
        VideoReader(path, workers=1)
    assert main(["decode", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"qv-jax decode: error: {path}: ")


def test_an_animated_gif_is_a_video():
    path = scratch("animated.gif")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("gif", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "rgb8"
        for i in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 60 * i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with VideoReader(path, workers=1) as r:
        assert r.info.frame_count == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fps", "inf"], "fps must be positive and finite, got inf"),
        (["--fps", "nan"], "fps must be positive and finite, got nan"),
        (["--fps", "0"], "fps must be positive and finite"),
        (["--fps", "-1"], "fps must be positive and finite"),
        (["--size", "20000x20000"], "size 20000x20000 .* exceeds the limit of 8192 pixels per side"),
        (["--size", "16x8193"], "exceeds the limit of 8192 pixels per side"),
        (["--num-frames", str(10**12)], r"must lie in \[2, 72\]"),
        (["--num-frames", "-4"], "num_frames must be positive"),
        (["--workers", "0"], "--workers must be positive"),
    ],
)
def test_impossible_requests_exit_2_with_one_line(args, message, capsys):
    assert main(["decode", str(video("h264_bframes")), *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("qv-jax decode: error: ") and re.search(message, line), line
    assert not buffer_files()


def test_reader_refuses_impossible_plans():
    with VideoReader(video("h264_bframes"), workers=1) as r:
        for options in ({"fps": math.inf}, {"size": (20000, 20000)}, {"max_pixels": 10**12, "min_pixels": 10**11}):
            with pytest.raises(InputError):
                r.plan(**options)
        assert r.plan(size=(8192, 16)).size == (8192, 16)  # the limit itself is allowed


# --- fault injection ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_random_worker_kills_and_stalls_fail_reads_cleanly():
    path = make_sample_video(scratch("faults.mp4"), num_frames=360, size=(32, 48), gop=12, bframes=2)
    _, expected = sequential_decode(path)
    rng = np.random.default_rng(15)
    outcomes = {"exact": 0, "error": 0}
    stopped: list[int] = []

    def inject(kind: str, delay: float, pick: float, ready: set[int]) -> None:
        time.sleep(delay)
        pids = POOL.pids(busy=True) or POOL.pids()
        if kind == "stall":
            # A worker stopped while it starts holds the read for the pool's start timeout (minutes), not timeout_s.
            pids = [pid for pid in pids if pid in ready]
        if not pids:
            return
        pid = pids[int(pick * len(pids))]
        try:
            if kind == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                stopped.append(pid)
                os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass

    with VideoReader(path, workers=2, timeout_s=1.0) as r:
        r.read(indices=[0, len(expected) - 1])  # every idle worker has started
        for _ in range(50):
            kind = rng.choice(["none", "kill", "stall"], p=[0.3, 0.45, 0.25])
            indices = np.sort(rng.choice(len(expected), size=int(rng.integers(2, 200)), replace=False))
            ready = set(POOL.pids(busy=False))
            injector = threading.Thread(
                target=inject, args=(kind, float(rng.uniform(0, 0.05)), float(rng.random()), ready)
            )
            if kind != "none":
                injector.start()
            try:
                frames = r.read(indices=indices).frames
            except QVError:
                outcomes["error"] += 1
            else:
                np.testing.assert_array_equal(frames, expected[indices])
                outcomes["exact"] += 1
            finally:
                if kind != "none":
                    injector.join()
                for pid in stopped:  # a stall that hit an idle worker would fail the next read, not this one
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                stopped.clear()
            assert not POOL.pids(busy=True)
        np.testing.assert_array_equal(r.read(indices=np.arange(len(expected))).frames, expected)
    assert outcomes["exact"] and outcomes["error"], outcomes
    assert not buffer_files()


# --- fuzzing -----------------------------------------------------------------------------------------------------

FUZZ_PER_FORMAT = 50
# Runs in a fresh interpreter, so that a crash inside FFmpeg would show as a dead child, not a dead test session.
FUZZ_CHILD = """
import json, sys, traceback
import numpy as np
from qv_jax.errors import QVError
from qv_jax.video import VideoReader
for i, path in enumerate(json.loads(sys.argv[1])):
    print("start", i, flush=True)
    try:
        with VideoReader(path, workers=2, timeout_s=10.0) as r:
            frames = r.read(indices=np.arange(r.info.frame_count)).frames
        assert frames.dtype == np.uint8 and frames.shape[0] == r.info.frame_count, frames.shape
        print("frames", i, flush=True)
    except QVError as e:
        print("typed", i, type(e).__name__, flush=True)
    except Exception as e:
        print("untyped", i, json.dumps(traceback.format_exc()), flush=True)
"""


def _fuzz_source(kind: str) -> Path:
    mp4 = make_sample_video(scratch("fuzz.mp4"), num_frames=36, size=(32, 48), gop=12, bframes=2)
    if kind == "mp4":
        return mp4
    if FFMPEG is None:
        pytest.skip("the ffmpeg command line is not installed")
    out = scratch(f"fuzz.{kind}")
    if kind == "webm":
        if not has_encoder("libvpx-vp9"):
            pytest.skip("this ffmpeg has no VP9 encoder")
        ffmpeg("-i", mp4, "-c:v", "libvpx-vp9", "-g", "12", "-b:v", "200k", out)
    else:
        ffmpeg("-i", mp4, "-c", "copy", out)
    return out


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 3))):
        op = rng.choice(["flip", "truncate", "duplicate"])
        if op == "flip":
            where = rng.integers(0, len(out), size=int(rng.integers(1, 17)))
            for w in where:
                out[w] ^= int(rng.integers(1, 256))
        elif op == "truncate":
            del out[int(rng.integers(1, len(out))) :]
        else:
            start = int(rng.integers(0, len(out)))
            chunk = out[start : start + int(rng.integers(16, 4097))]
            at = int(rng.integers(0, len(out) + 1))
            out[at:at] = chunk
    return bytes(out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mp4", "mkv", "webm", "ts"])
def test_mutated_files_give_frames_or_typed_errors(kind):
    source = _fuzz_source(kind)
    data = source.read_bytes()
    rng = np.random.default_rng([15, len(kind), ord(kind[0])])
    paths = []
    for i in range(FUZZ_PER_FORMAT):
        path = scratch(f"fuzz_{kind}_{i}.{kind}")
        path.write_bytes(_mutate(data, rng))
        paths.append(str(path))
    child = subprocess.Popen(
        [sys.executable, "-c", FUZZ_CHILD, json.dumps(paths)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # FFmpeg's complaints about the damage
        text=True,
    )
    try:
        stdout, _ = child.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, _ = child.communicate()
    lines = [line.split(" ", 2) for line in stdout.splitlines()]
    last = int(lines[-1][1]) if lines else 0
    assert child.returncode == 0, f"the reader crashed or hung (rc {child.returncode}) on {paths[last]}"
    untyped = [f"{paths[int(line[1])]}: {json.loads(line[2])}" for line in lines if line[0] == "untyped"]
    assert not untyped, "\n".join(untyped)
    results = [line[0] for line in lines if line[0] != "start"]
    assert len(results) == FUZZ_PER_FORMAT
    assert "typed" in results  # the mutations do damage
    assert not _segments(child.pid)
