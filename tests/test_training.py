"""Finetuning (qv_jax.training): the copy task learns, resume repeats the uninterrupted run, an interrupted save
keeps the previous checkpoint, the packed loss is the per-document loss, patterned attention's gradient equals
the reference's, the data sources, bad input, and ``qv-jax finetune`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.attention import SparsityConfig
from qv_jax.attention.backends import AttentionConfig
from qv_jax.attention.patterns import HeadPattern
from qv_jax.errors import CheckpointError, ConfigError, InputError, OutputError
from qv_jax.testing import random_model, tiny_config
from qv_jax.training import checkpoint, finetune, open_data
from qv_jax.training.data import Batch, Synthetic, TokenDocuments, pack_pieces, read_tokens
from qv_jax.training.loop import CHECKPOINTS, CURVE, LOG, MODEL
from qv_jax.training.step import StepConfig, loss_fn, split_text

loss_jit = jax.jit(loss_fn, static_argnums=(1, 2, 3))

SEQ = 32
RUN = dict(seq_len=SEQ, batch_tokens=2 * SEQ, lr=1e-2, warmup=2)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=1)


def _no_save(model, directory):
    """Skip writing the final model where a test does not look at it."""


@pytest.mark.slow
def test_copy_task_loss_falls_below_055_of_its_start(model, tmp_path):
    # the copied half is all that is scored: learning the 64 content tokens' frequencies alone stops at
    # ln 64 / ln 512 = 0.67 of the start; below that the model reads the first copy from far back
    data = open_data("synthetic:copy", model)
    run = dict(RUN, batch_tokens=4 * SEQ)
    result = finetune(model, data, tmp_path / "run", steps=200, checkpoint_every=1000, save_model=_no_save, **run)
    start, end = result.losses[:3].mean(), result.losses[-10:].mean()
    assert start == pytest.approx(np.log(512), rel=0.05)
    assert end < 0.55 * start


def test_resume_after_an_interrupted_save_repeats_the_uninterrupted_losses(model, tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    data = open_data("synthetic:passkey", model)
    settings = dict(steps=6, checkpoint_every=3, save_model=_no_save, **RUN)
    whole = finetune(model, data, tmp_path / "whole", **settings).losses

    calls = {"n": 0}
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def killed_on_second_save(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-save")
        return await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed_on_second_save)
    out = tmp_path / "cut"
    with pytest.raises(BaseException, match="killed mid-save"):
        finetune(model, data, out, **settings)
    monkeypatch.undo()
    # the save of step 6 never completed: step 3 is the newest, and loads
    assert [step for step, _ in checkpoint.checkpoints(out / CHECKPOINTS)] == [3]
    lines = (out / LOG).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]

    resumed = finetune(model, data, out, resume=True, **settings).losses
    np.testing.assert_allclose(resumed, whole, rtol=1e-6)
    entries = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6]  # steps 4..6 once, from the resumed run
    assert all(set(e) == {"step", "loss", "tokens_per_s"} and e["tokens_per_s"] > 0 for e in entries)
    assert (out / CURVE).read_bytes().startswith(b"\x89PNG")


def test_packed_loss_equals_the_per_document_loss(model):
    text_def, treedef, params = split_text(model)
    config = StepConfig(steps=1)
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 500, 11), rng.integers(0, 500, 7)
    tokens = np.concatenate([first, second])
    packed = pack_pieces(tokens, np.array([0, 11]), np.array([11, 18]), 1, 24)
    assert packed.segment_ids[0].tolist() == [0] * 11 + [1] * 7 + [-1] * 6
    assert packed.positions[0, 11:18].tolist() == list(range(7))

    def loss(batch):
        arrays = (batch.ids, batch.segment_ids, batch.positions, batch.loss_mask)
        value, count = loss_jit(params, text_def, treedef, config, tuple(map(jnp.asarray, arrays)))
        return float(value) * float(count), float(count)

    total, count = loss(packed)
    assert count == 10 + 6  # no prediction across the boundary, from padding or past the row
    parts = [loss(pack_pieces(doc, np.array([0]), np.array([doc.size]), 1, 24)) for doc in (first, second)]
    assert total == pytest.approx(sum(p[0] for p in parts), rel=1e-5)
    # what padding holds does not matter
    noisy = Batch(np.where(packed.segment_ids < 0, 7, packed.ids), packed.segment_ids, packed.positions,
                  packed.loss_mask)  # fmt: skip
    assert loss(noisy)[0] == pytest.approx(total, rel=1e-6)


def test_patterned_gradients_equal_the_reference(model):
    text_def, treedef, params = split_text(model)
    patterns = ((HeadPattern.streaming(4, 8), HeadPattern.dense()), HeadPattern.strided(1, 2, 0, 8))
    batch = Synthetic("copy", separator=504, vocab_size=512).batch(0, 1, SEQ)[0]
    arrays = tuple(map(jnp.asarray, (batch.ids, batch.segment_ids, batch.positions, batch.loss_mask)))

    def grads(backend):
        config = StepConfig(steps=1, attention=AttentionConfig(backend), layer_patterns=patterns)
        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(1, 2, 3))(
            params, text_def, treedef, config, arrays
        )

    (loss, _), got = grads("chunked")
    (want_loss, _), want = grads("reference")
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    dense = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(1, 2, 3))(
        params, text_def, treedef, StepConfig(steps=1), arrays
    )
    assert float(dense[0][0]) != pytest.approx(float(loss), rel=1e-7)  # the patterns do act


def test_token_files_pack_whole_documents_and_wrap(model, tmp_path):
    sep = 504
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 60)]  # the last is longer than a row
    tokens = np.concatenate([np.append(d, sep) for d in docs]).astype(np.int32)
    np.save(tmp_path / "t.npy", tokens)
    tokens.astype("<u4").tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        source = open_data(tmp_path / name, model)
        assert isinstance(source, TokenDocuments) and source.documents == 3
        np.testing.assert_array_equal(read_tokens(tmp_path / name, vocab_size=512), tokens)
    batch, position = source.batch(0, 2, 16)
    # pieces: 6, 4, then the 41-token document in 16 + 16 + 9: [6 + 4, 16] fill the two rows
    assert position == 3
    assert sorted(batch.segment_ids.max(axis=1).tolist()) == [0, 1]
    assert batch.tokens == 26 and batch.loss_mask.sum() == 26 - 3
    assert batch.positions.max() == 15
    later, position = source.batch(3, 2, 16)
    assert position == 1 and later.tokens == 16 + 9 + 6  # the rest of the long document, then the file again
    again = source.batch(0, 2, 16)[0]
    np.testing.assert_array_equal(again.ids, batch.ids)
    first, second = Synthetic("copy", separator=sep, vocab_size=512, seed=3), open_data("synthetic:copy", model)
    np.testing.assert_array_equal(first.batch(5, 2, SEQ)[0].ids, first.batch(5, 2, SEQ)[0].ids)
    assert not np.array_equal(first.batch(5, 2, SEQ)[0].ids, second.batch(5, 2, SEQ)[0].ids)


def test_bad_input_is_refused_with_typed_errors_and_nothing_overwritten(model, tmp_path):
    vocab = model.config.text.vocab_size
    np.save(tmp_path / "big.npy", np.array([1, 2, vocab], np.int32))
    with pytest.raises(InputError, match=rf"big\.npy: token id {vocab} is outside"):
        open_data(tmp_path / "big.npy", model)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.bin: empty data file"):
        open_data(tmp_path / "empty.bin", model)
    (tmp_path / "doc.txt").write_text("a document")
    with pytest.raises(InputError, match=r"doc\.txt: a text file needs the model's tokenizer"):
        open_data(tmp_path / "doc.txt", model)
    with pytest.raises(InputError, match="unknown data file kind"):
        open_data(Path(__file__), model)
    with pytest.raises(InputError, match="unknown synthetic task"):
        open_data("synthetic:sort", model)
    data = open_data("synthetic:copy", model)
    strided = (HeadPattern.strided(1, 2, 0, 16), HeadPattern.dense())
    with pytest.raises(InputError, match="seq_len 40 is not a whole number of layer 0's 16-token"):
        finetune(model, data, tmp_path / "x", steps=1, seq_len=40, layer_patterns=strided)
    with pytest.raises(ConfigError, match="1 layer patterns for a model of 2 layers"):
        finetune(model, data, tmp_path / "x", steps=1, seq_len=SEQ, layer_patterns=strided[:1])
    assert not (tmp_path / "x").exists()

    out = tmp_path / "run"
    finetune(model, data, out, steps=1, **RUN)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match="not empty"):
        finetune(model, data, out, steps=2, **RUN)
    other = random_model(tiny_config(vocab_size=640))
    with pytest.raises(CheckpointError, match=r"another architecture \(config differ"):
        finetune(other, open_data("synthetic:copy", other), out, steps=2, resume=True, **RUN)
    with pytest.raises(CheckpointError, match=r"another architecture \(sparsity, layer_patterns differ"):
        finetune(model, data, out, steps=2, resume=True, sparsity=SparsityConfig.longgen(2), **RUN)
    (out / CHECKPOINTS / "architecture.json").unlink()  # orbax itself refuses misshaped arrays
    with pytest.raises(CheckpointError, match="step_1: cannot resume from it"):
        finetune(other, open_data("synthetic:copy", other), out, steps=2, resume=True, **RUN)
    before.pop(out / CHECKPOINTS / "architecture.json")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_finetune_end_to_end(tmp_path, capsys):
    from qv_jax.cli import main
    from qv_jax.runtime import load_model
    from qv_jax.testing import write_hf_dir

    source = write_hf_dir(tmp_path / "model", seed=2)
    out = tmp_path / "out"
    args = ["finetune", "--model", str(source), "--data", "synthetic:copy", "--out", str(out), "--seq-len", "32"]
    args += ["--sparsity", "longgen", "--sink", "4", "--local", "8"]
    args += ["--batch-tokens", "64", "--steps", "3", "--lr", "1e-3", "--warmup", "1", "--checkpoint-every", "2"]
    assert main([*args, "--json", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["command"] == "finetune" and len(record["losses"]) == 3
    assert [json.loads(line)["step"] for line in (out / LOG).read_text().splitlines()] == [1, 2, 3]
    assert (out / CURVE).is_file() and [s for s, _ in checkpoint.checkpoints(out / CHECKPOINTS)] == [3]
    trained, original = load_model(out / MODEL), load_model(source)
    assert trained.tokenizer is not None and record["settings"]["sparsity"]["layers"] == ["full", "streaming"]
    assert trained.sparsity == SparsityConfig.longgen(2, sink=4, local=8)  # saved with the model
    before, after = (np.asarray(m.state["text"]["layers"][0]["q"][...]) for m in (original, trained))
    assert not np.allclose(before, after) and np.isfinite(after).all()
    assert main(args) == 2  # a second run into the same OUT without --resume
    assert "not empty" in capsys.readouterr().err


MESH_SCRIPT = """
import tempfile, jax, numpy as np
from qv_jax.sharding import make_mesh
from qv_jax.testing import random_model
from qv_jax.training import finetune, open_data
one = random_model(seed=1)
meshed = random_model(seed=1, mesh=make_mesh(data=2, model=2, devices=jax.devices()[:4]))
data = open_data("synthetic:copy", one)
run = dict(seq_len=32, batch_tokens=64, steps=3, lr=1e-2, warmup=1, save_model=lambda m, d: None)
want = finetune(one, data, tempfile.mkdtemp() + "/one", **run)
got = finetune(meshed, data, tempfile.mkdtemp() + "/mesh", **run)
np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)
q = got.model.state["text"]["layers"][0]["q"][...]
assert "model" in str(q.sharding.spec), q.sharding
print("ok")
"""


@pytest.mark.slow
def test_training_on_a_2x2_mesh_matches_one_device():
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
