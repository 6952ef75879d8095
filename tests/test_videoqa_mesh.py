"""VideoQA on a device mesh (4 forced CPU devices): the same answers as on one device, the memory split by KV head,
memories moved between layouts when the model's KV heads agree and refused when they do not.

The device count is fixed when JAX starts, so the work runs once in a subprocess that executes this file as a
script (``python tests/test_videoqa_mesh.py WORKDIR``) and writes its results for the tests to check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

QUESTION = "What happens in the video?"


def worker(workdir: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import numpy as np
    from pipeline_helpers import VIDEO_OPTIONS, model_dir, sample_video

    import qv_jax
    from qv_jax.errors import MemoryMismatchError

    options = dict(group_frames=8, retention=0.5, **VIDEO_OPTIONS)
    out = {}
    single = qv_jax.VideoQA.from_pretrained(model_dir(), **options)
    single_memory = single.encode(sample_video())
    out["single"] = single.ask(single_memory, QUESTION, max_new_tokens=6).token_ids.tolist()
    many = [QUESTION, "Why?"]
    out["single_many"] = [a.token_ids.tolist() for a in single.ask_many(single_memory, many, max_new_tokens=6)]
    for model_axis in (2, 4):  # the tiny model has 2 KV heads: split on 2, replicated twice on 4
        key = f"model{model_axis}"
        qa = qv_jax.VideoQA.from_pretrained(model_dir(), mesh=qv_jax.make_mesh(model=model_axis), **options)
        memory = qa.encode(sample_video())
        out[f"{key}_direct"] = qa.ask(sample_video(), QUESTION, max_new_tokens=6).token_ids.tolist()
        out[f"{key}_memory"] = qa.ask(memory, QUESTION, max_new_tokens=6).token_ids.tolist()
        out[f"{key}_many"] = [a.token_ids.tolist() for a in qa.ask_many(memory, many, max_new_tokens=6)]
        out[f"{key}_spec"] = str(memory.cache.k[0].sharding.spec)
        out[f"{key}_kv_heads"] = int(memory.cache.k[0].shape[1])
        out[f"{key}_devices"] = len(memory.cache.k[0].sharding.device_set)
        saved = memory.save(workdir / key)
        out[f"{key}_saved"] = qa.ask(saved, QUESTION, max_new_tokens=6).token_ids.tolist()
        out[f"{key}_same_held_tokens"] = bool(
            np.array_equal(np.asarray(memory.cache.token_index), np.asarray(single_memory.cache.token_index))
        )
        try:
            out[f"{key}_single_memory"] = qa.ask(single_memory, QUESTION, max_new_tokens=6).token_ids.tolist()
        except MemoryMismatchError as e:
            out[f"{key}_single_memory"] = f"MemoryMismatchError: {e}"
    (workdir / "results.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("videoqa-mesh")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, __file__, str(workdir)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("model_axis", [2, 4])
def test_sharded_videoqa_answers_like_one_device(mesh_run, model_axis):
    key = f"model{model_axis}"
    for variant in ("direct", "memory", "saved"):
        assert mesh_run[f"{key}_{variant}"] == mesh_run["single"], variant
    # one selection per layer over all KV heads: replicating heads keeps the same tokens
    assert mesh_run[f"{key}_same_held_tokens"]
    # many questions in one packed pass: on the mesh as on one device, the first one as ask answers it
    assert mesh_run[f"{key}_many"] == mesh_run["single_many"] and mesh_run["single_many"][0] == mesh_run["single"]
    assert "model" in mesh_run[f"{key}_spec"] and mesh_run[f"{key}_devices"] == 4
    assert mesh_run[f"{key}_kv_heads"] == max(2, model_axis)


@pytest.mark.slow
def test_memories_cross_layouts_only_with_the_same_kv_heads(mesh_run):
    assert mesh_run["model2_single_memory"] == mesh_run["single"]
    assert mesh_run["model4_single_memory"].startswith("MemoryMismatchError")
    assert "num_kv_heads" in mesh_run["model4_single_memory"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
