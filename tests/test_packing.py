"""Prepacking: the best-fit-decreasing packer against a reference, the packed layout, and ``generate_many`` giving
every prompt exactly the tokens it gets alone (greedy, float32), with and without images."""

import bisect

import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.attention import SparsityConfig
from qv_jax.errors import ConfigError, InputError
from qv_jax.model.preprocess import patchify
from qv_jax.runtime import VisionLanguageModel
from qv_jax.runtime.packing import MIN_BIN_TOKENS, best_fit_decreasing, bucket, pack_prompts
from qv_jax.testing import tiny_config

CONFIG = tiny_config()
NEW = 4


@pytest.fixture(scope="module")
def model():
    return VisionLanguageModel.random(CONFIG, seed=1)


def _reference_bfd(lengths, capacity):
    """Best-fit decreasing over a sorted list of (room left, bin): the first entry with enough room is the
    tightest bin, the earliest one among equals."""
    bins, open_bins = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] == 0:
            continue
        at = bisect.bisect_left(open_bins, (lengths[i], -1))
        if at == len(open_bins):
            bins.append([i])
            bisect.insort(open_bins, (capacity - lengths[i], len(bins) - 1))
        else:
            room, b = open_bins.pop(at)
            bins[b].append(i)
            bisect.insort(open_bins, (room - lengths[i], b))
    return bins


@pytest.mark.parametrize("seed", range(6))
def test_packer_matches_reference_best_fit_decreasing_and_splits_nothing(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in np.clip(rng.lognormal(4, 1.2, int(rng.integers(1, 80))), 0, 2000)]
    capacity = max(lengths) if seed % 2 else max(lengths) + int(rng.integers(0, 500))
    capacity = max(capacity, 1)
    bins = best_fit_decreasing(lengths, capacity)
    assert bins == _reference_bfd(lengths, capacity)
    placed = sorted(i for members in bins for i in members)
    assert placed == [i for i, n in enumerate(lengths) if n > 0]  # every item once, whole
    assert all(sum(lengths[i] for i in members) <= capacity for members in bins)


def test_packer_rejects_items_past_the_capacity():
    with pytest.raises(InputError, match="more than the bin capacity of 10"):
        best_fit_decreasing([3, 11, 2], 10)
    with pytest.raises(InputError, match=">= 1"):
        best_fit_decreasing([1], 0)


def test_packed_layout_restarts_positions_per_prompt_and_holds_back_last_tokens():
    prompts = [np.arange(1, 8), np.arange(20, 23), np.array([5]), np.arange(40, 45)]
    positions = [np.broadcast_to(np.arange(p.size), (3, p.size)) for p in prompts]
    packed = pack_prompts(prompts, positions)  # prefills of 6, 2, 0, 4 tokens into bins of 6
    assert packed.ids.shape == (bucket(2), MIN_BIN_TOKENS) and packed.rows == 4
    np.testing.assert_array_equal(packed.length, [6, 2, 0, 4])
    for p, ids in enumerate(prompts):
        b, s, n = packed.bin_of[p], packed.start[p], packed.length[p]
        np.testing.assert_array_equal(packed.ids[b, s : s + n], ids[:-1])
        np.testing.assert_array_equal(packed.positions[:, b, s : s + n], np.broadcast_to(np.arange(n), (3, n)))
    # prompt 1 (2 tokens) and 3 (4 tokens) share a bin as segments 0 and 1; padding is -1
    b = packed.bin_of[3]
    assert packed.bin_of[1] == b
    np.testing.assert_array_equal(packed.segment_ids[b, :7], [0, 0, 0, 0, 1, 1, -1])
    assert (packed.segment_ids[packed.bin_of[0], 6:] == -1).all()


def _alone(model, prompt, **vision):
    ids = np.asarray(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    return model.generate(ids[None], max_new_tokens=NEW, **vision)[0, ids.size :]


@pytest.mark.parametrize(
    "size, seed", [(1, 0)] + [pytest.param(n, s, marks=pytest.mark.slow) for n, s in ((7, 1), (33, 2))]
)
def test_generate_many_gives_each_prompt_its_tokens_alone(model, size, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 501, size)
    lengths[: min(size, 2)] = [1, 500][: min(size, 2)]
    prompts = [rng.integers(10, 500, n) for n in lengths]
    # a stop token the model does produce, so that rows end at different steps
    stop = int(_alone(model, prompts[-1])[1])
    got = model.generate_many(prompts, max_new_tokens=NEW, eos_token_id=[stop])
    assert len(got) == size
    for prompt, tokens in zip(prompts, got, strict=True):
        expected = model.generate(prompt[None], max_new_tokens=NEW, eos_token_id=[stop])[0, prompt.size :]
        np.testing.assert_array_equal(tokens, expected)
    if size == 7:  # the padded baseline gives the same tokens too
        padded = model.generate_many(prompts, max_new_tokens=NEW, eos_token_id=[stop], packing=False)
        for a, b in zip(padded, got, strict=True):
            np.testing.assert_array_equal(a, b)


def _image_prompt(rng, side=56):
    frames = rng.integers(0, 256, (1, side, side, 3), np.uint8)
    pixels, grid = patchify(jnp.asarray(frames), CONFIG.vision, as_images=True)
    tokens = int(np.prod(grid[0])) // CONFIG.vision.spatial_merge_size**2
    image = [CONFIG.vision_start_token_id, *[CONFIG.image_token_id] * tokens, CONFIG.vision_end_token_id]
    ids = np.array([*rng.integers(10, 300, 3), *image, *rng.integers(10, 300, int(rng.integers(1, 30)))])
    return {"input_ids": ids, "pixel_values": np.asarray(pixels), "image_grid_thw": np.array(grid)}


@pytest.mark.slow
def test_generate_many_with_images_matches_each_prompt_alone(model):
    rng = np.random.default_rng(3)
    prompts = [_image_prompt(rng), rng.integers(10, 300, 37), _image_prompt(rng, 84), rng.integers(10, 300, 2)]
    got = model.generate_many(prompts, max_new_tokens=NEW, eos_token_id=[], bin_tokens=256)
    for prompt, tokens in zip(prompts, got, strict=True):
        vision = {k: v for k, v in prompt.items() if k != "input_ids"} if isinstance(prompt, dict) else {}
        np.testing.assert_array_equal(tokens, _alone(model, prompt, eos_token_id=[], **vision))


def test_generate_many_bad_input_raises(model):
    with pytest.raises(InputError, match="non-empty list"):
        model.generate_many([])
    with pytest.raises(InputError, match="prompt 1 is empty"):
        model.generate_many([[1, 2], []])
    with pytest.raises(InputError, match="bin capacity of 8"):
        model.generate_many([list(range(1, 5)), list(range(1, 20))], bin_tokens=8)
    with pytest.raises(InputError, match="context"):
        model.generate_many([[1, 2, 3]], max_new_tokens=CONFIG.text.max_position_embeddings)
    with pytest.raises(InputError, match="vocabulary"):
        model.generate_many([[1, CONFIG.text.vocab_size]])
    with pytest.raises(InputError, match="no pixels"):
        model.generate_many([[1, CONFIG.image_token_id, 2]])
    sparse = VisionLanguageModel.random(CONFIG, sparsity=SparsityConfig(sink=4, local=8))
    with pytest.raises(ConfigError, match="packing=False"):
        sparse.generate_many([[1, 2]])
