"""The original Qwen2.5-VL multimodal position rule, pinned by hand-computed tables (issue 9).

Token ids below follow Qwen's layout; text tokens are a filler id. A block is ``<|vision_start|>`` + pads, and the
``<|vision_end|>`` after it is ordinary text for the position rule.
"""

from __future__ import annotations

import numpy as np
import pytest

from qv_jax.errors import InputError
from qv_jax.model.rope_index import (
    decode_position_ids,
    get_rope_index,
    temporal_indices,
    text_position_block,
    vision_position_block,
    vision_token_count,
)

VISION_START, VISION_END, IMAGE, VIDEO, TEXT, PAD = 151652, 151653, 151655, 151656, 1000, 151643
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START)


def prompt(*segments) -> list[int]:
    """Token ids from segments: an int is that many text tokens; ("image"|"video", grid) is a vision block."""
    ids: list[int] = []
    for seg in segments:
        if isinstance(seg, int):
            ids += [TEXT] * seg
        else:
            kind, grid = seg
            ids += [VISION_START] + [IMAGE if kind == "image" else VIDEO] * vision_token_count(grid)
    return ids


def text(start: int, n: int) -> list[list[int]]:
    return [list(range(start, start + n))] * 3


def block(t_ids: list[int], h_ids: list[int], w_ids: list[int]) -> list[list[int]]:
    """A vision block's columns in merger order (t outer, then rows, then columns) from per-axis ids."""
    cols = [(t, h, w) for t in t_ids for h in h_ids for w in w_ids]
    return [list(axis) for axis in zip(*cols, strict=True)]


def table(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(p) for p in parts], axis=1)


def test_issue_example_text_after_video_at_max_plus_one():
    # 7 text tokens + <|vision_start|> at 0..7; video grid (3, 6, 8) -> 3 x 3 x 4 tokens at start 8;
    # temporal ids trunc(i * 1.0 * 2) = 0, 2, 4 -> 8, 10, 12; the text after starts at max + 1 = 13.
    ids = prompt(7, ("video", (3, 6, 8)), 3)
    pos, deltas = get_rope_index([ids], video_grid_thw=[[3, 6, 8]], second_per_grid_ts=[1.0], **IDS)
    expected = table(text(0, 8), block([8, 10, 12], [8, 9, 10], [8, 9, 10, 11]), text(13, 3))
    np.testing.assert_array_equal(pos[:, 0], expected)
    assert pos.shape == (3, 1, len(ids)) and pos.dtype == np.int32
    assert deltas.tolist() == [[16 - len(ids)]]


# text (3 + vision_start) - image (1, 4, 6) - text (vision_end, 2, vision_start) - video (4, 2, 4) - text (3):
# the video's temporal offsets trunc(i * s * 2) for i = 0..3, and where the text after it starts.
@pytest.mark.parametrize(
    ("second_per_grid_t", "t_offsets", "text_after"),
    [(1.0, [0, 2, 4, 6], 18), (0.5, [0, 1, 2, 3], 15), (2.0, [0, 4, 8, 12], 24), (0.25, [0, 0, 1, 1], 13)],
)
def test_text_image_text_video_text(second_per_grid_t, t_offsets, text_after):
    ids = prompt(3, ("image", (1, 4, 6)), 3, ("video", (4, 2, 4)), 3)
    pos, deltas = get_rope_index(
        np.asarray([ids]),
        image_grid_thw=np.asarray([[1, 4, 6]]),
        video_grid_thw=np.asarray([[4, 2, 4]]),
        second_per_grid_ts=np.asarray([second_per_grid_t]),
        **IDS,
    )
    expected = table(
        text(0, 4),
        block([4], [4, 5], [4, 5, 6]),  # image: 2 x 3 tokens at 4, temporal offset 0; max 6
        text(7, 4),
        block([11 + k for k in t_offsets], [11], [11, 12]),  # video: 4 x 1 x 2 tokens at 11
        text(text_after, 3),
    )
    np.testing.assert_array_equal(pos[:, 0], expected)
    assert deltas.tolist() == [[text_after + 3 - len(ids)]]


def test_several_videos_and_images_each_with_own_interval():
    # video A (2, 2, 2) s=0.5 at 2; image (1, 2, 2) at 5; video B (3, 2, 2) s=2.0 at 8; video C (2, 4, 4) s=0.25.
    ids = prompt(1, ("video", (2, 2, 2)), 1, ("image", (1, 2, 2)), 2, ("video", (3, 2, 2)), 1, ("video", (2, 4, 4)), 2)
    pos, deltas = get_rope_index(
        [ids],
        image_grid_thw=[[1, 2, 2]],
        video_grid_thw=[[2, 2, 2], [3, 2, 2], [2, 4, 4]],
        second_per_grid_ts=[0.5, 2.0, 0.25],
        **IDS,
    )
    expected = table(
        text(0, 2),
        block([2, 3], [2], [2]),  # A: trunc(i * 0.5 * 2) = 0, 1
        text(4, 2),
        block([6], [6], [6]),  # image (1, 2, 2): one token
        text(7, 3),
        block([10, 14, 18], [10], [10]),  # B: trunc(i * 2.0 * 2) = 0, 4, 8
        text(19, 2),
        block([21, 21], [21, 22], [21, 22]),  # C: trunc(i * 0.25 * 2) = 0, 0; spatial 2 x 2
        text(23, 2),
    )
    np.testing.assert_array_equal(pos[:, 0], expected)
    assert deltas.tolist() == [[25 - len(ids)]]


def test_fractional_intervals_do_not_collapse_and_match_float32_reference():
    # 0.3 s per temporal patch: trunc(i * 0.6) = 0, 0, 1, 1, 2, 3 — not i * trunc(0.6) = 0.
    assert temporal_indices(6, 0.3, 2).tolist() == [0, 0, 1, 1, 2, 3]
    # sample_fps 18/7 -> 7/9 s per patch: 9 * 7/9 * 2 is 13.999... in float64 but 14 in the reference's float32.
    assert temporal_indices(10, 2 / (18 / 7), 2)[9] == 14
    torch = pytest.importorskip("torch")
    for fps in (1.0, 2.0, 2.5, 3.0, 18 / 7, 29.97 / 15, 0.7, 7.5):
        seconds = 2 / fps
        reference = (torch.arange(64).view(-1, 1) * torch.tensor([seconds])[0] * 2).long().view(-1)
        np.testing.assert_array_equal(temporal_indices(64, seconds, 2), reference.numpy(), err_msg=f"fps {fps}")


def test_images_use_temporal_offset_zero_and_videos_default_to_one_second():
    # The reference sets second_per_grid_t = 0 for images, so every temporal patch of an image sits at `start`.
    image = vision_position_block((2, 2, 2), 5, is_image=True)
    np.testing.assert_array_equal(image, [[5, 5], [5, 5], [5, 5]])
    video = vision_position_block((3, 2, 2), 5)  # no second_per_grid_t: 1.0 s -> offsets 0, 2, 4
    np.testing.assert_array_equal(video, [[5, 7, 9], [5, 5, 5], [5, 5, 5]])
    ids = prompt(2, ("video", (3, 2, 2)), 1)
    pos, _ = get_rope_index([ids], video_grid_thw=[[3, 2, 2]], **IDS)
    np.testing.assert_array_equal(pos[:, 0], table(text(0, 3), [[3, 5, 7], [3, 3, 3], [3, 3, 3]], text(8, 1)))


def test_qwen2_vl_rule_uses_the_temporal_index():
    ids = prompt(2, ("image", (2, 2, 4)), 1, ("video", (3, 2, 2)), 2)
    pos, deltas = get_rope_index(
        [ids], image_grid_thw=[[2, 2, 4]], video_grid_thw=[[3, 2, 2]], tokens_per_second=None, **IDS
    )
    expected = table(
        text(0, 3),
        block([3, 4], [3], [3, 4]),  # image with t = 2 gets temporal 0, 1 under Qwen2-VL
        text(5, 2),
        block([7, 8, 9], [7], [7]),
        text(10, 2),
    )
    np.testing.assert_array_equal(pos[:, 0], expected)
    assert deltas.tolist() == [[12 - len(ids)]]
    with pytest.raises(InputError, match="Qwen2-VL"):
        get_rope_index([ids], video_grid_thw=[[3, 2, 2]], second_per_grid_ts=[1.0], tokens_per_second=None, **IDS)


def test_left_padded_batch_matches_rows_alone_and_continues_decoding():
    row0 = prompt(2, ("video", (2, 2, 4)), 2)
    row1 = prompt(1, ("image", (1, 2, 2)), 1, ("video", (4, 2, 2)), 3)
    length = len(row1)
    pad = length - len(row0)
    ids = np.asarray([[PAD] * pad + row0, row1])
    mask = np.asarray([[0] * pad + [1] * len(row0), [1] * length])
    pos, deltas = get_rope_index(
        ids, [[1, 2, 2]], [[2, 2, 4], [4, 2, 2]], [1.0, 0.5], mask, spatial_merge_size=2, **IDS
    )
    alone0, _ = get_rope_index([row0], video_grid_thw=[[2, 2, 4]], second_per_grid_ts=[1.0], **IDS)
    alone1, _ = get_rope_index([row1], [[1, 2, 2]], [[4, 2, 2]], [0.5], **IDS)
    np.testing.assert_array_equal(pos[:, 0, pad:], alone0[:, 0])
    np.testing.assert_array_equal(pos[:, 0, :pad], 1)  # padding gets position 1, as in the reference
    np.testing.assert_array_equal(pos[:, 1], alone1[:, 0])
    # row 0: text 0..2, video at 3 (temporal 3, 5; w 3, 4), text 6, 7 -> next 8.
    np.testing.assert_array_equal(alone0[:, 0], table(text(0, 3), block([3, 5], [3], [3, 4]), text(6, 2)))
    # row 1: text 0, 1, image at 2, text 3, 4, video at 5 (temporal 5..8 for 0.5 s), text 9..11 -> next 12.
    np.testing.assert_array_equal(
        alone1[:, 0], table(text(0, 2), block([2], [2], [2]), text(3, 2), block([5, 6, 7, 8], [5], [5]), text(9, 3))
    )
    assert deltas.tolist() == [[8 - length], [12 - length]]
    # Decoding continues at cache length (padding included) + rope delta, on all three axes.
    np.testing.assert_array_equal(decode_position_ids(length, deltas, 2), [[[8, 9], [12, 13]]] * 3)
    np.testing.assert_array_equal(decode_position_ids(np.asarray([length, length + 1]), deltas)[0], [[8], [13]])


def test_text_only_prompts_follow_the_reference_text_branch():
    pos, deltas = get_rope_index([[TEXT] * 4], **IDS)
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(4), (3, 1, 4)))
    assert deltas.tolist() == [[0]]
    mask = [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    pos, deltas = get_rope_index([[PAD, PAD, TEXT, TEXT, TEXT], [TEXT] * 5], attention_mask=mask, **IDS)
    np.testing.assert_array_equal(pos[0], [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert deltas.tolist() == [[-2], [0]]


def test_group_slices_of_a_video_block_keep_global_temporal_ids():
    # Group-wise prefill of a (4, 4, 4) video in 2 groups of 2 temporal patches (2 x 2 tokens each): each group's
    # positions are a column slice of the whole-video block, so the second group starts at trunc(2 * 0.25 * 2) = 1.
    whole = vision_position_block((4, 4, 4), 10, second_per_grid_t=0.25)
    first, second = whole[:, :8], whole[:, 8:]
    np.testing.assert_array_equal(first, block([10, 10], [10, 11], [10, 11]))
    np.testing.assert_array_equal(second, block([11, 11], [10, 11], [10, 11]))
    np.testing.assert_array_equal(text_position_block(2, int(whole.max()) + 1), text(12, 2))


def test_bad_inputs_raise_input_errors():
    ids = prompt(2, ("video", (2, 2, 2)), 1)
    with pytest.raises(InputError, match="needs exactly 4 pad tokens at position 3, found a run of 2"):
        get_rope_index([ids], video_grid_thw=[[2, 2, 4]], **IDS)
    with pytest.raises(InputError, match="needs exactly 2 pad tokens at position 3, found a run of 4"):
        get_rope_index([prompt(2, ("video", (4, 2, 2)), 1)], video_grid_thw=[[2, 2, 2]], **IDS)
    with pytest.raises(InputError, match="more video blocks"):
        get_rope_index([ids + ids], video_grid_thw=[[2, 2, 2]], **IDS)
    with pytest.raises(InputError, match="1 video blocks, but 0 image_grid_thw and 2 video_grid_thw"):
        get_rope_index([ids], video_grid_thw=[[2, 2, 2], [2, 2, 2]], **IDS)
    with pytest.raises(InputError, match="second_per_grid_ts has 2 entries for 1 videos"):
        get_rope_index([ids], video_grid_thw=[[2, 2, 2]], second_per_grid_ts=[1.0, 1.0], **IDS)
    with pytest.raises(InputError, match="no image_grid_thw/video_grid_thw"):
        get_rope_index([ids], **IDS)
    with pytest.raises(InputError, match="not divisible"):
        get_rope_index([ids], video_grid_thw=[[2, 3, 2]], **IDS)
    with pytest.raises(InputError, match=r"\[B, T\]"):
        get_rope_index(ids, video_grid_thw=[[2, 2, 2]], **IDS)
    with pytest.raises(InputError, match="attention_mask"):
        get_rope_index([ids], video_grid_thw=[[2, 2, 2]], attention_mask=[[1, 1]], **IDS)


# --- where transformers 5.x (installed: 5.24) agrees with the original rule and where it does not -----------------


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=8,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 0], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=1, hidden_size=8, num_heads=2, intermediate_size=8, out_hidden_size=8, tokens_per_second=2
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2_5_VLModel(config).eval()


def hf_rope_index(model, ids, image_grids=None, video_grids=None, seconds=None, mask=None):
    import torch

    ids_t = torch.tensor(ids)
    token_types = (ids_t == IMAGE).int() + 2 * (ids_t == VIDEO).int()
    as_t = lambda x: None if x is None else torch.tensor(x)  # noqa: E731
    pos, deltas = model.get_rope_index(
        ids_t, token_types, as_t(image_grids), as_t(video_grids), as_t(seconds), as_t(mask)
    )
    return pos.numpy(), deltas.numpy()


def test_transformers_5_differs_after_a_multi_patch_video(hf_model):
    ids = prompt(7, ("video", (3, 6, 8)), 3)
    ours, our_deltas = get_rope_index([ids], video_grid_thw=[[3, 6, 8]], second_per_grid_ts=[1.0], **IDS)
    theirs, their_deltas = hf_rope_index(hf_model, [ids], video_grids=[[3, 6, 8]], seconds=[1.0])
    video = slice(8, 8 + 36)
    np.testing.assert_array_equal(theirs[:, :, : video.stop], ours[:, :, : video.stop])  # same up to the video end
    assert ours[:, 0, video.stop].tolist() == [13] * 3  # original: max(12) + 1
    assert theirs[:, 0, video.stop].tolist() == [12] * 3  # 5.x: 8 + max(6, 8) / 2, on top of the last patch
    # Decoding continues one past the prompt's last position in both: 16 here, 15 in 5.x.
    assert len(ids) + int(our_deltas[0, 0]) == 16 and len(ids) + int(their_deltas[0, 0]) == 15
    # With a longer interval the 5.x rope_deltas disagree with its own prompt positions: the last temporal patch
    # (8 + 8) outruns the text after the video (12..14), and decoding jumps to 17 instead of continuing at 15.
    theirs, their_deltas = hf_rope_index(hf_model, [ids], video_grids=[[3, 6, 8]], seconds=[2.0])
    assert int(theirs[0, 0, -1]) == 14 and len(ids) + int(their_deltas[0, 0]) == 17
    ours, our_deltas = get_rope_index([ids], video_grid_thw=[[3, 6, 8]], second_per_grid_ts=[2.0], **IDS)
    assert int(ours[0, 0, -1]) == 19 and len(ids) + int(our_deltas[0, 0]) == 20


def test_transformers_5_agrees_on_images_and_single_patch_videos(hf_model):
    ids = np.asarray(
        [
            prompt(3, ("image", (1, 4, 6)), 2, ("video", (1, 6, 4)), 2, ("image", (1, 2, 2)), 3),
            prompt(1, ("video", (1, 2, 8)), 4, ("image", (1, 8, 2)), 2, ("video", (1, 4, 4)), 4),
        ]
    )
    images, videos = [[1, 4, 6], [1, 2, 2], [1, 8, 2]], [[1, 6, 4], [1, 2, 8], [1, 4, 4]]
    seconds = [1.0, 0.5, 2.0]
    ours, our_deltas = get_rope_index(ids, images, videos, seconds, **IDS)
    theirs, their_deltas = hf_rope_index(hf_model, ids, images, videos, seconds)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(our_deltas, their_deltas)
    # Left padding: positions agree on the real tokens (5.x puts 0 on padding, the original 1), but 5.x measures
    # rope_deltas against the unpadded length, the original against the padded one (its cache length).
    rows = [prompt(2, ("image", (1, 4, 6)), 1), prompt(1, ("video", (1, 4, 4)), 6)]
    length = max(map(len, rows))
    padded = np.asarray([[PAD] * (length - len(r)) + r for r in rows])
    mask = np.asarray([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    ours, our_deltas = get_rope_index(padded, [[1, 4, 6]], [[1, 4, 4]], [1.0], mask, **IDS)
    theirs, their_deltas = hf_rope_index(hf_model, padded, [[1, 4, 6]], [[1, 4, 4]], [1.0], mask)
    np.testing.assert_array_equal(ours[:, mask == 1], theirs[:, mask == 1])
    np.testing.assert_array_equal(our_deltas, their_deltas - (length - mask.sum(1, keepdims=True)))
