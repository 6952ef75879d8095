"""``qv-jax ask`` / ``encode`` / ``demo``: a saved memory answers like the video, errors are reported, and the
demo runs with the runtime dependencies alone."""

import os
import subprocess
import sys

import pytest
from pipeline_helpers import SIDE, model_dir, sample_video

from qv_jax.cli import main

VIDEO = ["--fps", "4", "--min-pixels", str(SIDE * SIDE), "--max-pixels", str(SIDE * SIDE), "--group-frames", "8"]
VIDEO += ["--workers", "2"]
ANSWER = ["--max-new-tokens", "6"]
OPTIONS = VIDEO + ANSWER


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
    assert main(["encode", str(sample_video()), "--model", model, "--out", str(memory), *VIDEO]) == 0
    encoded = capsys.readouterr().out
    assert "20 frames at 112x112 in 3 groups of 8" in encoded and str(memory) in encoded

    assert main(["ask", str(memory), "What happens?", "--model", model, *ANSWER]) == 0
    from_memory = capsys.readouterr().out
    assert _answer(from_memory) == _answer(direct)
    assert "load" in from_memory and "decode" not in from_memory
    # the jnp oracle answers like the default (chunked on CPU)
    assert main(["ask", str(memory), "What happens?", "--model", model, *ANSWER, "--attention", "reference"]) == 0
    assert _answer(capsys.readouterr().out) == _answer(direct)


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
def test_demo_runs_without_test_dependencies(tmp_path):
    """`qv-jax demo` as the README runs it, with torch and transformers made unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "from qv_jax.cli import main; sys.exit(main(['demo', '--max-new-tokens', '4']))"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # the sample video is kept there
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert "noise" in out.stdout and "RANDOM-WEIGHT" in out.stdout
    assert "40 frames at 644x364, 3 groups of 16 frames" in out.stdout
    for stage in ("decode", "vision", "prefill", "answer", "wall"):
        assert stage in out.stdout


SPARSE = {"sink": 4, "local": 8, "token_budget": 16, "page_size": 8, "logical_page_size": 4}
SPARSE_OPTIONS = [f"--{name.replace('_', '-')}={value}" for name, value in SPARSE.items()]


def _kv_mib(stdout: str) -> float:
    return float(stdout.split("KV cache at the end: ")[1].split(" MiB")[0])


@pytest.mark.slow
def test_sparse_decoding_and_mesh_options_answer_like_the_python_api(tmp_path, capsys):
    """`--duo-attention` / `--token-budget` / ... build the SparsityConfig the Python API takes, `--mesh` the
    mesh; a memory encoded with a pattern answers only with the same pattern."""
    from pipeline_helpers import VIDEO_OPTIONS

    import qv_jax
    from qv_jax.attention import SparsityConfig

    pattern = tmp_path / "full_attention_heads.tsv"
    pattern.write_text("0.9\t0.1\n0.2\t0.8\n")  # 2 layers x 2 KV heads: layer 0 head 1 and layer 1 head 0 stream
    config = SparsityConfig.from_duo_attention(pattern, sparsity=0.5, **SPARSE)
    qa = qv_jax.VideoQA.from_pretrained(model_dir(), group_frames=8, sparsity=config, **VIDEO_OPTIONS)
    expected = qa.ask(sample_video(), "What happens?", max_new_tokens=6)

    model = str(model_dir())
    heads = ["--duo-attention", str(tmp_path), "--streaming-fraction", "0.5", "--mesh", "1x1"]
    sparse = [*heads, *SPARSE_OPTIONS]  # encode takes only what fixes the head order
    assert main(["ask", str(sample_video()), "What happens?", "--model", model, *OPTIONS, *sparse]) == 0
    out = capsys.readouterr().out
    assert _answer(out) == expected.text and _kv_mib(out) == pytest.approx(expected.kv_bytes / 2**20, abs=0.01)

    memory = tmp_path / "memory"
    assert main(["encode", str(sample_video()), "--model", model, "--out", str(memory), *VIDEO, *heads]) == 0
    capsys.readouterr()
    assert main(["ask", str(memory), "What happens?", "--model", model, *ANSWER, *sparse]) == 0
    assert _answer(capsys.readouterr().out) == expected.text
    assert main(["ask", str(memory), "What happens?", "--model", model, *ANSWER]) == 2
    assert "heads in another order" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--streaming-fraction", "0.5"], "give the pattern too"),
        (["--sink", "4", "--page-size", "8"], "--sink, --page-size configure sparse decoding"),
        (["--token-budget", "-1"], "--token-budget must be >= 0"),
        (["--duo-attention", "missing-dir"], "no DuoAttention pattern file"),
        (["--mesh", "1x2"], "--mesh 1x2 needs 2 devices, 1 visible"),
        (["--attention", "pallas"], "need a TPU or GPU"),
        (["--attention", "jax"], "need a TPU or GPU"),
        (["--attention", "cudnn"], "needs a GPU"),
    ],
)
def test_bad_sparse_or_mesh_options_exit_with_code_2(options, message, capsys):
    assert main(["ask", str(sample_video()), "?", "--model", str(model_dir()), *options]) == 2
    assert message in capsys.readouterr().err


def test_mesh_option_is_parsed_as_data_by_model(capsys):
    with pytest.raises(SystemExit):
        main(["ask", "v.mp4", "?", "--model", "m", "--mesh", "8"])
    assert "expected DATAxMODEL" in capsys.readouterr().err


def test_sparse_option_help_states_the_sparsity_config_defaults(capsys):
    from qv_jax.attention import SparsityConfig

    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = SparsityConfig()
    for name in SPARSE:
        assert f"--{name.replace('_', '-')} " in help_text
        assert f"(default {getattr(defaults, name)}" in help_text, name
