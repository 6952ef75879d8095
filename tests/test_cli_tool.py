"""The command line as a tool: help that lists only the options acting in each subcommand with their defaults,
``--version``, ``--json`` objects that parse and hold what scripts need, ``qv-jax info``, ``demo --save-model``,
the cached sample video, and progress lines checked on a pseudo-terminal."""

import argparse
import json
import os
import pty
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from pipeline_helpers import SIDE, model_dir, sample_video, tiny_model

import qv_jax
from qv_jax.cli import build_parser, main

VIDEO = ["--fps", "4", "--min-pixels", str(SIDE * SIDE), "--max-pixels", str(SIDE * SIDE), "--group-frames", "8"]
VIDEO += ["--workers", "2"]

PLACEMENT = {"--dtype", "--mesh", "--attention", "--attention-kernel", "--duo-attention", "--streaming-fraction"}
ANSWER_SPARSE = {"--token-budget", "--sink", "--local", "--page-size", "--logical-page-size"}
SAMPLING = {"--fps", "--max-frames", "--max-pixels", "--min-pixels", "--group-frames", "--retention", "--prune"}
SAMPLING |= {"--layer-decay", "--workers", "--seed"}
GENERATION = {"--max-new-tokens", "--sample", "--temperature", "--top-k", "--top-p"}
OUTPUT = {"--json", "--quiet"}
# What acts in each subcommand, and nothing more.
OPTIONS = {
    "ask": {"--model", "--question", "--questions"} | PLACEMENT | ANSWER_SPARSE | SAMPLING | GENERATION | OUTPUT,
    "encode": {"--model", "--out", "--overwrite"} | PLACEMENT | SAMPLING | OUTPUT,
    "demo": {"--question", "--model", "--save-model", "--overwrite"}
    | PLACEMENT
    | ANSWER_SPARSE
    | SAMPLING
    | GENERATION
    | OUTPUT,
    "decode": {"--fps", "--num-frames", "--size", "--max-pixels", "--workers", "--group-size", "--out"}
    | {"--overwrite", "--info"}
    | OUTPUT,
    "convert": {"--dtype", "--overwrite"} | OUTPUT,
    "identify-heads": {"--model", "--out", "--method", "--steps", "--lr", "--reg", "--sink", "--recent", "--min-length"}
    | {"--max-length", "--data", "--seed", "--checkpoint-every", "--resume", "--overwrite", "--dtype", "--mesh"}
    | OUTPUT,
    "finetune": {"--model", "--data", "--out", "--seq-len", "--batch-tokens", "--steps", "--lr", "--warmup"}
    | {"--weight-decay", "--clip", "--separator", "--seed", "--checkpoint-every", "--resume", "--dtype", "--mesh"}
    | {"--sparsity", "--full-layers", "--sparse", "--sink", "--local"}
    | OUTPUT,
    "info": {"--model", "--mesh", "--dtype", "--json"},
    "doctor": {"--clean"},
    "watch": {"--model", "--dtype", "--question", "--ask-every", "--interactive", "--carriers", "--keep-visual"}
    | {"--fps", "--realtime", "--max-pixels", "--format", "--stall-timeout", "--max-new-tokens", "--json"},
}


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_each_subcommands_help_lists_only_the_options_that_act_in_it_each_with_its_default(capsys):
    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(OPTIONS)
    for command, expected in OPTIONS.items():
        text = _help(command, capsys)
        listed = set(re.findall(r"^\s{2}(?:-[a-z](?: [A-Z_]+)?, )?(--[a-z-]+)", text, flags=re.M)) - {"--help"}
        assert listed == expected, f"qv-jax {command}: {sorted(listed ^ expected)}"
        for action in subparsers.choices[command]._actions:
            if not action.option_strings or action.help in (argparse.SUPPRESS, "show this help message and exit"):
                continue
            flag = isinstance(action, argparse._StoreTrueAction)
            assert action.help and (flag or action.required or "default" in action.help), (command, action.dest)
    assert "--temperature TEMPERATURE" in _help("ask", capsys)
    assert "(default 1)" in " ".join(_help("ask", capsys).split())


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"qv-jax {qv_jax.__version__}"


def _json(capsys) -> dict:
    captured = capsys.readouterr()
    assert "\x1b[" not in captured.err  # not a terminal: no progress lines
    (line,) = captured.out.splitlines()
    return json.loads(line)


@pytest.mark.slow
def test_json_of_encode_ask_decode_and_convert_parses_and_holds_the_run(tmp_path, capsys):
    from qv_jax.testing import write_hf_dir

    model, video, memory = str(model_dir()), str(sample_video()), tmp_path / "memory"
    assert main(["encode", video, "--model", model, "--out", str(memory), *VIDEO, "--json"]) == 0
    encoded = _json(capsys)
    assert encoded["command"] == "encode" and encoded["out"] == str(memory)
    assert encoded["video"]["frames"] == 20 and encoded["video"]["groups"] == 3
    assert (encoded["video"]["width"], encoded["video"]["height"]) == (SIDE, SIDE)
    assert len(encoded["video"]["frame_indices"]) == 20
    assert {"decode_s", "vision_s", "prefill_s", "wall_s"} <= set(encoded["timings"])
    assert encoded["kv_bytes"] > 0 and len(encoded["tokens_per_layer"]) == 2
    assert encoded["settings"]["video"]["group_frames"] == 8 and encoded["settings"]["attention"] == "auto"

    assert main(["ask", str(memory), "What happens?", "--model", model, "--max-new-tokens", "6", "--json"]) == 0
    asked = _json(capsys)
    assert asked["command"] == "ask" and asked["question"] == "What happens?"
    assert 1 <= len(asked["token_ids"]) <= 6
    tokenizer = tiny_model().tokenizer
    assert asked["answer"] == tokenizer.decode(np.asarray(asked["token_ids"]))
    assert {"load_s", "answer_s", "wall_s"} <= set(asked["timings"]) and asked["kv_bytes"] > encoded["kv_bytes"]
    assert asked["video"]["encoded_from"] == video and asked["video"]["frames"] == 20
    assert asked["settings"]["answer"]["max_new_tokens"] == 6 and asked["settings"]["video"]["retention"] == 0.5

    assert main(["decode", video, "--num-frames", "6", "--size", "32x48", "--workers", "2", "--json"]) == 0
    decoded = _json(capsys)
    assert (decoded["frames"], decoded["width"], decoded["height"]) == (6, 48, 32)
    assert decoded["source"]["frames"] == 40 and decoded["settings"]["workers"] == 2
    assert decoded["timings"]["wall_s"] > 0 and decoded["out"] is None

    hf = write_hf_dir(tmp_path / "hf")
    assert main(["convert", str(hf), str(tmp_path / "ck"), "--dtype", "float32", "--json"]) == 0
    converted = _json(capsys)
    assert converted["variant"] == "qwen2_5_vl" and converted["tensors"] > 0
    assert converted["out"] == str(tmp_path / "ck") and converted["settings"]["dtype"] == "float32"


def test_info_names_versions_devices_backends_and_the_models_size(capsys):
    import av
    import jax

    model = model_dir()
    assert main(["info", "--json", "--model", str(model), "--mesh", "1x1", "--dtype", "float32"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["qv-jax"] == qv_jax.__version__ and info["versions"]["jax"] == jax.__version__
    assert info["versions"]["PyAV"] == av.__version__ and "libavcodec" in info["versions"]["FFmpeg"]
    assert info["backend"] == jax.default_backend() and len(info["devices"]) == jax.device_count()
    assert info["attention"]["runs"]["chunked"] == "yes" and info["attention"]["runs"]["reference"] == "yes"
    assert info["decoder"]["workers"] >= 1 and info["decoder"]["frame_buffer_space"]
    parameters = sum(leaf.size for leaf in jax.tree.leaves(tiny_model().state))
    assert info["model"]["parameters"] == parameters
    assert info["model"]["bytes_per_device"] == info["model"]["bytes"] == 4 * parameters
    assert main(["info", "--model", str(model)]) == 0
    text = capsys.readouterr().out
    assert f"qv-jax {qv_jax.__version__}" in text and "1 device:" in text and f"({parameters:,})" in text
    assert main(["info", "--mesh", "1x1"]) == 2
    assert "give --model too" in capsys.readouterr().err


def test_demo_saves_its_random_model_as_a_loadable_directory(tmp_path, capsys):
    out = tmp_path / "demo-model"
    assert main(["demo", "--save-model", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    model = qv_jax.load_model(out)
    assert model.tokenizer is not None and model.config.text.num_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-model"]  # no partial sibling left
    assert main(["demo", "--save-model", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--save-model", str(out), "--overwrite"]) == 0


def test_the_sample_video_is_made_once_in_the_cache_directory(tmp_path, monkeypatch):
    from qv_jax.cli import decode
    from qv_jax.cli.decode import sample_video as cached_sample

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(decode.SAMPLE, "seconds", 2.0)  # the 20 s clip's encoding would dominate the test
    said = []
    first = cached_sample(said.append)
    assert first.parent == tmp_path / "qv-jax" and first.is_file()
    assert "made in" in said[-1] and str(first) in said[-1]
    stamp = first.stat().st_mtime_ns
    assert cached_sample(said.append) == first and first.stat().st_mtime_ns == stamp
    assert said[-1] == f"sample video: {first}"
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def _screen(raw: str) -> tuple[dict[int, list[tuple[int, str]]], int]:
    """Replay what the progress lines wrote: row -> [(redraw number, text written there)], and the redraws."""
    rows: dict[int, list[tuple[int, str]]] = {}
    row = redraw = 0
    for token in re.findall(r"\x1b\[\d*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\n":
            row += 1
        elif token.startswith("\x1b[") and token.endswith("A"):
            row -= int(token[2:-1] or 1)
            redraw += 1
        elif token not in ("\r",) and not token.startswith("\x1b["):
            rows.setdefault(row, []).append((redraw, token))
    return rows, redraw


@pytest.mark.slow
def test_progress_lines_on_a_terminal_close_stage_by_stage_and_say_compiling(tmp_path):
    """``ask`` on a pseudo-terminal (stderr) with ``--json`` (stdout a pipe): each stage's line is drawn with its
    full count once and then left alone while later stages go on; compiling steps say so; stdout parses."""
    import fcntl
    import termios

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "qv_jax", "ask", str(sample_video()), "What happens?", "--model"]
    command += [str(model_dir()), *VIDEO, "--max-new-tokens", "1", "--json"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=child_fd, env=env, cwd=tmp_path) as process:
        os.close(child_fd)
        chunks = []
        while True:
            try:
                data = os.read(main_fd, 1 << 16)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        out = process.stdout.read()
    os.close(main_fd)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    answer = json.loads(out)
    assert answer["command"] == "ask" and answer["video"]["groups"] == 3

    rows, _ = _screen(b"".join(chunks).decode())
    stages = {"decode": "20/20", "vision": "3/3", "prefill": "3/3", "answer": "1/1"}
    assert [rows[row][-1][1].split(":")[0].strip() for row in range(4)] == list(stages)
    last_redraw = []
    for row, (stage, full) in enumerate(stages.items()):
        writes = rows[row]
        final = [i for i, (_, text) in enumerate(writes) if full in text]
        # the full count is drawn once, as the row's last text: the line was closed when its stage ended
        assert final == [len(writes) - 1], (stage, writes[-3:])
        assert "compiling" not in writes[-1][1]
        last_redraw.append(writes[-1][0])
        if stage != "decode":
            assert any("compiling" in text for _, text in writes), stage
    # every stage's line stopped before the next stage's did: closed one by one, not all at the end
    assert last_redraw == sorted(last_redraw) and len(set(last_redraw)) == 4, last_redraw


def test_plurals_and_quiet_progress(capsys):
    from qv_jax.cli.progress import StageBars
    from qv_jax.cli.report import plural
    from qv_jax.pipeline.executor import StageEvent

    assert (plural(1, "group"), plural(3, "group"), plural(0, "frame")) == ("1 group", "3 groups", "0 frames")
    main_fd, child_fd = pty.openpty()
    with open(child_fd, "w") as terminal:
        for enabled in (False, True):
            with StageBars({"decode": 4}, group_frames=4, enabled=enabled, file=terminal) as bars:
                bars.started("decode", 0)
                bars(StageEvent("decode", 0, 0.0, 0.5))
            terminal.write("END\n")  # what comes before it is what the bars drew
            terminal.flush()
            drawn = b""
            while b"END" not in drawn:
                drawn += os.read(main_fd, 1 << 16)
            assert ("4/4" in drawn.decode()) == enabled, drawn
            assert drawn.startswith(b"END") != enabled, drawn
    os.close(main_fd)
