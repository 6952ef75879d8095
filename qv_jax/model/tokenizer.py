"""The Qwen2.5-VL tokenizer over the ``tokenizers`` library, and the chat prompt of a question about a video.

No transformers and no jinja2 at runtime: the model directory's ``tokenizer.json`` drives a ``tokenizers.Tokenizer``
and the Qwen2-VL / Qwen2.5-VL chat template is written out in Python. For the content this library sends (a video,
optionally images, and a question in one user turn) it renders exactly what Qwen's template renders, with each
``<|video_pad|>`` / ``<|image_pad|>`` expanded to the grid's token count as the processor does:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|video_pad|>×N<|vision_end|>QUESTION<|im_end|>\\n
    <|im_start|>assistant\\n

The group-wise prefill runs the video in groups and the question last, so a prompt also comes in three parts
(:class:`VideoPrompt`): the prefix up to and including ``<|vision_start|>``, the video's pad block, and the suffix
from ``<|vision_end|>`` to the assistant header. Every part boundary is a special token, and special tokens are
split out before byte-level BPE runs, so the parts encoded alone concatenate to the whole prompt encoded at once —
and the question-independent prefix and video block can be reused for any number of questions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers

from qv_jax.errors import CheckpointError, InputError
from qv_jax.model.rope_index import vision_token_count

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "QWEN_SPECIAL_TOKENS",
    "ImageBlock",
    "SpecialTokenIds",
    "Tokenizer",
    "VideoBlock",
    "VideoPrompt",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# What follows the user's content: the end of the user turn and the header the assistant's answer continues.
_CLOSING = "<|im_end|>\n<|im_start|>assistant\n"

# Qwen2-VL / Qwen2.5-VL special tokens in the order of their ids in the released tokenizer (151643 ... 151656).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens the chat prompt and the position rule use."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int


@dataclass(frozen=True)
class ImageBlock:
    """An image in a chat turn, by its grid of (t, h, w) vision patches (``image_grid_thw`` of the processor)."""

    grid_thw: tuple[int, int, int]


@dataclass(frozen=True)
class VideoBlock:
    """A video in a chat turn, by its grid of (t, h, w) vision patches (``video_grid_thw`` of the processor)."""

    grid_thw: tuple[int, int, int]


Content = str | ImageBlock | VideoBlock


@dataclass(frozen=True)
class VideoPrompt:
    """A chat prompt about one video, in the three parts the group-wise prefill feeds separately (int32 ids).

    ``prefix`` ends with ``<|vision_start|>``, ``video`` is the video's ``<|video_pad|>`` block, ``suffix`` starts
    with ``<|vision_end|>`` and ends with the assistant header. Only the suffix depends on the question.
    """

    prefix: np.ndarray
    video: np.ndarray
    suffix: np.ndarray

    @property
    def input_ids(self) -> np.ndarray:
        """The whole prompt, ``[T]`` int32."""
        return np.concatenate([self.prefix, self.video, self.suffix])

    @property
    def video_span(self) -> tuple[int, int]:
        """``[start, stop)`` of the video's pad tokens in :attr:`input_ids`."""
        return len(self.prefix), len(self.prefix) + len(self.video)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e


def _token_content(token: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or ``{"content": ...}``."""
    if isinstance(token, Mapping):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _as_id_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]  # type: ignore[union-attr]


class Tokenizer:
    """Encode, decode and build chat prompts for Qwen2-VL / Qwen2.5-VL.

    Attributes:
      special: ids of the special tokens (:class:`SpecialTokenIds`).
      eos_token_ids: tokens that end generation (from generation_config.json, tokenizer_config.json, config.json).
      pad_token_id: the token that fills padded positions.
      merge_size: the vision tower's spatial merge (2×2 patches per LLM token), from config.json.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        merge_size: int = 2,
        source: str = "tokenizer",
    ):
        self.backend = backend
        ids = {}
        for name, token in (
            ("endoftext", "<|endoftext|>"),
            ("im_start", "<|im_start|>"),
            ("im_end", "<|im_end|>"),
            ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"),
            ("image_pad", "<|image_pad|>"),
            ("video_pad", "<|video_pad|>"),
        ):
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise CheckpointError(f"{source}: has no {token} token, so it is not a Qwen2-VL / Qwen2.5-VL tokenizer")
            ids[name] = token_id
        self.special = SpecialTokenIds(**ids)
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids) if eos_token_ids else (self.special.im_end,)
        self.pad_token_id: int = self.special.endoftext if pad_token_id is None else int(pad_token_id)
        self.merge_size = int(merge_size)
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` from a model directory, with the eos / pad ids of its JSON configs.

        Stop tokens are the union, in this order, of ``generation_config.json``'s ``eos_token_id``,
        ``tokenizer_config.json``'s ``eos_token`` and ``config.json``'s ``eos_token_id``; the pad token is the first
        of those files that names one, else ``<|endoftext|>``.
        """
        root = Path(model_dir)
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a directory")
        path = root / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the model directory must hold the HF tokenizer.json)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from e
        configs = {
            name: _read_json(root / name) if (root / name).is_file() else {}
            for name in ("generation_config.json", "tokenizer_config.json", "config.json")
        }
        generation, tokenizer_config, model_config = configs.values()
        text_config = model_config.get("text_config") or {}

        def config_value(key: str) -> object:
            return model_config.get(key, text_config.get(key))

        def token_id(token: object) -> list[int]:
            content = _token_content(token)
            found = None if content is None else backend.token_to_id(content)
            return [] if found is None else [found]

        eos: list[int] = []
        for candidate in (
            _as_id_list(generation.get("eos_token_id")),
            token_id(tokenizer_config.get("eos_token")),
            _as_id_list(config_value("eos_token_id")),
        ):
            eos += [i for i in candidate if i not in eos]
        pads = (
            _as_id_list(generation.get("pad_token_id"))
            + token_id(tokenizer_config.get("pad_token"))
            + _as_id_list(config_value("pad_token_id"))
        )
        vision = model_config.get("vision_config") or {}
        return cls(
            backend,
            eos_token_ids=eos,
            pad_token_id=pads[0] if pads else None,
            merge_size=vision.get("spatial_merge_size", 2),
            source=str(path),
        )

    @property
    def vocab_size(self) -> int:
        """1 + the largest token id: the smallest embedding table that covers every token (ids may have gaps)."""
        return self._vocab_size

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise InputError(f"token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<|im_end|>`` ...) become their special ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``, leaving out special tokens unless asked to keep them."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # --- chat prompts ------------------------------------------------------------------------------------------

    def _pad_count(self, block: ImageBlock | VideoBlock) -> int:
        return vision_token_count(block.grid_thw, spatial_merge_size=self.merge_size)

    def _segments(self, content: Sequence[Content], system: str) -> list[str | tuple[str, int]]:
        """The user turn as template text pieces and ``(pad token, count)`` runs, system turn first."""
        pieces: list[str | tuple[str, int]] = [f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"]
        for item in content:
            if isinstance(item, str):
                pieces.append(item)
            elif isinstance(item, ImageBlock | VideoBlock):
                pad = "<|image_pad|>" if isinstance(item, ImageBlock) else "<|video_pad|>"
                pieces += ["<|vision_start|>", (pad, self._pad_count(item)), "<|vision_end|>"]
            else:
                raise InputError(f"chat content must be str, ImageBlock or VideoBlock, got {type(item).__name__}")
        pieces.append(_CLOSING)
        return pieces

    def chat_text(self, content: Sequence[Content], *, system: str = DEFAULT_SYSTEM_PROMPT, expand: bool = True) -> str:
        """The prompt text of one user turn holding ``content``, ending with the assistant header.

        ``expand=False`` gives what Qwen's chat template renders (one pad token per image or video);
        ``expand=True`` what the processor feeds the tokenizer (``t·h·w/merge²`` pads per block).
        """
        return "".join(
            piece if isinstance(piece, str) else piece[0] * (piece[1] if expand else 1)
            for piece in self._segments(content, system)
        )

    def _encode_segments(self, pieces: Sequence[str | tuple[str, int]]) -> np.ndarray:
        """Ids of template pieces: text is tokenized, pad runs are written directly (no need to tokenize 10k pads).

        Text next to a pad run ends in ``<|vision_start|>`` or starts with ``<|vision_end|>``: special tokens, split
        out before BPE, so encoding the text between runs on its own gives the ids of the whole string.
        """
        parts = []
        text = ""
        for piece in pieces:
            if isinstance(piece, str):
                text += piece
            else:
                parts += [self._ids(text), np.full(piece[1], self.token_to_id(piece[0]), np.int32)]
                text = ""
        parts.append(self._ids(text))
        return np.concatenate(parts)

    def _ids(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), np.int32).reshape(-1)

    def encode_chat(self, content: Sequence[Content], *, system: str = DEFAULT_SYSTEM_PROMPT) -> np.ndarray:
        """Ids ``[T]`` int32 of :meth:`chat_text` (expanded)."""
        return self._encode_segments(self._segments(content, system))

    def question_suffix(self, question: str) -> np.ndarray:
        """The part of a video prompt after the video: ``<|vision_end|>``, the question, the closing headers."""
        return self._ids(f"<|vision_end|>{question}{_CLOSING}")

    def video_prompt(
        self,
        question: str,
        video_grid_thw: Sequence[int],
        *,
        image_grid_thw: Sequence[Sequence[int]] = (),
        system: str = DEFAULT_SYSTEM_PROMPT,
    ) -> VideoPrompt:
        """The chat prompt ``[images..., video, question]`` in one user turn, split into prefix / video / suffix.

        Equal to ``encode_chat([*images, VideoBlock(video_grid_thw), question])``.
        """
        content = [*(ImageBlock(_grid(g)) for g in image_grid_thw), VideoBlock(_grid(video_grid_thw))]
        # The segments end with: <|vision_start|>, the video's pad run, <|vision_end|>, the closing headers.
        *before, (_, num_pads), _, _ = self._segments(content, system)
        return VideoPrompt(
            prefix=self._encode_segments(before),
            video=np.full(num_pads, self.special.video_pad, np.int32),
            suffix=self.question_suffix(question),
        )


def _grid(grid_thw: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(v) for v in np.asarray(grid_thw).reshape(-1))
    if len(values) != 3:
        raise InputError(f"a grid is (t, h, w), got {values}")
    return values  # type: ignore[return-value]
