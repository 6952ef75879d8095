"""Bad input fails at once with a VideoError that names the file and the cause."""

import av
import numpy as np
import pytest
from video_helpers import remux, scratch, video

from qv_jax.errors import VideoError
from qv_jax.video import VideoReader


def _write(name: str, data: bytes):
    path = scratch(name)
    path.write_bytes(data)
    return path


def _audio_only(name: str):
    path = scratch(name)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _cut(source, name: str, fraction: float):
    data = source.read_bytes()
    return _write(name, data[: int(len(data) * fraction)])


CASES = {
    "missing": (lambda: scratch("does-not-exist.mp4"), "file not found"),
    "directory": (lambda: scratch(""), "is a directory"),
    "zero_bytes": (lambda: _write("empty.mp4", b""), r"empty \(0 bytes\)"),
    "random_bytes": (
        lambda: _write("noise.mp4", np.random.default_rng(0).bytes(64_000)),
        "cannot be opened as a video",
    ),
    "truncated_mp4": (lambda: _cut(video("h264_bframes"), "cut.mp4", 0.6), "cannot be opened as a video"),
    "truncated_faststart_mp4": (
        lambda: _cut(remux(video("h264_bframes"), "faststart.mp4", faststart=True), "cut_faststart.mp4", 0.6),
        "truncated",
    ),
    "raw_elementary_stream": (lambda: remux(video("h264_bframes"), "raw.h264"), "has no timestamp"),
    "audio_only": (lambda: _audio_only("audio.m4a"), r"no video stream \(streams: audio\)"),
    "no_video_stream": (
        lambda: _write("subtitles.srt", b"1\n00:00:01,000 --> 00:00:02,000\nhello\n"),
        r"no video stream \(streams: subtitle\)",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_video_error(case):
    make, cause = CASES[case]
    path = make()
    with pytest.raises(VideoError, match=cause) as caught:
        VideoReader(path, workers=1)
    assert str(path) in str(caught.value)
    assert caught.value.path == str(path)


def test_faststart_copy_itself_is_readable():
    # The truncated case above fails because of the cut, not because of the remux.
    path = remux(video("h264_bframes"), "faststart_whole.mp4", faststart=True)
    with VideoReader(path, workers=1) as r:
        assert r.info.frame_count == 72
        assert r.read(num_frames=4).frames.shape == (4, 120, 160, 3)


def test_closed_reader_refuses_reads():
    r = VideoReader(video("h264_bframes"), workers=1)
    r.close()
    with pytest.raises(VideoError, match="reader is closed"):
        r.read(num_frames=4)
