"""Model configs: both HF config styles, presets against the released config files, serialisation, bad configs."""

import json

import pytest
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from qv_jax.converters.hf_config import config_from_hf, config_to_hf
from qv_jax.errors import ConfigError
from qv_jax.model.config import ModelConfig
from qv_jax.testing import tiny_config

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (hub style: flat text fields, rope_scaling + rope_theta).
HUB_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

PRESETS = {
    "qwen2_5_vl_3b": ModelConfig.qwen2_5_vl_3b,
    "qwen2_5_vl_7b": ModelConfig.qwen2_5_vl_7b,
    "qwen2_vl_7b": ModelConfig.qwen2_vl_7b,
    "tiny": tiny_config,
    "tiny_qwen2_vl": lambda: tiny_config("qwen2_vl"),
}


def test_hub_config_file_reads_as_the_3b_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_3B))
    assert config_from_hf(tmp_path) == ModelConfig.qwen2_5_vl_3b()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_survive_both_transformers_config_styles(name):
    preset = PRESETS[name]()
    ours = config_to_hf(preset)  # transformers 5 style: text_config + rope_parameters
    assert config_from_hf(ours) == preset
    hf_cls = Qwen2_5_VLConfig if preset.variant == "qwen2_5_vl" else Qwen2VLConfig
    hf = hf_cls(**ours)
    assert hf.text_config.num_key_value_heads == preset.text.num_kv_heads
    assert config_from_hf(hf.to_dict()) == preset
    # the same model in the hub's flat style
    flat = {**ours, **{k: v for k, v in ours["text_config"].items() if k != "rope_parameters"}}
    del flat["text_config"]
    rope = ours["text_config"]["rope_parameters"]
    flat |= {
        "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
        "rope_theta": rope["rope_theta"],
    }
    flat["model_type"] = preset.variant
    assert config_from_hf(flat) == preset
    assert ModelConfig.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset


def test_presets_have_the_released_sizes():
    c7 = ModelConfig.qwen2_5_vl_7b()
    assert (c7.text.num_heads, c7.text.num_kv_heads, c7.text.head_dim) == (28, 4, 128)
    assert (c7.vision.head_dim, c7.vision.out_hidden_size, c7.text.tie_word_embeddings) == (80, 3584, False)
    q2 = ModelConfig.qwen2_vl_7b()
    assert (q2.vision.hidden_act, q2.vision.intermediate_size, q2.rope_tokens_per_second) == ("quick_gelu", 5120, None)
    assert all(q2.vision.is_full_attention(i) for i in range(q2.vision.depth))
    assert [i for i in range(32) if c7.vision.is_full_attention(i)] == [7, 15, 23, 31]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_sliding_window": True}, "sliding"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0, "mrope_section": [16, 24, 24]}}, "yarn"),
        ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 20]}}, "mrope_section"),
        ({"model_type": "qwen3_vl"}, "qwen3_vl"),
        ({"num_key_value_heads": 3}, "num_kv_heads"),
        ({"video_token_id": 999999}, "outside the vocabulary"),
    ],
)
def test_bad_configs_raise_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf({**HUB_3B, **change})


def test_missing_or_broken_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no such config"):
        config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in HUB_3B.items() if k != "vocab_size"}))
    with pytest.raises(ConfigError, match="vocab_size"):
        config_from_hf(tmp_path)
