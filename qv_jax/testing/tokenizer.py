"""A small trained tokenizer with Qwen's special tokens, for tests, the random-weight demo and benchmarks.

:func:`build_test_tokenizer` trains a byte-level BPE on a built-in corpus with Qwen2's normalizer, pre-tokenizer
and decoder, and puts Qwen's special tokens at the ids a model config expects, so transformers' ``AutoTokenizer``
and :class:`qv_jax.model.tokenizer.Tokenizer` read it alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors, trainers

from qv_jax.errors import InputError
from qv_jax.model.config import ModelConfig, token_ids
from qv_jax.model.tokenizer import QWEN_SPECIAL_TOKENS, Tokenizer

__all__ = ["build_test_tokenizer", "special_ids_from_config", "write_tokenizer"]

# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation runs, newlines, spaces); the
# byte-level step after it runs without its own regex. transformers' Qwen2Tokenizer rebuilds exactly this pipeline.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Training text for the test tokenizer: everyday English about videos, numbers and punctuation, so common words and
# the chat template's own words become single tokens while anything else still encodes byte by byte.
_CORPUS = """\
You are a helpful assistant. Answer the question about the video in one short sentence.
What happens in the video? A man in a red jacket walks across the street and opens the door of a blue car.
How many people appear in the first minute? Three people appear: two children and an old woman with a dog.
Where does the scene take place? It takes place in a small kitchen with white walls and a wooden table.
When does the train arrive at the station? The train arrives after 12 minutes, at 10:45 in the morning.
Describe the weather. It is raining, the sky is grey, and the streets are wet and shining under the lights.
Which object falls from the shelf? A glass bottle falls from the top shelf and breaks on the floor.
Why is the audience clapping? Because the speaker has just finished her talk about the history of music.
What color is the bird on the fence? The bird is yellow with black wings; it flies away when the cat jumps.
Count the cars that pass the camera: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 cars pass in 30 seconds.
The video shows a cooking lesson. First the chef cuts onions, then she fries them in oil for 5 minutes.
At the end of the clip, the players shake hands and the score on the board reads 3 to 2.
Is the person in the video happy or sad? The person smiles and laughs, so they look happy.
The camera moves slowly from left to right, showing mountains, a lake, and a house near the water.
Summarize the lecture: the teacher explains how plants use sunlight, water and air to grow.
Options: (A) a dog (B) a cat (C) a horse (D) a bird. Answer with the letter of the correct option.
The best answer is (B). The answer is no. The answer is yes. I don't know, it's not shown.
Frame 0, frame 1, frame 2 ... frame 64: the lights turn on, the room gets brighter, the children wake up.
"""


def special_ids_from_config(config: Mapping) -> dict[str, int]:
    """Special-token ids a Qwen2.5-VL / Qwen2-VL ``config.json`` (as a dict) fixes, keyed by token string.

    ``image_token_id``, ``video_token_id``, ``vision_start_token_id``, ``vision_end_token_id``, ``vision_token_id``
    (``<|vision_pad|>``), ``eos_token_id`` (``<|im_end|>``) and ``bos_token_id`` (``<|endoftext|>``), read from the
    top level or from ``text_config``.
    """
    text_config = config.get("text_config") or {}
    keys = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
        "eos_token_id": "<|im_end|>",
        "bos_token_id": "<|endoftext|>",
    }
    ids = {}
    for key, token in keys.items():
        value = config.get(key, text_config.get(key))
        if value is not None:
            ids[token] = token_ids(value)[0]
    return ids


def build_test_tokenizer(
    out_dir: str | Path, vocab_size: int = 1024, *, special_ids: Mapping[str, int] | None = None
) -> Tokenizer:
    """Train a small byte-level BPE with Qwen's special tokens; write ``tokenizer.json`` + ``tokenizer_config.json``.

    The tokenizer uses Qwen2's normalizer, pre-tokenizer and decoder, so transformers' ``AutoTokenizer`` (which
    rebuilds Qwen2Tokenizer's pipeline from the vocabulary and merges) encodes exactly as :class:`Tokenizer` does.

    Args:
      out_dir: directory to write into (created if needed).
      vocab_size: the model's vocabulary size; every id is below it. At least 256 bytes + 14 special tokens.
      special_ids: ids for some of :data:`QWEN_SPECIAL_TOKENS`, e.g. ``special_ids_from_config(config)``; the
        others take the highest free ids, in Qwen's order. By default all sit at the top of the vocabulary.
    Returns:
      The written tokenizer, loaded with :meth:`Tokenizer.from_dir`.
    """
    fixed = dict(special_ids or {})
    unknown = sorted(set(fixed) - set(QWEN_SPECIAL_TOKENS))
    if unknown:
        raise InputError(f"special_ids: {unknown} are not Qwen special tokens ({', '.join(QWEN_SPECIAL_TOKENS)})")
    min_size = 256 + len(QWEN_SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise InputError(f"vocab_size={vocab_size} is below {min_size}: 256 byte tokens + the Qwen special tokens")
    bad = {t: i for t, i in fixed.items() if not 0 <= i < vocab_size}
    if bad:
        raise InputError(f"special_ids {bad} are outside the vocabulary [0, {vocab_size})")
    if len(set(fixed.values())) != len(fixed):
        raise InputError(f"special_ids give two tokens the same id: {fixed}")
    free = sorted(set(range(vocab_size)) - set(fixed.values()))
    rest = [t for t in QWEN_SPECIAL_TOKENS if t not in fixed]
    special = {**fixed, **dict(zip(rest, free[len(free) - len(rest) :], strict=True))}
    regular_ids = free[: len(free) - len(rest)]

    trained = tokenizers.Tokenizer(tokenizers.models.BPE())
    _set_qwen2_pipeline(trained)
    trainer = trainers.BpeTrainer(
        vocab_size=len(regular_ids), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    model = json.loads(trained.to_str())["model"]
    # Regular tokens take the ids the special tokens leave free; the special tokens sit in the BPE vocabulary at
    # their fixed ids (no merge produces them), so registering them as added tokens keeps those ids.
    vocab = {token: regular_ids[i] for token, i in model["vocab"].items()}
    vocab.update(special)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    _set_qwen2_pipeline(backend)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in sorted(special.items(), key=lambda item: item[1])
        },
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 32768,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return Tokenizer.from_dir(out)


def _set_qwen2_pipeline(backend: tokenizers.Tokenizer) -> None:
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)


def write_tokenizer(out_dir: str | Path, config: ModelConfig) -> Tokenizer:
    """:func:`build_test_tokenizer` for ``config``: its vocabulary size and special-token ids."""
    from qv_jax.converters.hf_config import config_to_hf

    return build_test_tokenizer(
        out_dir, config.text.vocab_size, special_ids=special_ids_from_config(config_to_hf(config))
    )
