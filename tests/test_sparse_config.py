"""SparsityConfig: DuoAttention pattern import (quantile threshold), validation, and retrieval-first head reordering
of a model state that leaves the model's function unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qv_jax.attention import SparsityConfig, load_duo_attention_heads, reorder_heads
from qv_jax.attention.heads import head_permutations
from qv_jax.errors import ConfigError
from qv_jax.model.qwen2_5_vl import ChunkAttention, random_state
from qv_jax.testing import tiny_config

CONFIG = tiny_config()


def write_tsv(path, gates):
    np.savetxt(path, np.asarray(gates), delimiter="\t")
    return path


def test_quantile_threshold_matches_duo_attention_on_distinct_gates(tmp_path):
    gates = np.random.default_rng(0).random((6, 4))
    path = write_tsv(tmp_path / "full_attention_heads.tsv", gates)
    for sparsity in (0.0, 0.25, 0.5, 0.7, 1.0):
        got = load_duo_attention_heads(tmp_path, sparsity=sparsity)
        threshold = np.quantile(gates, sparsity)
        want = gates < threshold if 0 < sparsity < 1 else np.full(gates.shape, sparsity >= 1)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(load_duo_attention_heads(path, sparsity=sparsity), got)


def test_ties_at_the_threshold_are_broken_by_position_and_gates_are_clipped(tmp_path):
    # eight heads, five gates tied at 1.0 (above 1 clips to 1): half sparsity takes ceil(0.5 * 7) = 4 heads
    gates = [[0.2, 1.0, 1.3, 1.0], [1.0, -0.1, 1.0, 0.6]]
    write_tsv(tmp_path / "full_attention_heads.tsv", gates)
    got = load_duo_attention_heads(tmp_path, sparsity=0.5)
    np.testing.assert_array_equal(got, [[True, True, False, False], [False, True, False, True]])
    np.testing.assert_array_equal(
        load_duo_attention_heads(tmp_path, threshold=0.5), [[True, False, False, False], [False, True, False, False]]
    )
    cfg = SparsityConfig.from_duo_attention(tmp_path, sparsity=0.5, sink=4)
    assert cfg.sink == 4 and np.array_equal(cfg.streaming_mask(2, 4), got)


def test_bad_pattern_files_raise(tmp_path):
    with pytest.raises(ConfigError, match="no DuoAttention pattern"):
        load_duo_attention_heads(tmp_path, sparsity=0.5)
    (tmp_path / "full_attention_heads.tsv").write_text("0.5\tabc\n")
    with pytest.raises(ConfigError, match="tab-separated"):
        load_duo_attention_heads(tmp_path, sparsity=0.5)
    write_tsv(tmp_path / "full_attention_heads.tsv", [[0.1, 0.9]])
    with pytest.raises(ConfigError, match="exactly one"):
        load_duo_attention_heads(tmp_path, sparsity=0.5, threshold=0.5)
    with pytest.raises(ConfigError, match="sparsity must be"):
        load_duo_attention_heads(tmp_path, sparsity=1.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"page_size": 48, "logical_page_size": 32}, "multiple of logical_page_size"),
        ({"token_budget": 100}, "token_budget"),
        ({"token_budget": 64}, "two pages"),
        ({"local": 0}, "local >= 1"),
        ({"reselect_every": 0}, "reselect_every"),
        ({"backend": "cuda"}, "backend"),
        ({"streaming_heads": [[0, 2]]}, "boolean"),
        ({"streaming_heads": [True, False]}, "layers, kv_heads"),
    ],
)
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SparsityConfig(**kwargs)


def test_config_is_hashable_and_checks_the_model_shape():
    a = SparsityConfig(streaming_heads=np.array([[True, False], [False, False]]))
    b = SparsityConfig(streaming_heads=[[1, 0], [0, 0]])
    assert a == b and hash(a) == hash(b)
    assert a.retrieval_heads(2, 2) == (1, 2)
    assert a.retrieval_first().streaming_heads == ((False, True), (False, False))
    with pytest.raises(ConfigError, match="3 layers"):
        a.streaming_mask(3, 2)
    assert SparsityConfig().capacity_multiple == 2048 and SparsityConfig().stream_slots == 320


def logits(graphdef, state, ids):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), (3, *ids.shape))
    h = model.text(model.text.embed_tokens(ids), positions, ChunkAttention())
    return np.asarray(model.text.logits(h))


def test_reordering_heads_keeps_the_model_function_and_the_input_state():
    graphdef, state = random_state(CONFIG, seed=3)
    t = CONFIG.text
    mask = np.array([[True, False], [False, False]])  # layer 0 swaps its KV heads, layer 1 stays
    before = jax.tree.map(np.asarray, state)
    reordered = reorder_heads(state, mask, num_heads=t.num_heads)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, t.vocab_size, (2, 12)))
    np.testing.assert_allclose(logits(graphdef, reordered, ids), logits(graphdef, state, ids), atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)

    old, new = state["text"]["layers"][0], reordered["text"]["layers"][0]
    np.testing.assert_array_equal(new["k"].get_value()[:, 0], old["k"].get_value()[:, 1])
    np.testing.assert_array_equal(new["v_bias"].get_value()[1], old["v_bias"].get_value()[0])
    # query heads move with their group (2 per KV head), output projection rows too
    np.testing.assert_array_equal(new["q"].get_value()[:, :2], old["q"].get_value()[:, 2:])
    np.testing.assert_array_equal(new["o"].get_value()[2:], old["o"].get_value()[:2])
    np.testing.assert_array_equal(new["k"].get_value(), reorder_heads(reordered, np.sort(mask), num_heads=4)["text"][
        "layers"][0]["k"].get_value())  # fmt: skip
    assert head_permutations(np.sort(mask, axis=1), t.num_heads) == [None, None]
