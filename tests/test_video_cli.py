"""``qv-jax decode``: frames to .npy, a one-line summary, clear errors, and a sample video when none is given."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from video_helpers import scratch, sequential_decode, video

from qv_jax.cli import main
from qv_jax.video import sampling


def test_decode_writes_the_planned_frames(capsys):
    path, out = video("h264_open_gop"), scratch("cli_frames.npy")
    assert main(["decode", str(path), "--num-frames", "8", "--size", "32x48", "--workers", "2", "--out", str(out)]) == 0
    _, expected = sequential_decode(path, size=(32, 48))
    np.testing.assert_array_equal(np.load(out), expected[sampling.sample_indices(72, 8)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "72 frames" in lines[0] and "decoding 8 frames at 48x32 with 2 workers" in lines[0]
    assert lines[-1].startswith("decoded 8 frames in ") and "frames/s of video" in lines[-1]


def test_decode_qwen_sizing_and_fps(capsys):
    assert main(["decode", str(video("h264_bframes")), "--fps", "1", "--max-pixels", "200704", "--workers", "1"]) == 0
    # 3 s at 1 fps is below Qwen's minimum of 4 frames; 120x160 is scaled up to the video pixel minimum.
    assert "decoding 4 frames at 392x280" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["decode", "nowhere.mp4"], "nowhere.mp4: file not found"),
        (["decode", "VIDEO", "--out", "frames.txt"], "--out must name a .npy file"),
        (["decode", "VIDEO", "--num-frames", "500"], r"must lie in \[2, 72\]"),
    ],
)
def test_decode_errors_exit_2_with_a_message(args, message, capsys):
    args = [str(video("h264_bframes")) if a == "VIDEO" else a for a in args]
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_decode_rejects_conflicting_options():
    with pytest.raises(SystemExit):
        main(["decode", "x.mp4", "--fps", "1", "--num-frames", "4"])
    with pytest.raises(SystemExit):
        main(["decode", "x.mp4", "--size", "4x"])


@pytest.mark.slow
def test_decode_without_a_video_generates_a_sample(tmp_path):
    # The README's main job: `qv-jax decode` with nothing else; the sample is kept in the cache directory.
    result = subprocess.run(
        [sys.executable, "-m", "qv_jax", "decode", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    (sample,) = (tmp_path / "qv-jax").iterdir()
    assert lines[0].startswith(f"sample video: {sample} (20 s of 640x360 H.264, made in")
    assert "480 frames" in lines[1] and "decoding 40 frames at 640x360" in lines[1]
    assert lines[-1].startswith("decoded 40 frames")
