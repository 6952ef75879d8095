"""Every benchmark script runs end to end at a tiny size and writes its JSON record, with the correctness columns
it reports (exact frames, same tokens as the baseline) holding. Timings are only recorded, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qv_jax.testing.videos import make_sample_video

ROOT = Path(__file__).resolve().parents[1]


def _check_attention(record: dict) -> None:
    """Streaming heads skip tiles once the sequence is longer than what they see (sink + local); every call kind
    is timed on each backend asked for, and gets its fastest."""
    assert record["visited"] and record["timings"]
    assert {row["call"] for row in record["calls"]} == {"self", "self_segments", "memory", "decode"}
    assert all(row["chunked_ms"] > 0 and row["jax-interpret_ms"] > 0 for row in record["calls"])
    assert [row["call"] for row in record["fastest_per_call"]] == ["self", "self_segments", "memory", "decode"]
    window = record["config"]["sink"] + record["config"]["local"]
    assert [row["streaming_heads"] for row in record["chunked"]] == ["0/2", "1/2"]
    for row in record["visited"]:
        streams = not row["streaming_heads"].startswith("0/")
        assert (row["work_fraction"] < 1.0) == (streams and row["tokens"] > window), row


def _check_decode(record: dict) -> None:
    ours = [row for row in record["rows"] if row["method"] == "QuickDecoder"]
    assert ours and all(row["exact"] == "yes" for row in ours)


def _check_e2e(record: dict) -> None:
    assert record["frames"] == 8 and record["speedup"] > 0
    assert record["quick"]["kv_bytes"] < record["baseline"]["kv_bytes"]  # retention 0.5


def _check_identify(record: dict) -> None:
    assert [row["tokens"] for row in record["rows"]] == [128]
    assert all(row["step_ms"] > 0 and row["temp_mib_remat"] > 0 for row in record["rows"])
    assert [row["pattern"] for row in record["methods"]] == ["optimize", "on-the-fly", "random"]
    assert len({row["streaming"] for row in record["methods"]}) == 1
    estimate = record["estimate_7b"]["rows"]
    assert [row["accelerator"].split()[0] for row in estimate] == ["H100", "TPU"]
    assert all(0 < row["hours_at_50%"] < row["hours_at_30%"] for row in estimate)


def _check_longgen(record: dict) -> None:
    assert [(row["tokens"], row["model"]) for row in record["rows"]] == [(256, "dense"), (256, "hybrid")]
    hybrid = record["rows"][1]
    assert hybrid["prefill_ratio"] > 0 and hybrid["train_step_ratio"] > 0
    assert sorted(record["layers"]) == ["full", "streaming"]
    kv = [(row["geometry"], row["tokens"]) for row in record["kv"]]
    assert kv == [(geometry, n) for geometry in ("tiny", "7b") for n in (32768, 131072)]
    assert all(0.5 < row["saving"] < 0.75 for row in record["kv"] if row["geometry"] == "7b")


def _check_model(record: dict) -> None:
    assert record["same_greedy_tokens"] is True
    assert {row["stage"] for row in record["rows"]} >= {"vision", "prefill", "decode"}


def _check_packing(record: dict) -> None:
    assert record["same_first_tokens"] is True and record["same_answers"] == 2 * record["args"]["questions"]
    assert [row["prefill"] for row in record["prefill"]] == ["padded", "packed"]
    questions = record["questions"]
    assert [(row["frames"], row["new_tokens"]) for row in questions] == [(4, 2), (4, 2), (8, 3), (8, 3)]
    assert questions[1]["kv_mib"] < questions[0]["kv_mib"]  # the memory counted once
    assert questions[0]["memory_tokens"] < questions[2]["memory_tokens"] and len(record["ask_many_speedup"]) == 2


def _check_sharding(record: dict) -> None:
    meshed = [row for row in record["meshes"] if row["mesh"] != "1 device"]
    assert meshed and all(row["same_tokens"] is True for row in meshed)


def _check_sparse_decode(record: dict) -> None:
    assert [row["variant"] for row in record["rows"]] == ["dense", "streaming", "streaming+select"]


def _check_streaming(record: dict) -> None:
    stream, quick = record["rows"]
    assert record["patches"] == 12 and len(set(record["stream_kv_bytes"][4:])) == 1  # flat once the bank is full
    assert quick["KV MiB end"] > stream["KV MiB end"] and 0 <= record["fidelity"]["top1_agree"] <= 1


CASES = {
    "attention": (
        [
            "--cpu-lengths",
            "256",
            "--lengths",
            "1024",
            "--repeats",
            "1",
            "--chunked-lengths",
            "512",
            "--call-backends",
            "chunked",
            "jax-interpret",
            "--call-lengths",
            "256",
            "--call-chunk",
            "128",
        ],
        _check_attention,
    ),
    "decode": (["--workers", "2", "--repeats", "1"], _check_decode),
    "e2e": (["--max-frames", "8", "--group-frames", "4", "--max-new-tokens", "2", "--repeats", "1"], _check_e2e),
    "identify": (
        "--preset tiny --lengths 128 --sink 4 --recent 12 --steps 2 --repeats 1".split(),
        _check_identify,
    ),
    "longgen": ("--preset tiny --lengths 256 --local 64 --repeats 1".split(), _check_longgen),
    "model": (["--size", "small", "--prompt-len", "32", "--new-tokens", "2", "--repeats", "1"], _check_model),
    "packing": (
        "--preset tiny --prompts 8 --max-len 100 --questions 3 --memories 4x2 8x3 --repeats 1".split(),
        _check_packing,
    ),
    "sharding": (
        "--size small --batch 2 --prompt-len 32 --new-tokens 2 --capacity 64 --video-grid 8 4 4 --repeats 1".split(),
        _check_sharding,
    ),
    "sparse_decode": (["--contexts", "512", "--layers", "2", "--steps", "2", "--repeats", "1"], _check_sparse_decode),
    "streaming": (
        ["--preset", "tiny", "--seconds", "24", "--side", "56", "--carriers", "4", "--group-frames", "4"],
        _check_streaming,
    ),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, list[str]]:
    """Short clips for the video benchmarks (their defaults generate minutes of 720p / 1080p)."""
    root = tmp_path_factory.mktemp("bench-videos")
    clip = str(make_sample_video(root / "clip.mp4", seconds=4, size=(180, 320), gop=12))
    long = str(make_sample_video(root / "long.mp4", seconds=12, size=(180, 320), gop=24))
    return {"decode": ["--video", clip, "--sparse-video", long], "e2e": ["--video", long], "packing": ["--video", long]}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_writes_its_record(name, videos, tmp_path):
    args, check = CASES[name]
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", f"benchmarks.{name}", *args, *videos.get(name, []), "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {out}" in proc.stdout
    record = json.loads(out.read_text())
    assert record["benchmark"] == name and record["machine"]["cpu_count"]
    check(record)


def test_report_renders_each_record_and_names_the_device(tmp_path):
    """``benchmarks/accelerator.sh`` ends with this page: the device, one table per list of rows, the scalars, and
    the records a failed step did not produce."""
    from benchmarks.report import main

    record = {
        "benchmark": "sparse_decode",
        "time": "2026-12-04T12:00:00+0000",
        "machine": {"devices": ["cuda:0 NVIDIA H200"], "jax": "0.11.2", "python": "3.12.3", "cpu_count": 16},
        "rows": [{"context": 65536, "variant": "dense", "step_ms": 1.25}, {"context": 65536, "variant": "streaming"}],
        "backend": "pallas",
        "config": {"nested": True},
    }
    (tmp_path / "sparse_decode.json").write_text(json.dumps(record))
    out = tmp_path / "accelerator.md"
    main([str(out), str(tmp_path / "sparse_decode.json"), str(tmp_path / "e2e.json")])
    text = out.read_text()
    assert "Device: cuda:0 NVIDIA H200; jax 0.11.2" in text
    assert "| context | variant | step_ms |" in text and "| 65536 | dense | 1.25 |" in text
    assert "| 65536 | streaming |  |" in text and "- backend: pallas" in text and "nested" not in text
    assert "## Missing" in text and "`e2e.json`: not produced" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
