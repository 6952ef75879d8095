"""``qv-jax ask`` / ``encode`` / ``demo``: a saved memory answers like the video, errors are reported, and the
demo runs with the runtime dependencies alone."""

import subprocess
import sys

import pytest
from pipeline_helpers import SIDE, model_dir, sample_video

from qv_jax.cli import main

OPTIONS = [
    "--fps",
    "4",
    "--min-pixels",
    str(SIDE * SIDE),
    "--max-pixels",
    str(SIDE * SIDE),
    "--group-frames",
    "8",
    "--workers",
    "2",
    "--max-new-tokens",
    "6",
]


def _answer(stdout: str) -> str:
    """The answer text: what `ask` prints before the blank line and the timing table."""
    return stdout.split("\n\nstage")[0]


@pytest.mark.slow
def test_encode_then_ask_the_memory_answers_like_the_video(tmp_path, capsys):
    model = str(model_dir())
    assert main(["ask", str(sample_video()), "What happens?", "--model", model, *OPTIONS]) == 0
    direct = capsys.readouterr().out
    assert "wall" in direct and "decode" in direct and "prefill" in direct and "KV cache" in direct

    memory = tmp_path / "memory"
    encode_options = OPTIONS[:-2]  # no answer length for encode
    assert main(["encode", str(sample_video()), "--model", model, "--out", str(memory), *encode_options]) == 0
    encoded = capsys.readouterr().out
    assert "20 frames at 112x112 in 3 groups of 8" in encoded and str(memory) in encoded

    assert main(["ask", str(memory), "What happens?", "--model", model, *OPTIONS]) == 0
    from_memory = capsys.readouterr().out
    assert _answer(from_memory) == _answer(direct)
    assert "load" in from_memory and "decode" not in from_memory


def test_errors_exit_with_code_2_and_a_message(tmp_path, capsys):
    model = str(model_dir())
    assert main(["ask", str(tmp_path / "none.mp4"), "?", "--model", model]) == 2
    assert "no such video file" in capsys.readouterr().err
    code = main(
        ["encode", str(sample_video()), "--model", model, "--out", str(tmp_path / "m"), "--prune", "question_attention"]
    )
    assert code == 2
    assert "question_attention" in capsys.readouterr().err
    assert main(["ask", str(sample_video()), "?", "--model", str(tmp_path)]) == 2
    assert "neither a qv-jax checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_without_test_dependencies():
    """`qv-jax demo` as the README runs it, with torch and transformers made unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "from qv_jax.cli import main; sys.exit(main(['demo', '--max-new-tokens', '4']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "noise" in out.stdout and "RANDOM-WEIGHT" in out.stdout
    assert "40 frames at 644x364, 3 groups of 16 frames" in out.stdout
    for stage in ("decode", "vision", "prefill", "answer", "wall"):
        assert stage in out.stdout
