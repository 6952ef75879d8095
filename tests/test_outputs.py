"""Outputs are written whole or not at all, never over an input or a directory qv-jax did not write; damaged
inputs and interrupted runs end with exit code 2 or 130 and one message line."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from pipeline_helpers import VIDEO_OPTIONS, model_dir, sample_video, tiny_model

import qv_jax
import qv_jax.converters.safetensors_io
from qv_jax.cli import main
from qv_jax.converters.qwen2_5_vl import convert
from qv_jax.errors import CheckpointError, OutputError
from qv_jax.marker import PARTIAL, atomic_output, check_output, read_marker, write_marker
from qv_jax.testing import make_sample_video, write_hf_dir


def _mark(directory, name="qv_jax.json"):
    directory.mkdir(parents=True, exist_ok=True)
    write_marker(directory, name, {"format": "qv-jax-test", "version": 1})
    return directory


def _tree(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_an_output_is_refused_before_any_work_when_it_is_an_input_foreign_or_the_wrong_kind(tmp_path):
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    with pytest.raises(OutputError, match="the input itself"):
        check_output(source, overwrite=True, inputs=[source])
    with pytest.raises(OutputError, match="a folder holding the input"):
        check_output(tmp_path, overwrite=True, inputs=[source / "sub"])
    (source / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        check_output(source, overwrite=False)
    with pytest.raises(OutputError, match="not a directory qv-jax wrote"):
        check_output(source, overwrite=True)
    with pytest.raises(OutputError, match="is a file"):
        check_output(source / "notes.txt", overwrite=True)
    with pytest.raises(OutputError, match=r"parent .* is a file"):
        check_output(source / "notes.txt" / "out", overwrite=True)
    with pytest.raises(OutputError, match="is a directory"):
        check_output(source, overwrite=True, directory=False)
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
    assert check_output(_mark(tmp_path / "ours"), overwrite=True) == tmp_path / "ours"


def test_a_failed_save_leaves_the_previous_output_and_a_finished_one_replaces_it(tmp_path):
    out = _mark(tmp_path / "out")
    (out / "old").write_text("old")
    before = _tree(out)
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_output(out, overwrite=True) as partial:
        (partial / "new").write_text("half")
        raise RuntimeError("disk on fire")
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_output(out, overwrite=True) as partial:
        assert partial.parent == tmp_path and partial.name.startswith(f".out{PARTIAL}")
        _mark(partial)
        (partial / "new").write_text("whole")
    assert sorted(_tree(out)) == ["new", "qv_jax.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_output(tmp_path / "frames.npy", overwrite=False, directory=False) as partial:
        partial.write_bytes(b"x")
    assert (tmp_path / "frames.npy").read_bytes() == b"x"


def test_partial_saves_of_dead_processes_are_removed_by_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out{PARTIAL}{int(dead.stdout)}-abc"
    live = tmp_path / f".out{PARTIAL}{os.getpid()}-def"  # ours, and we are alive
    for directory in (stale, live):
        (directory / "params").mkdir(parents=True)
    with atomic_output(tmp_path / "out", overwrite=False) as partial:
        _mark(partial)
    assert not stale.exists() and live.exists()


def test_markers_are_checked_before_anything_is_read(tmp_path):
    read = dict(format="fmt", version=2, what="a saved thing")
    with pytest.raises(CheckpointError, match="not a saved thing"):
        read_marker(tmp_path, "m.json", **read)
    with pytest.raises(CheckpointError, match=r"not a saved thing \(a file"):
        read_marker(_mark(tmp_path / "d") / "qv_jax.json", "m.json", **read)
    write_marker(tmp_path, "m.json", {"format": "fmt", "version": 2, "x": 1})
    assert read_marker(tmp_path, "m.json", **read)["x"] == 1
    write_marker(tmp_path, "m.json", {"format": "fmt", "version": 3})
    with pytest.raises(CheckpointError, match="version 3; this qv-jax reads 'fmt' version 2"):
        read_marker(tmp_path, "m.json", **read)
    (tmp_path / "m.json").write_bytes(b"\xff{")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_marker(tmp_path, "m.json", **read)


def _die_in_child(body: str, tmp_path) -> None:
    """Run ``body`` in a fresh interpreter that SIGKILLs itself where the body says ``die()``."""
    code = "import os, signal\ndef die(*_, **__):\n    os.kill(os.getpid(), signal.SIGKILL)\n" + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == -signal.SIGKILL, out.stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    hf = write_hf_dir(root / "hf")
    assert main(["convert", str(hf), str(root / "ck"), "--dtype", "float32", "--quiet"]) == 0
    return hf, root / "ck"


def _params(directory) -> list[np.ndarray]:
    import jax

    return [np.asarray(a) for a in jax.tree.leaves(qv_jax.load_model(directory).state)]


@pytest.mark.slow
def test_convert_killed_while_replacing_a_checkpoint_leaves_the_old_one_loadable(converted, tmp_path):
    hf, ck = converted
    before = _params(ck)
    # once while converting tensors, once with the new checkpoint written but not yet marked complete
    for where in ("progress=die", "progress=None"):
        patch = "" if where == "progress=die" else "import qv_jax.model.checkpoint as c; c.write_marker = die\n"
        _die_in_child(
            f"{patch}from qv_jax.converters.qwen2_5_vl import convert\n"
            f"convert({str(hf)!r}, {str(ck)!r}, 'float32', overwrite=True, {where})\n",
            tmp_path,
        )
        for a, b in zip(_params(ck), before, strict=True):
            np.testing.assert_array_equal(a, b)
    # the next save clears what the killed ones left beside it
    assert main(["convert", str(hf), str(ck), "--dtype", "float32", "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in ck.parent.iterdir()) == ["ck", "hf"]


def test_convert_refuses_its_input_foreign_directories_and_files_before_converting(converted, tmp_path, capsys):
    hf, ck = converted
    source = _tree(hf)
    assert main(["convert", str(hf), str(hf), "--overwrite"]) == 2
    assert "the input itself" in _one_line(capsys.readouterr().err) and _tree(hf) == source
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    assert main(["convert", str(hf), str(foreign), "--overwrite"]) == 2
    assert "not a directory qv-jax wrote" in _one_line(capsys.readouterr().err)
    assert _tree(foreign) == {"cat.jpg": b"meow"}
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(hf), str(tmp_path / "file")]) == 2
    assert "exists and is a file" in _one_line(capsys.readouterr().err)
    # an existing output without --overwrite: refused before a single tensor is read
    converted_names = []
    with pytest.raises(OutputError, match="--overwrite"):
        convert(hf, ck, progress=converted_names.append)
    assert converted_names == []


def test_convert_quiet_counts_its_tensors(converted, tmp_path, capsys):
    hf, _ = converted
    assert main(["convert", str(hf), str(tmp_path / "ck"), "--quiet"]) == 0
    assert f"{len(qv_jax.converters.safetensors_io.open_checkpoint(hf))} tensors" in capsys.readouterr().out


def test_garbage_safetensors_give_a_typed_error(tmp_path, capsys):
    hf = write_hf_dir(tmp_path / "hf")
    (hf / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    assert main(["convert", str(hf), str(tmp_path / "ck")]) == 2
    assert "not a safetensors file" in _one_line(capsys.readouterr().err)
    (hf / "model.safetensors").write_bytes(len(b"[1]").to_bytes(8, "little") + b"[1]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        qv_jax.converters.safetensors_io.SafetensorsFile(hf / "model.safetensors")
    (hf / "model.safetensors").write_bytes(len(b'{"w": 3}').to_bytes(8, "little") + b'{"w": 3}')
    with pytest.raises(CheckpointError, match="corrupt safetensors header entry 'w'"):
        qv_jax.converters.safetensors_io.SafetensorsFile(hf / "model.safetensors")


@pytest.fixture(scope="module")
def saved_memory(tmp_path_factory):
    qa = qv_jax.VideoQA(tiny_model(), group_frames=8, **VIDEO_OPTIONS)
    return qa.encode(sample_video()).save(tmp_path_factory.mktemp("memory") / "mem")


@pytest.mark.slow
def test_a_save_killed_while_replacing_a_memory_leaves_the_old_one_loadable(saved_memory, tmp_path):
    import shutil

    target = tmp_path / "mem"
    shutil.copytree(saved_memory, target)
    before = _tree(target)
    _die_in_child(
        f"""
        import qv_jax.memory as m
        memory = m.VideoMemory.load({str(saved_memory)!r})
        m.write_marker = die
        memory.save({str(target)!r}, overwrite=True)
        """,
        tmp_path,
    )
    assert _tree(target) == before
    assert qv_jax.VideoMemory.load(target).kv_bytes == qv_jax.VideoMemory.load(saved_memory).kv_bytes


def test_a_damaged_memory_gives_exit_2_and_one_line(saved_memory, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "mem"
    shutil.copytree(saved_memory, damaged)
    data = max((p for p in (damaged / "kv").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.unlink()
    with pytest.raises(CheckpointError, match="cannot restore the memory's arrays"):
        qv_jax.VideoMemory.load(damaged)
    assert main(["ask", str(damaged), "?", "--model", str(model_dir()), "--max-new-tokens", "2"]) == 2
    assert "damaged or incomplete" in _one_line(capsys.readouterr().err)
    shutil.rmtree(damaged / "kv")
    with pytest.raises(CheckpointError, match="kv/ is missing"):
        qv_jax.VideoMemory.load(damaged)


def test_an_edited_memory_gives_one_line_and_no_noise_at_exit(saved_memory, tmp_path):
    import json
    import shutil

    edited = tmp_path / "mem"
    shutil.copytree(saved_memory, edited)
    meta = json.loads((edited / "qv_jax_memory.json").read_text())
    meta["capacity"] += 1
    (edited / "qv_jax_memory.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match their description"):
        qv_jax.VideoMemory.load(edited)
    data = max((p for p in (saved_memory / "kv").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    damaged = tmp_path / "damaged"
    shutil.copytree(saved_memory, damaged)
    (damaged / data.relative_to(saved_memory)).unlink()
    for memory, cause in ((edited, "do not match their description"), (damaged, "damaged or incomplete")):
        out = subprocess.run(
            [sys.executable, "-m", "qv_jax", "ask", str(memory), "?", "--model", str(model_dir())],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 2 and cause in _one_line(out.stderr)


def test_encode_refuses_its_output_before_loading_the_model(tmp_path, capsys):
    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    missing_model = str(tmp_path / "no-model")  # never opened: the output is refused first
    video = str(sample_video())
    assert main(["encode", video, "--model", missing_model, "--out", str(foreign)]) == 2
    assert "--overwrite" in _one_line(capsys.readouterr().err)
    assert main(["encode", video, "--model", missing_model, "--out", str(foreign), "--overwrite"]) == 2
    assert "not a directory qv-jax wrote" in _one_line(capsys.readouterr().err)
    assert main(["encode", video, "--model", str(model_dir()), "--out", str(model_dir()), "--overwrite"]) == 2
    assert "the input itself" in _one_line(capsys.readouterr().err)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_video_options_are_refused_with_a_saved_memory(saved_memory, capsys):
    args = ["ask", str(saved_memory), "?", "--model", str(model_dir()), "--fps", "1", "--retention", "0.2"]
    assert main(args) == 2
    assert "--fps, --retention act when a video is encoded" in _one_line(capsys.readouterr().err)


def test_decode_out_is_refused_when_it_exists_and_replaced_with_overwrite(tmp_path, capsys):
    out = tmp_path / "frames.npy"
    out.write_bytes(b"precious")
    video = str(sample_video())
    assert main(["decode", video, "--num-frames", "4", "--out", str(out)]) == 2
    assert "--overwrite" in _one_line(capsys.readouterr().err) and out.read_bytes() == b"precious"
    assert main(["decode", video, "--num-frames", "4", "--out", str(out), "--overwrite", "--workers", "1"]) == 0
    assert np.load(out).shape[0] == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["frames.npy"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stopped_decode_exits_130_and_leaves_no_output(signum, tmp_path):
    video = make_sample_video(tmp_path / "long.mp4", seconds=60, fps=24, size=(240, 320), gop=48)
    out = tmp_path / "frames.npy"
    child = subprocess.Popen(
        [sys.executable, "-m", "qv_jax", "decode", str(video), "--fps", "24", "--workers", "1", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    # wait until decoding has started (the summary line is printed before the first frame)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".frames.npy{PARTIAL}*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]
