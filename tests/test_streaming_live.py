"""Live sources feeding a stream (qv_jax.video.live): MPEG-TS and Matroska byte streams written into a pipe by PyAV
are watched and answered; a stream that ends, stalls, is cut off or breaks answers from what was seen with a clear
message; ``qv-jax watch`` on a schedule, on standard input and with typed questions."""

import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

import av
import numpy as np
import pytest
from pipeline_helpers import VIDEO_OPTIONS, tiny_model

import qv_jax
from qv_jax.errors import InputError
from qv_jax.video.live import file_source, frames_source, pipe_source

SIDE = 112


@pytest.fixture(scope="module")
def qa():
    return qv_jax.VideoQA(tiny_model(), **VIDEO_OPTIONS)


def write_live(fd: int, frames: int, *, format: str = "mpegts", stall_s: float = 0.0, cut_at: int | None = None):
    """Encode random frames at 4 fps as ``format`` into the pipe ``fd`` on a thread, as a live sender does (bytes
    out as each frame is muxed; the pipe held open ``stall_s`` before the end; with ``cut_at``, closed after that
    many bytes, mid-stream, as when the sender dies)."""

    def write():
        with os.fdopen(fd, "wb") as out:
            sink = _Sender(out, cut_at)
            container = av.open(sink, mode="w", format=format)
            stream = container.add_stream("mpeg2video", rate=4)
            stream.width = stream.height = SIDE
            stream.pix_fmt = "yuv420p"
            rng = np.random.default_rng(0)
            for _ in range(frames):
                image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            time.sleep(stall_s)
            for packet in stream.encode():
                container.mux(packet)
            container.close()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


class _Sender:
    """The sending end of a live stream: write-only (not seekable, as a pipe), each write sent at once."""

    def __init__(self, out, cut_at: int | None):
        self.out, self.left = out, cut_at

    def write(self, data) -> int:
        if self.left is None:
            self.out.write(data)
        elif self.left > 0:
            self.out.write(bytes(data)[: self.left])
            self.left -= min(self.left, len(data))
            if not self.left:
                self.out.close()
        if not self.out.closed:
            self.out.flush()
        return len(data)


@pytest.mark.slow
@pytest.mark.parametrize("stall_s", [0.0, 8.0])
def test_a_live_mpegts_pipe_is_watched_and_answered(qa, stall_s):
    read, write = os.pipe()
    writer = write_live(write, 16, stall_s=stall_s)
    stream = qa.stream(carriers=4, fps=4.0)
    with os.fdopen(read, "rb") as pipe:
        report = stream.feed(pipe_source(pipe, size=(56, 56), stall_timeout_s=3.0, buffer=64))
        answer = stream.ask("What is happening?", max_new_tokens=3)
    assert report.ended == ("stalled" if stall_s else "end"), report.message
    assert "stalled (no frame for 3 s)" in report.message if stall_s else "ended" in report.message
    assert report.frames_seen == stream.frames_seen >= (2 if stall_s else 16) and report.frames_dropped == 0
    assert 1 <= answer.token_ids.size <= 3 and report.realtime_factor > 0
    if not stall_s:
        writer.join(timeout=10)
        times = stream.carrier_times_s
        assert len(times) == 4 and set(times) <= {i / 2 for i in range(8)}


@pytest.mark.slow
def test_a_matroska_stream_on_standard_input_is_watched(monkeypatch, capsys):
    from pipeline_helpers import model_dir

    from qv_jax.cli import main

    read, write = os.pipe()
    write_live(write, 16, format="matroska")
    argv = ["watch", "-", "--format", "matroska", "--model", str(model_dir()), "--ask-every", "2s", "--fps", "2"]
    with os.fdopen(read, "rb") as pipe:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(pipe))
        code = main([*argv, "--carriers", "4", "--max-pixels", str(56 * 56), "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "standard input: the stream ended after 16 frames, 3.8 s; real-time factor" in err
    seen, dropped = (int(x) for x in re.search(r"watched (\d+) frames \((\d+) dropped", err).groups())
    assert seen + dropped == 8 and seen >= 2  # 4 s at 2 fps
    assert out.splitlines()[-1].startswith("[") and "What is happening? -> " in out.splitlines()[-1]


def test_a_matroska_stream_cut_off_mid_way_answers_from_what_was_seen(qa):
    read, write = os.pipe()
    write_live(write, 16, format="matroska", cut_at=30_000)  # the sender dies inside its 5th frame or so
    stream = qa.stream(carriers=4, fps=4.0)
    with os.fdopen(read, "rb") as pipe:
        report = stream.feed(pipe_source(pipe, format="matroska", size=(56, 56), stall_timeout_s=3.0, buffer=64))
    assert report.ended == "end" and 2 <= report.frames_seen == stream.frames_seen < 16
    assert f"standard input: the stream ended after {report.frames_seen} frames, " in report.message
    assert stream.ask("What was seen?", max_new_tokens=2).token_ids.size >= 1


def test_a_broken_stream_answers_from_what_was_seen(qa):
    def frames():
        rng = np.random.default_rng(1)
        for i in range(6):
            yield rng.integers(0, 256, (56, 56, 3), dtype=np.uint8), i / 2
        raise OSError("camera unplugged")

    stream = qa.stream(carriers=4, fps=2.0)
    report = stream.feed(frames_source(frames(), buffer=8))
    assert report.ended == "broken" and "camera unplugged" in report.message and stream.frames_seen == 6
    assert stream.ask("What was seen?", max_new_tokens=2).token_ids.size >= 1

    garbage = pipe_source(io.BytesIO(b"\x00not a transport stream" * 100), stall_timeout_s=3.0)
    report = qa.stream().feed(garbage)
    assert report.ended == "broken" and report.frames_seen == 0 and "standard input" in report.message


def test_a_slow_consumer_drops_the_oldest_frames_and_counts_them():
    source = frames_source((np.zeros((56, 56, 3), np.uint8) for _ in range(50)), fps=10.0, buffer=4)
    source.fps = 10.0
    taken = []
    for _, t in source:
        time.sleep(0.01 if taken else 0.5)  # the producer races ahead while the first frame is worked on
        taken.append(t)
    assert source.ended == "end" and source.decoded == 50
    assert source.dropped == 50 - len(taken) > 0 and taken == sorted(taken) and taken[-1] == pytest.approx(4.9)


def test_a_file_plays_at_its_own_rate_when_asked(tmp_path):
    from pipeline_helpers import sample_video

    fast = file_source(sample_video(), size=(56, 56))
    began = time.perf_counter()
    count = sum(1 for _ in fast)
    fast_s = time.perf_counter() - began
    assert count == 40 and fast.ended == "end" and fast_s < 5.0
    realtime = file_source(sample_video(), realtime=True, size=(56, 56), buffer=64)
    began = time.perf_counter()
    times = [t for _, t in realtime]
    assert time.perf_counter() - began >= times[-1] - 0.05 and len(times) == 40
    with pytest.raises(InputError, match="no such video file"):
        file_source(tmp_path / "missing.mp4")


@pytest.mark.slow
def test_watch_command_answers_on_schedule_and_summarises(capsys):
    from pipeline_helpers import model_dir, sample_video

    from qv_jax.cli import main

    argv = ["watch", str(sample_video()), "--model", str(model_dir()), "--ask-every", "2s", "--fps", "2"]
    code = main([*argv, "--carriers", "4", "--max-pixels", str(56 * 56), "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    stamps = [float(line.split("]")[0].strip("[ s")) for line in out.splitlines()]
    # each answer's time: the newest frame its memory held, the second of a patch of frames 0.5 s apart
    assert len(stamps) >= 3 and stamps[0] >= 0.5 and stamps == sorted(stamps) and all(2 * s % 1 == 0 for s in stamps)
    seen, dropped = (int(x) for x in re.search(r"watched (\d+) frames \((\d+) dropped", err).groups())
    assert seen + dropped == 10 and seen >= 2 and "the stream ended" in err and "real-time factor" in err
    # --json: one object per answer, then the summary
    assert main([*argv, "--carriers", "4", "--max-pixels", str(56 * 56), "--max-new-tokens", "2", "--json"]) == 0
    *answers, last = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert [a["stream_time_s"] for a in answers] == sorted(a["stream_time_s"] for a in answers) and len(answers) >= 3
    assert all(a["command"] == "watch" and a["question"] == "What is happening?" for a in answers)
    assert all(1 <= len(a["token_ids"]) <= 2 and a["kv_bytes"] > 0 for a in answers)
    summary = last["summary"]
    assert summary["frames_seen"] + summary["dropped"] == 10 and summary["ended"] == "end"
    assert main(["watch", "missing.mp4", "--model", str(model_dir())]) == 2
    assert "no such video file" in capsys.readouterr().err


@pytest.mark.slow
def test_watch_interactive_answers_typed_questions_while_it_watches_and_stops_on_quit(tmp_path):
    from pipeline_helpers import model_dir

    from qv_jax.testing.videos import make_sample_video

    video = make_sample_video(tmp_path / "long.mp4", seconds=120, fps=2, size=(56, 56), gop=8)
    command = [sys.executable, "-m", "qv_jax", "watch", str(video), "--model", str(model_dir()), "--interactive"]
    command += ["--realtime", "--fps", "2", "--ask-every", "2s", "--carriers", "4", "--max-new-tokens", "2"]
    command += ["--max-pixels", str(56 * 56)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    errors = tmp_path / "stderr.txt"
    with (
        errors.open("w") as err_file,
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env
        ) as process,
    ):
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=lambda: [*map(lines.put, process.stdout), lines.put(None)], daemon=True)
        reader.start()

        def next_line() -> str:
            try:
                line = lines.get(timeout=180)
            except queue.Empty:
                line = None
            if line is None:
                process.kill()
                raise AssertionError(f"no answer came; stderr: {errors.read_text()[-2000:]}")
            return line

        first = next_line()  # a scheduled answer: the stream is being watched
        process.stdin.write("\nWhat colour is it?\n")  # a blank line is no question
        process.stdin.flush()
        typed = next_line()
        while "What colour" not in typed:
            typed = next_line()
        process.stdin.write("quit\n")
        process.stdin.flush()
        process.wait(timeout=120)
        reader.join(timeout=10)
    err = errors.read_text()
    assert process.returncode == 0, err
    stamp = re.compile(r"\[\s*([0-9.]+) s\] (.*) -> ")
    first_t, typed_t = (float(stamp.match(line).group(1)) for line in (first, typed))
    assert stamp.match(first).group(2) == "What is happening?" and typed_t >= first_t >= 0.5
    assert stamp.match(typed).group(2) == "What colour is it?"
    *_, last, end = lines.queue  # the closing answer to --question, then the end of output
    assert end is None and stamp.match(last).group(2) == "What is happening?"
    assert float(stamp.match(last).group(1)) >= typed_t
    assert f"{video}: watching stopped (quit); real-time factor" in err, err
    seen = int(re.search(r"watched (\d+) frames", err).group(1))
    assert 2 <= seen < 240  # stopped long before the 120 s video ended


def test_interactive_questions_end_with_their_input(monkeypatch, capsys):
    from qv_jax.cli import watch

    asked = []

    def answer(question):
        if question == "too early?":
            raise InputError("the stream has shown no complete temporal patch (two frames) yet")
        asked.append(question)

    source = frames_source(iter(()))
    monkeypatch.setattr(watch.sys, "stdin", io.StringIO("too early?\n\n  What now?  \n"))
    watch._questions(False, answer, source)  # returns at the end of input (Ctrl-D)
    assert asked == ["What now?"] and "no complete temporal patch" in capsys.readouterr().err
    assert source.ended == "closed" and source.message == "frames: watching stopped: the questions ended"
    assert list(source) == []  # a closed source yields nothing more
