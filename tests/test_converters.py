"""Weight conversion: HF safetensors (both key namings, sharded, bf16) -> NNX state -> orbax -> NNX state."""

import json
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_tiny import build_hf_model, hf_config
from safetensors.numpy import save_file

import qv_jax
from qv_jax.cli import main as cli_main
from qv_jax.converters.qwen2_5_vl import KEY_MAP, load_hf_state, map_key, normalize_key
from qv_jax.converters.safetensors_io import SafetensorsFile, open_checkpoint
from qv_jax.errors import CheckpointError


def _flat(state) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        np.testing.assert_array_equal(fa[path], fb[path], err_msg=str(path))


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(hf_config())


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    """``save_pretrained`` output: transformers 5.24 writes the hub naming (``visual.*``, ``model.layers.*``)."""
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")
    return path


def _tensors(path) -> dict[str, np.ndarray]:
    files = open_checkpoint(path)
    return {name: np.array(f.get(name)) for name, f in files.items()}


def _write_checkpoint(tensors: dict, out, config_src, shards: int = 2):
    """Write ``tensors`` under their names as ``shards`` safetensors files with an index json."""
    out.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, str(out / filename))
        weight_map |= dict.fromkeys(part, filename)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text((config_src / "config.json").read_text())


def test_every_hf_tensor_has_a_rule_and_both_namings_map_alike(hf_model, hf_dir):
    hub_names = set(_tensors(hf_dir))
    new_names = set(hf_model.state_dict())  # in memory, transformers 5 uses model.visual.* / model.language_model.*
    assert any(n.startswith("model.language_model.") for n in new_names)
    assert not any(n.startswith("model.language_model.") for n in hub_names)
    assert {normalize_key(n) for n in new_names} == hub_names
    for name in new_names:
        assert map_key(name) is not None, name
        assert map_key(normalize_key(name)) == map_key(name)
    assert len({pattern for pattern, _, _ in KEY_MAP}) == len(KEY_MAP)


def test_convert_round_trip_gives_identical_parameters(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    assert cli_main(["convert", str(hf_dir), str(out), "--dtype", "float32", "--quiet"]) == 0
    assert (out / "qv_jax.json").is_file() and (out / "params").is_dir()
    assert (out / "tokenizer_config.json").is_file()  # tokenizer files travel with the weights
    direct = qv_jax.load_model(hf_dir, dtype="float32")
    restored = qv_jax.load_model(out, dtype="float32")
    assert restored.config == direct.config
    _assert_same_params(direct.state, restored.state)
    # a bfloat16 checkpoint restores to the bfloat16 cast of the same weights
    out16 = tmp_path / "ckpt16"
    assert cli_main(["convert", str(hf_dir), str(out16), "--quiet"]) == 0
    _assert_same_params(
        jax.tree.map(lambda x: x.astype("bfloat16"), direct.state), qv_jax.load_model(out16, dtype="bfloat16").state
    )
    # an existing output is not overwritten by accident
    assert cli_main(["convert", str(hf_dir), str(out16), "--quiet"]) == 2
    # python -m qv_jax.converters is the same command
    module = subprocess.run(
        [sys.executable, "-m", "qv_jax.converters", "--help"], capture_output=True, text=True, check=True
    )
    assert "HF_DIR" in module.stdout and "--dtype" in module.stdout


def test_new_naming_sharded_checkpoint_loads_the_same(hf_model, hf_dir, tmp_path):
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    _write_checkpoint(tensors, tmp_path / "new", hf_dir)
    _, _, new_state = load_hf_state(tmp_path / "new")
    _, _, hub_state = load_hf_state(hf_dir)
    _assert_same_params(new_state, hub_state)
    # both namings at once: every tensor twice
    both = tensors | _tensors(hf_dir)
    _write_checkpoint(both, tmp_path / "both", hf_dir)
    with pytest.raises(CheckpointError, match="duplicated"):
        load_hf_state(tmp_path / "both")


def test_bfloat16_safetensors_are_read_and_cast(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    _write_checkpoint(bf16, tmp_path / "bf16", hf_dir, shards=1)
    f = SafetensorsFile(next((tmp_path / "bf16").glob("*.safetensors")))
    assert {f.dtype(n) for n in f.keys()} == {np.dtype(ml_dtypes.bfloat16)}
    _, _, state = load_hf_state(tmp_path / "bf16", dtype="float32")
    _, _, ref = load_hf_state(hf_dir, dtype="float32")
    expected = jax.tree.map(lambda x: x.astype("bfloat16").astype("float32"), ref)
    _assert_same_params(state, expected)


def test_broken_checkpoint_lists_every_bad_tensor_in_one_error(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["visual.blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :-1].copy()
    tensors["visual.blocks.2.attn.qkv.weight"] = tensors["visual.blocks.2.attn.qkv.weight"].T.copy()
    _write_checkpoint(tensors, tmp_path / "broken", hf_dir)
    with pytest.raises(CheckpointError) as err:
        load_hf_state(tmp_path / "broken")
    message = str(err.value)
    assert "1 missing: model.layers.1.mlp.up_proj.weight" in message
    assert "1 unexpected: visual.blocks.0.attn.extra.weight" in message
    assert "2 misshaped" in message and "lm_head.weight: [320, 63], expected [320, 64]" in message
    assert "visual.blocks.2.attn.qkv.weight: [32, 96], expected [96, 32]" in message


def test_tied_checkpoint_ignores_a_stored_lm_head(tmp_path):
    hf = build_hf_model(hf_config(tie=True))
    hf.save_pretrained(tmp_path / "tied")
    tensors = _tensors(tmp_path / "tied")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    _write_checkpoint(tensors, tmp_path / "tied_with_head", tmp_path / "tied")
    config, graphdef, state = load_hf_state(tmp_path / "tied_with_head")
    assert config.text.tie_word_embeddings
    assert nnx.merge(graphdef, state).text.lm_head is None


def test_truncated_and_missing_files_raise_checkpoint_errors(hf_dir, tmp_path):
    src = next(hf_dir.glob("*.safetensors"))
    broken = tmp_path / "trunc"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(src.read_bytes()[:-100])
    (broken / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_state(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_hf_state(empty)
    with pytest.raises(CheckpointError, match="neither"):
        qv_jax.load_model(tmp_path)
