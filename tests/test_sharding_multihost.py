"""Multi-host: two local processes joined by ``jax.distributed.initialize`` (coordinator on 127.0.0.1), two CPU
devices each, run one model on a ``data=2 x model=2`` mesh — rows split across the processes, heads within each —
and answer exactly as one process on one device does.

Each process executes this file as a script (``python tests/test_sharding_multihost.py WORKDIR PORT RANK``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from process_helpers import free_port, run_ranks

from qv_jax.model.config import ModelConfig
from qv_jax.testing import tiny_config

PROCESSES = 2
DEVICES_PER_PROCESS = 2


def _inputs(config: ModelConfig) -> dict:
    """Two rows (one per process on the data axis), the first with a 2x4x4-patch video, the second left-padded."""
    rng = np.random.default_rng(7)
    block = [config.vision_start_token_id, *[config.video_token_id] * 8, config.vision_end_token_id]
    first = [11, 12, *block, 13, 14, 15]
    second = [0] * 6 + list(rng.integers(0, 400, len(first) - 6))
    return {
        "input_ids": np.array([first, second]),
        "attention_mask": np.array([[1] * len(first), [0] * 6 + [1] * (len(first) - 6)]),
        "pixel_values_videos": rng.standard_normal((32, config.vision.patch_dim)).astype(np.float32),
        "video_grid_thw": np.array([[2, 4, 4]]),
    }


GENERATE = {"max_new_tokens": 8, "eos_token_id": []}


def _process(workdir: Path, port: int, rank: int) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=PROCESSES, process_id=rank)
    import qv_jax

    mesh = qv_jax.make_mesh(data=PROCESSES, model=DEVICES_PER_PROCESS)
    model = qv_jax.load_model(workdir / "ckpt", mesh=mesh)
    inputs = _inputs(model.config)
    np.savez(
        workdir / f"rank{rank}.npz",
        logits=model.forward(**inputs),
        tokens=model.generate(**inputs, **GENERATE),
        processes=jax.process_count(),
        devices=jax.device_count(),
        local_rows=np.array([s.index[0].start or 0 for s in model.new_cache(2, 128).k[0].addressable_shards]),
    )
    jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_answer_like_one(tmp_path):
    from qv_jax.runtime import VisionLanguageModel

    config = tiny_config()
    single = VisionLanguageModel.random(config, seed=5)
    single.save(tmp_path / "ckpt")
    inputs = _inputs(config)
    ref_logits = single.forward(**inputs)
    ref_tokens = single.generate(**inputs, **GENERATE)

    port = free_port()
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        JAX_PLATFORMS="cpu",
    )
    run_ranks(
        lambda rank: [sys.executable, __file__, str(tmp_path), str(port), str(rank)], PROCESSES, tmp_path, env=env
    )

    mask = inputs["attention_mask"].astype(bool)
    for rank in range(PROCESSES):
        with np.load(tmp_path / f"rank{rank}.npz") as got:
            assert int(got["processes"]) == PROCESSES and int(got["devices"]) == PROCESSES * DEVICES_PER_PROCESS
            # each process holds the cache rows of its own data shard
            assert set(got["local_rows"]) == {rank}
            np.testing.assert_allclose(got["logits"][mask], ref_logits[mask], atol=1e-5, rtol=1e-5)
            np.testing.assert_array_equal(got["tokens"], ref_tokens)


if __name__ == "__main__":
    _process(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
