"""LongGen hybrid models: the per-layer config, its patterns and how a checkpoint keeps it (docs/attention.md,
"LongGen hybrid models")."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from qv_jax.attention import HeadPattern, SparsityConfig
from qv_jax.errors import CheckpointError, ConfigError
from qv_jax.runtime import VisionLanguageModel, load_model
from qv_jax.testing import tiny_config


def config_of(num_layers: int):
    config = tiny_config()
    return dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=num_layers))


def test_longgen_puts_full_layers_in_the_middle_third():
    assert SparsityConfig.longgen(6).layers == ("streaming",) * 2 + ("full",) * 2 + ("streaming",) * 2
    layers = SparsityConfig.longgen(28, sparse="strided").layers
    assert layers.count("full") == 9 and layers[:9] == ("strided",) * 9 and layers[18:] == ("strided",) * 10
    assert SparsityConfig.longgen(2).layers == ("full", "streaming")
    assert SparsityConfig.longgen(4, full_layers=[0, 3]).layers == ("full", "streaming", "streaming", "full")


def test_layer_patterns_per_head():
    duo = [[False, False], [True, False], [False, False]]
    config = SparsityConfig.longgen(3, sink=4, local=8, streaming_heads=duo)
    dense, stream = HeadPattern.dense(), HeadPattern.streaming(4, 8)
    assert config.layer_patterns(3, 2) == ((stream, stream), (stream, dense), (stream, stream))
    assert config.retrieval_first().layer_patterns(3, 2)[1] == (dense, stream)
    strided = SparsityConfig.longgen(3, sparse="strided", local_blocks=2, vert_stride=4, block=64)
    assert strided.layer_patterns(3, 2)[0] == (HeadPattern.strided(2, 4, 0, 64), HeadPattern.strided(2, 4, 1, 64))
    assert strided.layer_patterns(3, 2)[1] == (dense, dense)
    assert strided.layer_patterns(3, 4, kv_repeat=2)[2][2] == HeadPattern.strided(2, 4, 1, 64)
    assert SparsityConfig().layer_patterns(2, 2) == ((dense, dense), (dense, dense))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SparsityConfig.longgen(0), "num_layers"),
        (lambda: SparsityConfig.longgen(4, sparse="dense"), "sparse must be"),
        (lambda: SparsityConfig.longgen(4, full_layers="top"), "full_layers"),
        (lambda: SparsityConfig.longgen(4, full_layers=[4]), "out of range"),
        (lambda: SparsityConfig.longgen(4, sparse="strided", block=96), "multiple of page_size"),
        (lambda: SparsityConfig.longgen(4, sparse="strided", vert_stride=0), "vert_stride"),
        (lambda: SparsityConfig(layers=("full", "sliding")), "layers must be"),
        (lambda: SparsityConfig(layers="full"), "layers must be"),
        (
            lambda: SparsityConfig(layers=("strided", "full"), streaming_heads=[[True, False], [False, False]]),
            "strided",
        ),
        (lambda: SparsityConfig(layers=("full",), streaming_heads=[[True], [False]]), "layers"),
        (lambda: SparsityConfig.longgen(3).streaming_mask(4, 2), "3 layers"),
        (lambda: SparsityConfig.from_dict({"layers": ["full"], "window": 3}), "unknown"),
        (lambda: SparsityConfig.from_dict({"sink": "x"}), "sink"),
    ],
)
def test_bad_configs_raise_config_error(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_dict_round_trip_is_json():
    config = SparsityConfig.longgen(
        4,
        sparse="strided",
        vert_stride=2,
        block=128,
        streaming_heads=[[False, False], [True, False], [False, False], [False, False]],
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert SparsityConfig.from_dict(data) == config
    assert SparsityConfig.from_dict(data, backend="reference").backend == "reference"


def test_save_and_load_keep_the_architecture(tmp_path):
    duo = [[False, False], [True, False], [False, False]]
    sparsity = SparsityConfig.longgen(3, sink=4, local=8, streaming_heads=duo, token_budget=None)
    model = VisionLanguageModel.random(config_of(3), sparsity=sparsity)
    loaded = load_model(model.save(tmp_path / "hybrid"), tokenizer=False)
    assert loaded.sparsity == model.sparsity
    assert loaded.sparsity.layers == ("streaming", "full", "streaming")
    for a, b in zip(jax.tree.leaves(model.state), jax.tree.leaves(loaded.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # an explicit sparsity= wins over the saved one
    assert load_model(tmp_path / "hybrid", tokenizer=False, sparsity=SparsityConfig()).sparsity.layers is None

    config_json = tmp_path / "hybrid" / "config.json"
    data = json.loads(config_json.read_text())
    data["qv_jax_sparsity"]["layers"] = ["full", "nope", "full"]
    config_json.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path / "hybrid", tokenizer=False)
