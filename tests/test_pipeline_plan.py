"""Group plan: token layout, positions of the whole unpruned prompt by the original rule, keep budgets, errors."""

import numpy as np
import pytest

from qv_jax.errors import ConfigError, InputError
from qv_jax.model.rope_index import get_rope_index
from qv_jax.pipeline.plan import keep_counts, make_group_plan
from qv_jax.testing import tiny_config

CONFIG = tiny_config()
PREFIX = np.array([7, 8, 9, CONFIG.vision_start_token_id], np.int32)


def _plan(config=CONFIG, prefix=PREFIX, **kw):
    args = dict(
        num_frames=20,
        height=112,
        width=168,
        sample_fps=3.3,
        group_frames=8,
        retention=0.5,
        prune="key_norms_small",
    )
    return make_group_plan(config, prefix, **(args | kw))


@pytest.mark.parametrize("variant", ["qwen2_5_vl", "qwen2_vl"])
def test_group_positions_are_the_whole_prompt_positions(variant):
    config = tiny_config(variant)
    plan = _plan(config)
    assert plan.grid == (10, 8, 12) and plan.tokens_per_group == 4 * 4 * 6
    np.testing.assert_array_equal(plan.group_tokens, [96, 96, 48])  # 8 + 8 + 4 frames: the last group is short
    suffix = np.array([CONFIG.vision_end_token_id, 11, 12, 13], np.int32)
    ids = np.concatenate([PREFIX, np.full(plan.video_tokens, config.video_token_id, np.int32), suffix])
    seconds = None if variant == "qwen2_vl" else [2 / 3.3]
    expected, deltas = get_rope_index(
        ids[None],
        video_grid_thw=[plan.grid],
        second_per_grid_ts=seconds,
        spatial_merge_size=2,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        tokens_per_second=config.rope_tokens_per_second,
    )
    expected = expected[:, 0]
    np.testing.assert_array_equal(plan.prefix_positions, expected[:, : plan.prefix_len])
    video = np.concatenate([plan.group_positions[g][:, : plan.group_tokens[g]] for g in range(plan.num_groups)], axis=1)
    np.testing.assert_array_equal(video, expected[:, plan.prefix_len : plan.suffix_start])
    np.testing.assert_array_equal(plan.text_positions(suffix.size), expected[:, plan.suffix_start :])
    # decoding continues after the whole prompt's largest position, however many tokens are pruned
    assert plan.text_start + suffix.size == ids.size + int(deltas[0, 0])
    # padding of the short group repeats its last real position; token indices run on in prompt order
    last = plan.num_groups - 1
    assert (plan.group_positions[last][:, 48:] == plan.group_positions[last][:, 47:48]).all()
    np.testing.assert_array_equal(plan.group_token_index(1), plan.prefix_len + 96 + np.arange(96))
    assert plan.group_valid(last).sum() == 48 and plan.group_valid(0).all()


def test_keep_counts_round_up_per_group_and_decay_per_layer():
    keep = keep_counts(np.array([30, 30, 7]), 3, retention=0.1, layer_decay=None, prune="key_norms")
    np.testing.assert_array_equal(keep, [[3, 3, 3], [3, 3, 3], [1, 1, 1]])  # 0.1 * 30 is 3, not 4
    keep = keep_counts(np.array([64, 32]), 2, retention=0.3, layer_decay=0.5, prune="random")
    np.testing.assert_array_equal(keep, [[20, 10], [10, 5]])
    assert keep_counts(np.array([5, 2]), 2, retention=0.01, layer_decay=0.1, prune="key_norms").min() == 1
    np.testing.assert_array_equal(
        keep_counts(np.array([9, 4]), 2, retention=0.2, layer_decay=None, prune="none"), [[9, 9], [4, 4]]
    )


def test_memory_size_and_capacity():
    plan = _plan(retention=0.25, layer_decay=0.5)
    np.testing.assert_array_equal(plan.keep, [[24, 12], [24, 12], [12, 6]])
    np.testing.assert_array_equal(plan.memory_tokens, [4 + 60, 4 + 30])
    # the last group writes all its 96 slots (and a ride-along question) behind 4 + 48 tokens of layer 0
    assert plan.capacity() == 4 + 48 + 96
    assert plan.capacity(ride_along=40, answer=40) == 4 + 48 + 96 + 40
    assert _plan(retention=1.0).capacity(answer=500) == 4 + 240 + 500


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"group_frames": 3}, ConfigError, "multiple of the temporal patch size"),
        ({"group_frames": 0}, ConfigError, "group_frames"),
        ({"retention": 0.0}, ConfigError, "retention"),
        ({"retention": 1.5}, ConfigError, "retention"),
        ({"layer_decay": 0.0}, ConfigError, "layer_decay"),
        ({"prune": "attention"}, ConfigError, "prune must be one of"),
        ({"num_frames": 7}, InputError, "multiple of 2 frames"),
        ({"height": 100}, InputError, "not multiples of 28"),
        ({"sample_fps": 0.0}, InputError, "sample_fps"),
    ],
)
def test_bad_settings_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        _plan(**kwargs)


def test_prefix_must_end_with_vision_start():
    with pytest.raises(InputError, match="vision_start"):
        _plan(prefix=PREFIX[:-1])
