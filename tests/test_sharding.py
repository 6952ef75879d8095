"""Sharding on 8 forced CPU devices: a tiny model laid out on (data, model) meshes (1, 8), (2, 4) and (8, 1) gives the
single-device logits (float32, 1e-5) and greedy tokens; every parameter's per-device bytes are its size over the
mesh axes that split it; caches are split by KV head and row; checkpoints and HF directories load straight into
shards; the head rule's errors.

The device count is fixed when JAX starts, so the 8-device part runs once, in a subprocess that executes this file
as a script (``python tests/test_sharding.py WORKDIR``) and writes its results for the tests to check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import qv_jax
from qv_jax.errors import ShardingError
from qv_jax.model.config import ModelConfig
from qv_jax.sharding import ShardingPlan, kv_head_repeat, valid_model_axes
from qv_jax.testing import tiny_config

MESHES = ((1, 8), (2, 4), (8, 1))
TOL = 1e-5


def sharding_config() -> ModelConfig:
    """The tiny model with 8 query heads over 2 KV heads (so model=8 replicates each KV head 4 times) and a
    4-head vision tower (split on model=4, kept whole on model=8: the fallback for dimensions the axis does not
    divide)."""
    base = tiny_config()
    text = dataclasses.replace(base.text, hidden_size=128, num_heads=8, num_kv_heads=2)
    vision = dataclasses.replace(base.vision, num_heads=4, out_hidden_size=128)
    return dataclasses.replace(base, text=text, vision=vision)


def video_batch(config: ModelConfig, batch: int = 8):
    """``input_ids``, ``attention_mask`` and two videos of 2x4x4 patches, in rows 1 and 5; rows padded left or right."""
    rng = np.random.default_rng(0)
    grid = np.array([[2, 4, 4], [2, 4, 4]])
    block = [config.vision_start_token_id, *[config.video_token_id] * 8, config.vision_end_token_id]
    length = 24
    ids = np.full((batch, length), config.pad_token_id, np.int64)
    mask = np.zeros((batch, length), np.int64)
    for row in range(batch):
        body = list(rng.integers(0, 400, 3 + 2 * row % 9))
        if row in (1, 5):
            body = [*body[:2], *block, *body[2:]]
        body = body[:length]
        if row % 2:  # left padding
            ids[row, length - len(body) :], mask[row, length - len(body) :] = body, 1
        else:
            ids[row, : len(body)], mask[row, : len(body)] = body, 1
    patches = rng.standard_normal((64, config.vision.patch_dim)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": patches, "video_grid_thw": grid}


def one_video(config: ModelConfig):
    """One video as processor patches of an 8x4x4 grid, and as 16 uint8 frames of 56x56 (the same grid)."""
    rng = np.random.default_rng(2)
    patches = rng.standard_normal((128, config.vision.patch_dim)).astype(np.float32)
    frames = rng.integers(0, 256, (16, 56, 56, 3), dtype=np.uint8)
    return patches, frames


def sparse_config(backend: str):
    """Layer 0 all retrieval heads, layer 1 one streaming head of two; pages of 16 tokens, a 32-token budget."""
    from qv_jax.attention import SparsityConfig

    return SparsityConfig(
        streaming_heads=[[False, False], [True, False]],
        sink=4,
        local=8,
        page_size=16,
        logical_page_size=4,
        token_budget=32,
        reselect_every=2,
        backend=backend,
        kernel=None if backend == "xla" else "gpu",
    )


def attention_operands():
    """q ``[2, 16, 256, 16]`` over 8 KV heads, one pattern per KV head (dense, streaming, strided: each pair of
    shards of a 4-way split sees a different mix), key padding at the end of the second row."""
    from qv_jax.attention import HeadPattern

    rng = np.random.default_rng(1)
    B, N, K, T, D = 2, 16, 8, 256, 16
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((B, N, T, D), (B, K, T, D), (B, K, T, D)))
    stream, strided = HeadPattern.streaming(16, 64), HeadPattern.strided(1, 2, 0, 64)
    patterns = (HeadPattern.dense(), stream, stream, stream, strided, HeadPattern.dense(), stream, stream)
    segments = np.zeros((B, T), np.int32)
    segments[1, 200:] = -1
    return q, k, v, patterns, segments


# ---------------------------------------------------------------------------------------------------------------
# The 8-device worker (runs as a script in a subprocess)


def _param_bytes(model) -> list[dict]:
    """Per parameter: name, whole size, bytes on each device, and how many ways its sharding splits it."""
    from flax import nnx

    rows = []
    specs = nnx.to_flat_state(nnx.get_partition_spec(model.state))
    annotated = {tuple(path): "model" in tuple(spec.get_value()) for path, spec in specs}
    for path, var in nnx.to_flat_state(model.state):
        value = var.get_value()
        spec = value.sharding.spec
        ways = 1
        for entry in spec:
            for axis in (entry,) if isinstance(entry, str) else (entry or ()):
                ways *= value.sharding.mesh.shape[axis]
        per_device = sorted({s.data.nbytes for s in value.addressable_shards})
        name = ".".join(map(str, path))
        rows.append(
            {
                "path": name,
                "nbytes": value.nbytes,
                "per_device": per_device,
                "ways": ways,
                "annotated": annotated[tuple(path)],
            }
        )
    return rows


def _worker(workdir: Path) -> None:
    from flax import nnx

    from qv_jax.attention.backends import AttentionConfig
    from qv_jax.attention.sharded import sharded_sparse_attention
    from qv_jax.converters.qwen2_5_vl import convert
    from qv_jax.runtime import VisionLanguageModel, load_model
    from qv_jax.runtime.encode import splits_frames
    from qv_jax.sharding import bytes_per_device

    jax.config.update("jax_default_matmul_precision", "highest")

    config = sharding_config()
    inputs = video_batch(config)
    gen = {"max_new_tokens": 6, "eos_token_id": []}
    out: dict = {}
    arrays: dict = {}

    ref = VisionLanguageModel.random(config, seed=3)
    arrays["ref_logits"] = ref.forward(**inputs)
    arrays["ref_tokens"] = ref.generate(**inputs, **gen)
    video_patches, frames = one_video(config)
    arrays["ref_video"] = np.asarray(ref.encode_pixels(video_patches, np.array([[8, 4, 4]])))
    arrays["ref_frames"] = np.asarray(ref.encode_video(frames))

    for data, model in MESHES:
        key = f"{data}x{model}"
        mesh = qv_jax.make_mesh(data=data, model=model)
        m = VisionLanguageModel.random(config, seed=3, mesh=mesh)
        arrays[f"logits_{key}"] = m.forward(**inputs)
        arrays[f"tokens_{key}"] = m.generate(**inputs, **gen)
        arrays[f"video_{key}"] = np.asarray(m.encode_pixels(video_patches, np.array([[8, 4, 4]])))
        arrays[f"frames_{key}"] = np.asarray(m.encode_video(frames))
        cache = m.new_cache(8, 128)
        moved_back = m.plan.shard(jax.device_put(cache, jax.devices()[0]))
        out[key] = {
            "splits_frames": splits_frames(mesh, 8),
            "shard_cache_same": moved_back.k[0].sharding.is_equivalent_to(cache.k[0].sharding, 4),
            "params": _param_bytes(m),
            "kv_repeat": m.plan.kv_repeat,
            "moved": m.plan.moved(),
            "cache_total": sum(x.nbytes for x in (*cache.k, *cache.v)),
            "cache_per_device": sorted(set(bytes_per_device((cache.k, cache.v)).values())),
            "cache_spec": str(cache.k[0].sharding.spec),
            "ref_cache_total": sum(
                x.nbytes for x in jax.tree.leaves((ref.new_cache(8, 128).k, ref.new_cache(8, 128).v))
            ),
        }

    # a checkpoint restored onto a mesh, and a sharded (KV-replicated) model saved back in the stored layout
    ref.save(workdir / "ckpt")
    restored = load_model(workdir / "ckpt", mesh=qv_jax.make_mesh(data=1, model=8))
    arrays["restored_logits"] = restored.forward(**inputs)
    restored.save(workdir / "resaved")
    again = load_model(workdir / "resaved")
    out["resaved_equal"] = all(
        np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
        for (_, a), (_, b) in zip(nnx.to_flat_state(again.state), nnx.to_flat_state(ref.state), strict=True)
    )
    out["resaved_kv_heads"] = again.config.text.num_kv_heads

    # an HF directory streamed straight into shards (4 query / 2 KV heads: KV heads replicated twice on model=4)
    hf_dir = workdir / "hf"
    hf_ref = load_model(hf_dir)
    hf_inputs = json.loads((workdir / "hf_inputs.json").read_text())
    arrays["hf_ref_logits"] = hf_ref.forward(np.array(hf_inputs))
    hf_mesh = qv_jax.make_mesh(data=2, model=4)
    hf_sharded = load_model(hf_dir, mesh=hf_mesh)
    arrays["hf_logits"] = hf_sharded.forward(np.array(hf_inputs))
    out["hf_kv_repeat"] = hf_sharded.plan.kv_repeat
    # converting on a mesh writes the same checkpoint as converting on the host
    convert(hf_dir, workdir / "converted_mesh", dtype="float32", mesh=hf_mesh)
    convert(hf_dir, workdir / "converted_host", dtype="float32")
    on_mesh, on_host = load_model(workdir / "converted_mesh"), load_model(workdir / "converted_host")
    out["converted_equal"] = on_mesh.config == on_host.config and all(
        np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
        for (_, a), (_, b) in zip(nnx.to_flat_state(on_mesh.state), nnx.to_flat_state(on_host.state), strict=True)
    )
    out["hf_cache_spec"] = str(hf_sharded.new_cache(2, 64).k[0].sharding.spec)

    # sparse decoding (streaming heads, page selection active past the 32-token budget) on a mesh
    for backend in ("xla", "interpret"):
        sparsity = sparse_config(backend)
        arrays[f"sparse_ref_{backend}"] = VisionLanguageModel.random(config, seed=3, sparsity=sparsity).generate(
            **inputs, **gen
        )
        for data, model in ((2, 4), (1, 8)):
            m = VisionLanguageModel.random(config, seed=3, sparsity=sparsity, mesh=qv_jax.make_mesh(data, model))
            arrays[f"sparse_{backend}_{data}x{model}"] = m.generate(**inputs, **gen)
            cache = m.new_sparse_cache(8, 64)
            out[f"sparse_specs_{data}x{model}"] = [
                list(cache.k[0].sharding.spec),  # layer 0: retrieval heads only, split
                list(cache.k[1].sharding.spec),  # layer 1: half and half, not divisible: whole per row shard
                cache.geometry.kv_repeat,
            ]

    # the whole pipeline: group-wise QuickPrefill with pruning, then dense or sparse decoding, on meshes
    from pipeline_helpers import VIDEO_OPTIONS, model_dir, sample_video

    qa_sparsity = sparse_config("xla")
    qa_sparsity = dataclasses.replace(qa_sparsity, streaming_heads=((True, False), (False, True)), page_size=8)
    for data, model in ((1, 1), (2, 4), (8, 1)):  # 4 query heads: model axes up to 4
        mesh = None if data * model == 1 else qv_jax.make_mesh(data=data, model=model)
        for name, sparsity in (("dense", None), ("sparse", qa_sparsity)):
            qa = qv_jax.VideoQA.from_pretrained(
                model_dir(), group_frames=8, retention=0.5, sparsity=sparsity, mesh=mesh, **VIDEO_OPTIONS
            )
            answer = qa.ask(sample_video(), "What happens in the video?", max_new_tokens=8)
            arrays[f"videoqa_{name}_{data}x{model}"] = answer.token_ids
    # the oracle and the interpreted kernels run per shard like the default (chunked) does; the Triton kernels
    # interpret an order of magnitude faster than the TPU interpreter simulating 8 devices
    mesh = qv_jax.make_mesh(data=2, model=4)
    for backend, attention in (("reference", "reference"), ("interpret", AttentionConfig("interpret", "gpu"))):
        m = VisionLanguageModel.random(config, seed=3, mesh=mesh, attention=attention)
        arrays[f"logits_2x4_{backend}"] = m.forward(**inputs)
        for name, sparsity in (("dense", None), ("sparse", qa_sparsity)):
            qa = qv_jax.VideoQA.from_pretrained(
                model_dir(), group_frames=8, retention=0.5, sparsity=sparsity, mesh=mesh, attention=attention,
                **VIDEO_OPTIONS,
            )  # fmt: skip
            answer = qa.ask(sample_video(), "What happens in the video?", max_new_tokens=8)
            arrays[f"videoqa_{name}_2x4_{backend}"] = answer.token_ids

    # Pallas kernels per shard: KV heads with different patterns on different shards
    q, k, v, patterns, segments = attention_operands()
    for data, model in ((2, 4), (1, 8)):
        mesh = qv_jax.make_mesh(data=data, model=model)
        for backend in ("xla", "interpret"):
            run = jax.jit(
                functools.partial(
                    sharded_sparse_attention, patterns=patterns, backend=backend, mesh=mesh, return_lse=True
                )
            )
            attn, lse = run(q, k, v, segment_ids=segments)
            arrays[f"attn_{backend}_{data}x{model}"] = np.asarray(attn)
            arrays[f"attn_lse_{backend}_{data}x{model}"] = np.asarray(lse)
            out[f"attn_heads_axis_{data}x{model}"] = attn.sharding.spec[1]

    _identify_heads_on_a_mesh(config, workdir, out, arrays)

    # meshes and the head rule on the real device count
    out["default_mesh"] = dict(qv_jax.make_mesh().shape)
    out["model2_mesh"] = dict(qv_jax.make_mesh(model=2).shape)
    errors = {}
    for name, call in {
        "data3": lambda: qv_jax.make_mesh(data=3),
        "data2_model2": lambda: qv_jax.make_mesh(data=2, model=2),
        "7b_on_8": lambda: ShardingPlan.create(ModelConfig.qwen2_5_vl_7b(), qv_jax.make_mesh(model=8)),
        "3b_on_8": lambda: ShardingPlan.create(ModelConfig.qwen2_5_vl_3b(), qv_jax.make_mesh(model=8)),
    }.items():
        try:
            result = call()
            errors[name] = f"ok kv_repeat={getattr(result, 'kv_repeat', None)}"
        except Exception as e:  # the parent checks the type and message
            errors[name] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    np.savez(workdir / "arrays.npz", **arrays)
    (workdir / "results.json").write_text(json.dumps(out))


def _identify_heads_on_a_mesh(config: ModelConfig, workdir: Path, out: dict, arrays: dict) -> None:
    """DuoAttention identification with 2 rows a step, on one device and on a 2x4 mesh (rows on data, each KV head
    replicated twice on model); both methods."""
    from qv_jax.duo import identify_heads
    from qv_jax.runtime import VisionLanguageModel
    from qv_jax.testing import random_model

    tokenizer = random_model(config, tokenizer_dir=workdir / "duo-tokenizer", seed=3).tokenizer
    settings = dict(sink=4, recent=12, min_length=128, max_length=128, seed=0)
    for name, mesh in (("single", None), ("2x4", qv_jax.make_mesh(data=2, model=4))):
        model = VisionLanguageModel.random(config, seed=3, tokenizer=tokenizer, mesh=mesh)
        trained = identify_heads(model, steps=2, rows=2, lr=0.05, **settings)
        arrays[f"duo_gates_{name}"], arrays[f"duo_losses_{name}"] = trained.gates, trained.losses
        arrays[f"duo_scores_{name}"] = identify_heads(model, method="on-the-fly", **settings).gates
    try:
        identify_heads(model, steps=1, rows=3, **settings)
    except Exception as e:  # the parent checks the type and message
        out["duo_rows_error"] = f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Run the worker once on 8 forced CPU devices; returns ``(json results, arrays)``."""
    from hf_tiny import build_hf_model, hf_config

    workdir = tmp_path_factory.mktemp("sharding")
    hf = build_hf_model(hf_config())
    hf.save_pretrained(workdir / "hf")
    (workdir / "hf_inputs.json").write_text(json.dumps([list(range(3, 15)), list(range(40, 52))]))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, __file__, str(workdir)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads((workdir / "results.json").read_text())
    with np.load(workdir / "arrays.npz") as f:
        arrays = dict(f)
    return results, arrays


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_sharded_logits_and_greedy_tokens_equal_single_device(sharded_run, mesh):
    _, arrays = sharded_run
    key = f"{mesh[0]}x{mesh[1]}"
    mask = video_batch(sharding_config())["attention_mask"].astype(bool)
    ref, got = arrays["ref_logits"], arrays[f"logits_{key}"]
    np.testing.assert_allclose(got[mask], ref[mask], atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(arrays[f"tokens_{key}"], arrays["ref_tokens"])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_vision_splits_frames_over_data_and_matches_one_device(sharded_run, mesh):
    results, arrays = sharded_run
    key = f"{mesh[0]}x{mesh[1]}"
    # 8 temporal patches: split over data=2 and data=8, not needed on data=1
    assert results[key]["splits_frames"] == (mesh[0] > 1)
    np.testing.assert_allclose(arrays[f"video_{key}"], arrays["ref_video"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(arrays[f"frames_{key}"], arrays["ref_frames"], atol=TOL, rtol=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_each_parameter_is_split_over_its_mesh_axes(sharded_run, mesh):
    results, _ = sharded_run
    data, model = mesh
    run = results[f"{data}x{model}"]
    split = 0
    for p in run["params"]:
        assert p["per_device"] == [p["nbytes"] // p["ways"]], p
        assert p["ways"] in (1, model), p  # parameters are never split over "data"
        split += p["ways"] == model > 1
    if model > 1:
        # exactly the parameters annotated with "model" are split: heads, MLP width, vocabulary; norms are whole
        names = {p["path"] for p in run["params"] if p["ways"] == model}
        assert names == {p["path"] for p in run["params"] if p["annotated"]}
        for name in ("text.embed", "text.lm_head", "text.layers.0.q", "text.layers.0.k", "text.layers.1.o"):
            assert name in names
        assert split > 20
        # 4 vision heads do not split 8 ways: those weights are split along another dimension instead
        moved = {name: where for name, where in run["moved"].items() if name.startswith("vision.blocks.0.attn.")}
        expected = {"vision.blocks.0.attn.qkv": "dim 0", "vision.blocks.0.attn.proj": "dim 2"}
        expected["vision.blocks.0.attn.qkv_bias"] = "dim 2"
        assert moved == ({} if model == 4 else expected)
    else:
        assert split == 0 and not run["moved"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_kv_cache_is_split_by_kv_head_and_row(sharded_run, mesh):
    results, _ = sharded_run
    data, model = mesh
    run = results[f"{data}x{model}"]
    # 2 KV heads: split on model <= 2, replicated model / 2 times on wider model axes (one head per device)
    assert run["kv_repeat"] == max(1, model // 2)
    assert run["cache_total"] == run["ref_cache_total"] * run["kv_repeat"]
    assert run["cache_per_device"] == [run["cache_total"] // (data * model)]
    assert run["cache_spec"].startswith("P('data', 'model'")
    assert run["shard_cache_same"]


@pytest.mark.slow
def test_checkpoint_restores_into_shards_and_saves_back_in_stored_layout(sharded_run):
    results, arrays = sharded_run
    mask = video_batch(sharding_config())["attention_mask"].astype(bool)
    np.testing.assert_allclose(arrays["restored_logits"][mask], arrays["ref_logits"][mask], atol=TOL, rtol=TOL)
    assert results["resaved_equal"] and results["resaved_kv_heads"] == 2


@pytest.mark.slow
def test_hf_directory_streams_into_shards_and_converts_on_a_mesh(sharded_run):
    results, arrays = sharded_run
    np.testing.assert_allclose(arrays["hf_logits"], arrays["hf_ref_logits"], atol=TOL, rtol=TOL)
    assert results["hf_kv_repeat"] == 2
    assert results["converted_equal"]
    assert results["hf_cache_spec"].startswith("P('data', 'model'")


@pytest.mark.slow
def test_meshes_and_head_rule_on_eight_devices(sharded_run):
    results, _ = sharded_run
    assert results["default_mesh"] == {"data": 1, "model": 8}
    assert results["model2_mesh"] == {"data": 4, "model": 2}
    errors = results["errors"]
    assert errors["data3"] == "ShardingError: make_mesh: data=3 does not divide the 8 devices"
    assert errors["data2_model2"].startswith("ShardingError")
    # Qwen2.5-VL-7B: 28 query heads do not split 8 ways; the message lists the sizes that work
    assert errors["7b_on_8"].startswith("ShardingError") and "[1, 2, 4, 28]" in errors["7b_on_8"]
    # Qwen2.5-VL-3B: 16 / 2 heads: each KV head replicated 4 times
    assert errors["3b_on_8"] == "ok kv_repeat=4"


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ((2, 4), (1, 8)), ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("backend", ("xla", "interpret"))
def test_sparse_attention_runs_per_shard(sharded_run, mesh, backend):
    from qv_jax.attention import sparse_attention

    results, arrays = sharded_run
    key = f"{mesh[0]}x{mesh[1]}"
    q, k, v, patterns, segments = attention_operands()
    ref, ref_lse = sparse_attention(q, k, v, patterns, segments, backend="xla", return_lse=True)
    np.testing.assert_allclose(arrays[f"attn_{backend}_{key}"], ref, atol=2e-5, rtol=2e-5)
    seen = np.isfinite(ref_lse)
    np.testing.assert_allclose(arrays[f"attn_lse_{backend}_{key}"][seen], np.asarray(ref_lse)[seen], atol=2e-5)
    assert results[f"attn_heads_axis_{key}"] == "model"


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ((2, 4), (1, 8)), ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("backend", ("xla", "interpret"))
def test_sparse_decoding_on_a_mesh_gives_the_unsharded_tokens(sharded_run, mesh, backend):
    results, arrays = sharded_run
    key = f"{mesh[0]}x{mesh[1]}"
    np.testing.assert_array_equal(arrays[f"sparse_{backend}_{key}"], arrays[f"sparse_ref_{backend}"])
    retrieval_only, mixed, repeat = results[f"sparse_specs_{key}"]
    assert retrieval_only[:2] == ["data", "model"] and mixed[:2] == ["data", None]
    assert repeat == mesh[1] // 2


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ((2, 4), (8, 1)), ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("decoding", ("dense", "sparse"))
def test_videoqa_prefill_and_decoding_on_a_mesh_answer_like_one_device(sharded_run, mesh, decoding):
    _, arrays = sharded_run
    got = arrays[f"videoqa_{decoding}_{mesh[0]}x{mesh[1]}"]
    np.testing.assert_array_equal(got, arrays[f"videoqa_{decoding}_1x1"])
    assert got.size >= 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ("reference", "interpret"))
def test_every_attention_backend_on_a_mesh_gives_the_one_device_results(sharded_run, backend):
    _, arrays = sharded_run
    np.testing.assert_allclose(arrays[f"logits_2x4_{backend}"], arrays["ref_logits"], atol=1e-4)
    for decoding in ("dense", "sparse"):
        np.testing.assert_array_equal(arrays[f"videoqa_{decoding}_2x4_{backend}"], arrays[f"videoqa_{decoding}_1x1"])


@pytest.mark.slow
def test_identify_heads_on_a_mesh_trains_the_one_device_gates(sharded_run):
    results, arrays = sharded_run
    assert arrays["duo_gates_2x4"].shape == (2, 2)  # the stored KV heads', not the mesh's replicas
    np.testing.assert_allclose(arrays["duo_losses_2x4"], arrays["duo_losses_single"], rtol=1e-4)
    np.testing.assert_allclose(arrays["duo_gates_2x4"], arrays["duo_gates_single"], atol=1e-5)
    np.testing.assert_allclose(arrays["duo_scores_2x4"], arrays["duo_scores_single"], atol=1e-5)
    assert results["duo_rows_error"].startswith("InputError") and "2 data shards" in results["duo_rows_error"]


def test_head_rule_without_devices():
    assert valid_model_axes(28, 4) == [1, 2, 4, 28]
    assert valid_model_axes(16, 2) == [1, 2, 4, 8, 16]
    assert kv_head_repeat(28, 4, 4) == 1 and kv_head_repeat(28, 4, 2) == 1 and kv_head_repeat(28, 4, 28) == 7
    assert kv_head_repeat(16, 2, 8) == 4
    for heads, kv, model in ((28, 4, 8), (28, 4, 7), (28, 4, 14), (12, 4, 6), (4, 2, 3)):
        with pytest.raises(ShardingError, match=f"model axis of {model}"):
            kv_head_repeat(heads, kv, model)


def test_caches_on_a_mesh_compile_once_per_shape():
    from qv_jax.runtime import VisionLanguageModel

    m = VisionLanguageModel.random(tiny_config(), mesh=qv_jax.make_mesh())
    compiles = []
    listener = lambda event, *_, **__: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        counts = []
        for batch in (2, 2, 2, 4):
            jax.block_until_ready(m.new_cache(batch, 128))
            counts.append(compiles.count("/jax/core/compile/backend_compile_duration"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert counts[0] >= 1 and counts[1] == counts[2] == counts[0] and counts[3] > counts[0], counts


def test_mesh_errors_on_one_device():
    with pytest.raises(ShardingError, match="does not divide the 1 devices"):
        qv_jax.make_mesh(data=2)
    with pytest.raises(ShardingError, match="does not use the 1 devices"):
        qv_jax.make_mesh(data=2, model=1)
    with pytest.raises(ShardingError, match="positive"):
        qv_jax.make_mesh(model=0)
    with pytest.raises(ShardingError, match="needs"):
        ShardingPlan.create(tiny_config(), Mesh(np.array(jax.devices()[:1]), ("x",)))
    mesh = qv_jax.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "model": 1}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker(Path(sys.argv[1]))
