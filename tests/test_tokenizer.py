"""The tokenizer over `tokenizers`, the Qwen2.5-VL chat prompt, and the small test tokenizer."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from qv_jax.errors import CheckpointError, InputError
from qv_jax.model.rope_index import get_rope_index
from qv_jax.model.tokenizer import (
    QWEN_SPECIAL_TOKENS,
    ImageBlock,
    Tokenizer,
    VideoBlock,
)
from qv_jax.testing import build_test_tokenizer, special_ids_from_config

# The chat template shipped in Qwen/Qwen2.5-VL-7B-Instruct's chat_template.json (identical to Qwen2-VL-7B-Instruct's
# before its `generation` tags), kept here as the reference our Python rendering must reproduce. transformers'
# Qwen2_5_VLProcessor cannot be built here (its video processor needs torchvision, which the test extra does not
# install), so the tests render this template with transformers' jinja and apply the processor's expansion rule
# (each pad becomes t·h·w / merge² pads) themselves.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

TEXTS = [
    "What happens in the video?",
    "  leading spaces, trailing spaces  ",
    "Numbers 1234567 and 3.14159, times 10:45; symbols #@!%&*()[]{}",
    "Newlines\n\nand\ttabs\r\n and it's they'll we've I'm",
    "Unicode: café, naïve, Straße, 中文字幕, 日本語, 🎬🎥, e\u0301 (combining accent)",
    "The answer is (B).",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    build_test_tokenizer(out, vocab_size=1024)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_special_tokens_default_to_the_top_of_the_vocabulary_in_qwen_order(tok):
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert [vocab[t] for t in QWEN_SPECIAL_TOKENS] == list(range(1024 - len(QWEN_SPECIAL_TOKENS), 1024))
    s = tok.special
    assert (s.endoftext, s.im_start, s.im_end) == (1010, 1011, 1012)
    assert (s.vision_start, s.vision_end, s.image_pad, s.video_pad) == (1019, 1020, 1022, 1023)
    assert tok.eos_token_ids == (s.im_end,) and tok.pad_token_id == s.endoftext
    assert tok.vocab_size == 1024 and max(vocab.values()) < 1024


def test_special_ids_follow_a_model_config(tmp_path):
    config = {
        "image_token_id": 300,
        "video_token_id": 301,
        "vision_start_token_id": 298,
        "vision_end_token_id": 299,
        "text_config": {"eos_token_id": 2, "bos_token_id": 1, "vocab_size": 512},
    }
    ids = special_ids_from_config(config)
    assert ids == {
        "<|image_pad|>": 300,
        "<|video_pad|>": 301,
        "<|vision_start|>": 298,
        "<|vision_end|>": 299,
        "<|im_end|>": 2,
        "<|endoftext|>": 1,
    }
    tok = build_test_tokenizer(tmp_path, vocab_size=512, special_ids=ids)
    assert tok.special.image_pad == 300 and tok.special.video_pad == 301 and tok.special.vision_start == 298
    assert tok.special.im_end == 2 and tok.special.endoftext == 1
    # The specials the config does not fix take the highest ids, in Qwen's order.
    assert tok.special.im_start == 512 - 8
    assert tok.backend.token_to_id("<|vision_pad|>") == 511
    assert tok.vocab_size == 512
    assert tok.decode(tok.encode("what is in the video")) == "what is in the video"
    assert tok.encode("<|video_pad|><|im_end|>") == [301, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(vocab_size=200), "below 270"),
        (dict(special_ids={"<|image_pad|>": 5, "<|video_pad|>": 5}), "same id"),
        (dict(special_ids={"<|image|>": 5}), "not Qwen special tokens"),
        (dict(special_ids={"<|image_pad|>": 1024}), "outside the vocabulary"),
    ],
)
def test_build_test_tokenizer_rejects_bad_layouts(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        build_test_tokenizer(tmp_path, **{"vocab_size": 1024, **kwargs})


def test_build_is_deterministic(tmp_path, tok_dir):
    build_test_tokenizer(tmp_path, vocab_size=1024)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)  # Qwen's tokenizer normalizes to NFC


def test_decode_skips_special_tokens_unless_asked(tok):
    ids = tok.encode("<|im_start|>user\nHi<|vision_start|><|video_pad|><|video_pad|><|vision_end|><|im_end|>")
    assert ids[0] == tok.special.im_start and ids.count(tok.special.video_pad) == 2
    assert tok.decode(ids) == "user\nHi"
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user\nHi<|vision_start|><|video_pad|>")


def test_transformers_loads_the_built_tokenizer_and_encodes_the_same_ids(tok, hf_tok):
    assert type(hf_tok).__name__ == "Qwen2Tokenizer"
    for text in [*TEXTS, tok.chat_text([VideoBlock((2, 4, 4)), "Why?"])]:
        assert hf_tok(text, add_special_tokens=True)["input_ids"] == tok.encode(text), text
        ids = tok.encode(text)
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    assert hf_tok.eos_token_id == tok.special.im_end and hf_tok.pad_token_id == tok.pad_token_id
    for token in QWEN_SPECIAL_TOKENS:
        assert hf_tok.convert_tokens_to_ids(token) == tok.token_to_id(token)


def _hf_messages(content, system=None):
    items = []
    for item in content:
        if isinstance(item, ImageBlock):
            items.append({"type": "image"})
        elif isinstance(item, VideoBlock):
            items.append({"type": "video"})
        else:
            items.append({"type": "text", "text": item})
    messages = [{"role": "user", "content": items}]
    return messages if system is None else [{"role": "system", "content": system}, *messages]


CONTENTS = [
    [VideoBlock((4, 6, 8)), "What happens in the video?"],
    [ImageBlock((1, 4, 4)), ImageBlock((1, 2, 6)), VideoBlock((2, 2, 2)), "Is the image in the video?"],
    [VideoBlock((3, 4, 2)), "Describe it.\nAnswer briefly."],
]


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("system", [None, "You answer questions about videos."])
def test_chat_prompt_equals_qwen_template_and_processor_expansion(tok, hf_tok, content, system):
    rendered = hf_tok.apply_chat_template(
        _hf_messages(content, system),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    kwargs = {} if system is None else {"system": system}
    assert tok.chat_text(content, expand=False, **kwargs) == rendered
    # The processor replaces the n-th pad of each kind by t·h·w / merge² copies, then tokenizes the whole text.
    expanded = rendered
    for kind, pad in ((ImageBlock, "<|image_pad|>"), (VideoBlock, "<|video_pad|>")):
        for block in (c for c in content if isinstance(c, kind)):
            t, h, w = block.grid_thw
            expanded = expanded.replace(pad, "<placeholder>" * (t * h * w // 4), 1)
        expanded = expanded.replace("<placeholder>", pad)
    assert tok.chat_text(content, **kwargs) == expanded
    ids = tok.encode_chat(content, **kwargs)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, hf_tok(expanded)["input_ids"])


@pytest.mark.parametrize("images", [(), ((1, 2, 2), (1, 4, 6))])
def test_video_prompt_parts_concatenate_to_the_whole_prompt(tok, images):
    grid = (4, 6, 8)
    prompt = tok.video_prompt("What is the man holding?", grid, image_grid_thw=images)
    whole = tok.encode_chat([*(ImageBlock(g) for g in images), VideoBlock(grid), "What is the man holding?"])
    np.testing.assert_array_equal(prompt.input_ids, whole)
    np.testing.assert_array_equal(
        whole, tok.encode(tok.chat_text([*map(ImageBlock, images), VideoBlock(grid), "What is the man holding?"]))
    )
    start, stop = prompt.video_span
    assert stop - start == 4 * 6 * 8 // 4 == len(prompt.video)
    assert (whole[start:stop] == tok.special.video_pad).all()
    assert prompt.prefix[-1] == tok.special.vision_start and prompt.suffix[0] == tok.special.vision_end
    assert tok.decode(prompt.suffix) == "What is the man holding?\nassistant\n"
    # Another question reuses the prefix and video block; only the suffix changes.
    other = tok.video_prompt("And the woman?", grid, image_grid_thw=images)
    np.testing.assert_array_equal(other.prefix, prompt.prefix)
    np.testing.assert_array_equal(other.suffix, tok.question_suffix("And the woman?"))
    # The prompt is what the position rule expects: each block's pads follow its <|vision_start|>.
    ids = prompt.input_ids[None]
    s = tok.special
    pos, _ = get_rope_index(
        ids,
        image_grid_thw=list(images) or None,
        video_grid_thw=[grid],
        second_per_grid_ts=[1.0],
        image_token_id=s.image_pad,
        video_token_id=s.video_pad,
        vision_start_token_id=s.vision_start,
    )
    first = int(pos[0, 0, start - 1]) + 1  # the block starts one past <|vision_start|>
    assert pos[1, 0, start : start + 4].tolist() == [first] * 4  # first temporal patch, row 0 ...
    assert pos[2, 0, start : start + 4].tolist() == list(range(first, first + 4))  # ... columns 0..3


def test_chat_prompt_rejects_bad_content(tok):
    with pytest.raises(InputError, match="chat content"):
        tok.encode_chat([{"type": "video"}])
    with pytest.raises(InputError, match="not divisible"):
        tok.video_prompt("?", (2, 3, 4))
    with pytest.raises(InputError, match=r"\(t, h, w\)"):
        tok.video_prompt("?", (2, 4))


def test_from_dir_reads_stop_pad_and_merge_size_from_the_model_configs(tmp_path, tok_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    s = tok.special
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [s.im_end, s.endoftext], "pad_token_id": s.endoftext})
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "text_config": {"eos_token_id": s.im_end, "pad_token_id": None},
                "vision_config": {"spatial_merge_size": 1},
            }
        )
    )
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == (s.im_end, s.endoftext)
    assert tok.pad_token_id == s.endoftext
    assert tok.merge_size == 1
    assert len(tok.video_prompt("?", (2, 3, 3)).video) == 18


def test_from_dir_errors_name_the_file(tmp_path, tok_dir):
    with pytest.raises(CheckpointError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "generation_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"generation_config\.json: cannot read JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    plain = json.loads((tok_dir / "tokenizer.json").read_text())
    plain["added_tokens"] = [t for t in plain["added_tokens"] if t["content"] != "<|video_pad|>"]
    del plain["model"]["vocab"]["<|video_pad|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(plain))
    with pytest.raises(CheckpointError, match=r"no <\|video_pad\|> token"):
        Tokenizer.from_dir(tmp_path)
