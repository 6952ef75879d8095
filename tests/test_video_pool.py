"""The worker pool: persistent, JAX-free workers; crashes, hangs and Ctrl-C fail the read cleanly, leave no shared
memory behind, and the next read works; device prefetch."""

import gc
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from video_helpers import assert_full_read_exact, buffer_files, long_video, scratch, sequential_decode, video

from qv_jax.errors import DecodeWorkerError
from qv_jax.video import VideoReader, frame_number, prefetch
from qv_jax.video.pool import default_pool

POOL = default_pool()


def test_workers_persist_across_reads_and_readers():
    with VideoReader(video("h264_bframes"), workers=2) as r:
        r.read(num_frames=8)
        r.read(num_frames=16)
    first = set(POOL.pids(busy=False))
    with VideoReader(video("vp9_webm"), workers=2) as r:
        r.read(num_frames=8)
    assert len(first) >= 2
    assert first <= set(POOL.pids(busy=False))  # the same processes served the second reader
    assert not POOL.pids(busy=True)


def test_video_package_and_worker_do_not_import_jax():
    code = "import sys, qv_jax.video, qv_jax.video._worker; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_workers_are_fresh_interpreters_without_jax():
    assert "jax" in sys.modules  # conftest imports JAX: workers must not inherit it by forking
    with VideoReader(video("h264_bframes"), workers=2) as r:
        r.read(num_frames=8)
    for pid in POOL.pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        # python -m qv_jax.video._worker FD: the socket is the only argument, tasks travel over it.
        assert cmdline[-4:-2] == [b"-m", b"qv_jax.video._worker"] and cmdline[-2].isdigit()
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "jaxlib" not in maps and "libjax" not in maps


def _read_with_a_stopped_worker(path: Path, on_first_group, timeout_s: float = 60.0) -> int:
    """Stream all of ``path`` with two workers, the second stopped (SIGSTOP) before the read so that it cannot
    finish its intervals however fast the other one is; ``on_first_group(pid)`` gets that worker once the first
    group arrives (or after 2 s, should the stopped worker hold the first interval). Returns its pid."""
    for worker in POOL.acquire(max(2, len(POOL.pids(busy=False)))):  # every idle worker ready, in a known order
        POOL.release(worker)
    stopped = POOL.pids(busy=False)[1]  # a read takes the first idle workers: this one is its second
    os.kill(stopped, signal.SIGSTOP)
    once = threading.Lock()

    def fire():
        if once.acquire(blocking=False):
            on_first_group(stopped)

    timer = threading.Timer(2.0, fire)
    timer.start()
    try:
        with VideoReader(path, workers=2, timeout_s=timeout_s) as r:
            for _ in r.stream(num_frames=r.info.frame_count, group_size=4):
                fire()
    finally:
        timer.cancel()
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return stopped


def test_worker_crash_fails_the_read_and_the_pool_recovers():
    path = long_video()
    with pytest.raises(DecodeWorkerError, match=r"was killed by SIGKILL (while|before) decoding frames") as caught:
        _read_with_a_stopped_worker(path, lambda pid: os.kill(pid, signal.SIGKILL))
    assert str(path) in str(caught.value)
    assert not buffer_files()
    assert not POOL.pids(busy=True)
    assert_full_read_exact(path)


def test_worker_hang_times_out_and_the_pool_recovers():
    path = long_video()
    started = time.monotonic()
    with pytest.raises(DecodeWorkerError, match="sent nothing for 1 s"):
        _read_with_a_stopped_worker(path, lambda pid: None, timeout_s=1.0)
    assert time.monotonic() - started < 30
    assert not buffer_files()
    assert not POOL.pids(busy=True)
    assert_full_read_exact(path)


def test_keyboard_interrupt_cleans_up():
    # A shell that starts a job in the background leaves SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: install Python's own handler for this test. Python discards an exception raised inside a
    # garbage-collector callback (JAX registers one), so a Ctrl-C landing there is lost: keep the collector off.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    gc.disable()
    path = long_video()
    paused = []

    def interrupt_while_decoding():
        deadline = time.monotonic() + 30
        while not (busy := POOL.pids(busy=True)) and time.monotonic() < deadline:
            time.sleep(0.001)
        for pid in busy:  # the read now waits on a worker that cannot finish, so the interrupt lands inside it
            paused.append(pid)
            os.kill(pid, signal.SIGSTOP)
        # to the process, as a terminal sends Ctrl-C: whichever thread the kernel hands it to, the read must notice
        os.kill(os.getpid(), signal.SIGINT)

    try:
        with VideoReader(path, workers=1) as r:
            r.read(indices=[0])  # a warm worker, so the read below starts decoding at once
            thread = threading.Thread(target=interrupt_while_decoding)
            with pytest.raises(KeyboardInterrupt):
                thread.start()
                r.read(indices=np.arange(r.info.frame_count))
                thread.join()
                time.sleep(1.0)  # should the read ever win the race, the signal still lands inside this block
            thread.join()
    finally:
        gc.enable()
        signal.signal(signal.SIGINT, previous)
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert not buffer_files()
    assert not POOL.pids(busy=True)
    assert_full_read_exact(path)


def test_closing_a_stream_early_cancels_the_rest():
    path = long_video()
    with VideoReader(path, workers=2) as r:
        stream = r.stream(num_frames=r.info.frame_count, group_size=4)
        first = next(stream)
        stream.close()
        assert [frame_number(f) for f in first.frames] == [0, 1, 2, 3]
        assert not buffer_files()
        assert not POOL.pids(busy=True)
        assert r.read(indices=[5]).frames.shape == (1, 48, 64, 3)


def test_decoding_failure_in_a_worker_is_reported():
    path = scratch("shrinking.mkv")
    shutil.copy(video("vfr_mkv"), path)
    with VideoReader(path, workers=2) as r:
        with open(path, "r+b") as f:  # the file loses its second half after the probe
            f.truncate(path.stat().st_size // 2)
        with pytest.raises(DecodeWorkerError, match=r"decoding frames \d+-\d+ failed") as caught:
            r.read(indices=np.arange(r.info.frame_count))
    assert str(path) in str(caught.value)
    assert not buffer_files()
    assert_full_read_exact(video("vfr_mkv"))


def test_prefetch_puts_groups_on_device_in_order():
    import jax

    path = video("h264_open_gop")
    _, expected = sequential_decode(path)
    with VideoReader(path, workers=2) as r:
        groups = list(prefetch(r.stream(indices=np.arange(len(expected)), group_size=8), depth=2))
    assert all(isinstance(g.frames, jax.Array) for g in groups)
    assert [g.offset for g in groups] == list(range(0, len(expected), 8))
    np.testing.assert_array_equal(np.concatenate([np.asarray(g.frames) for g in groups]), expected)


def test_prefetch_stops_its_source_when_closed():
    path = long_video()
    with VideoReader(path, workers=2) as r:
        stream = prefetch(r.stream(num_frames=r.info.frame_count, group_size=4), depth=3)
        next(stream)
        stream.close()
        assert not POOL.pids(busy=True)
        assert not buffer_files()


def test_prefetch_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        next(prefetch(iter([]), depth=0))
