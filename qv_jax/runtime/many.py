"""``VisionLanguageModel.generate_many``: a list of prompts of any lengths, prefilled packed (Prepacking) or as a
padded batch, decoded as one batch. See docs/videoqa.md ("Many prompts, many questions")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from qv_jax.errors import ConfigError, InputError
from qv_jax.model.config import token_ids
from qv_jax.numeric import round_up
from qv_jax.runtime import dense, encode
from qv_jax.runtime import packing as prepack
from qv_jax.runtime.generate import DecodeRequest, decode_answer, until_stop
from qv_jax.runtime.sampling import SamplingParams

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclasses.dataclass(frozen=True)
class _Prompt:
    """One prompt: ids ``[n]`` and its vision inputs (the keywords of ``generate``, for this prompt alone)."""

    ids: np.ndarray
    vision: dict

    @classmethod
    def parse(cls, index: int, prompt, vocab: int) -> _Prompt:
        vision = {}
        if isinstance(prompt, Mapping):
            unknown = set(prompt) - {"input_ids", *VISION_KEYS}
            if "input_ids" not in prompt or unknown:
                raise InputError(
                    f"prompt {index}: a mapping needs input_ids and only {VISION_KEYS}, got {sorted(prompt)}"
                )
            vision = {k: v for k, v in prompt.items() if k != "input_ids" and v is not None}
            prompt = prompt["input_ids"]
        ids = np.asarray(prompt)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise InputError(f"prompt {index} must be a 1-D sequence of token ids, got {ids.dtype} {ids.shape}")
        if ids.size == 0:
            raise InputError(f"prompt {index} is empty")
        if ids.min() < 0 or ids.max() >= vocab:
            raise InputError(f"prompt {index} holds ids outside the vocabulary [0, {vocab})")
        return cls(ids.astype(np.int32), vision)


def generate_many(
    model,
    prompts: Sequence,
    *,
    max_new_tokens: int = 16,
    packing: bool = True,
    bin_tokens: int | None = None,
    sampling: SamplingParams,
    eos_token_id=None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """New tokens of every prompt, in input order, each ending at its first stop token (included); see
    ``VisionLanguageModel.generate_many``."""
    if isinstance(prompts, np.ndarray | str) or not len(prompts):
        raise InputError("prompts must be a non-empty list of prompts")
    parsed = [_Prompt.parse(i, p, model.config.text.vocab_size) for i, p in enumerate(prompts)]
    request = DecodeRequest(
        max_new_tokens,
        sampling,
        stop_ids=token_ids(model.eos_token_ids if eos_token_id is None else eos_token_id),
        pad_id=model.pad_token_id if pad_token_id is None else int(pad_token_id),
        seed=seed,
    )
    context = model.config.text.max_position_embeddings
    for i, p in enumerate(parsed):
        if p.ids.size + max_new_tokens > context:
            raise InputError(
                f"prompt {i} has {p.ids.size} tokens: with {max_new_tokens} new ones it passes the model's context "
                f"of {context}"
            )
    if not packing:
        tokens = _padded(model, parsed, request)
    else:
        if model.sparsity is not None:
            raise ConfigError("packed prefill runs the dense model; with a sparsity config use packing=False")
        tokens = _packed(model, parsed, request, bin_tokens)
    return [until_stop(row, request.stop_ids) for row in tokens[: len(parsed)]]


def _padded(model, prompts: list[_Prompt], request: DecodeRequest) -> np.ndarray:
    """The baseline: one right-padded batch through ``generate`` (which left-aligns it)."""
    width = max(p.ids.size for p in prompts)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, : p.ids.size], mask[b, : p.ids.size] = p.ids, 1
    vision = {}
    for key in VISION_KEYS:
        parts = [p.vision[key] for p in prompts if key in p.vision]
        if parts:
            vision[key] = np.concatenate([np.asarray(x).reshape(-1, *np.shape(x)[1:]) for x in parts])
    s = request.sampling
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=request.max_new_tokens,
        do_sample=s.do_sample,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        eos_token_id=list(request.stop_ids),
        pad_token_id=request.pad_id,
        seed=request.seed,
        **vision,
    )
    return out[:, width:]


def _packed(model, prompts: list[_Prompt], request: DecodeRequest, bin_tokens: int | None) -> np.ndarray:
    """Packed prefill of every prompt but its last token, then the last tokens and the answers as one batch."""
    positions, embedded = [], {}
    for i, p in enumerate(prompts):
        if p.vision:
            if p.ids[-1] in (model.config.image_token_id, model.config.video_token_id):
                raise InputError(f"prompt {i} ends with a vision token; a prompt must end with a text token")
            x, pos, _ = model._prepare(p.ids[None], None, *(p.vision.get(k) for k in VISION_KEYS), None)
            embedded[i] = x[0, :-1]
            positions.append(pos[:, 0])
        else:
            if np.isin(p.ids, (model.config.image_token_id, model.config.video_token_id)).any():
                raise InputError(f"prompt {i} holds vision pad tokens but no pixels were given")
            positions.append(np.broadcast_to(np.arange(p.ids.size, dtype=np.int32), (3, p.ids.size)))
    packed = prepack.pack_prompts([p.ids for p in prompts], positions, bin_tokens)
    x = encode.embed(model.graphdef, model.state, jnp.asarray(packed.ids))
    for i, rows in embedded.items():  # a prompt with images / video: its embeddings computed alone
        if rows.shape[0]:
            x = x.at[packed.bin_of[i], packed.start[i] : packed.start[i] + rows.shape[0]].set(rows.astype(x.dtype))
    rows, count = packed.rows, len(prompts)
    extra = rows - count
    history = packed.history
    capacity = round_up(history + request.max_new_tokens, 128)
    with model.mesh_context():
        cache = prepack.prefill_packed(
            model.graphdef,
            model.state,
            x,
            jnp.asarray(packed.positions),
            jnp.asarray(packed.segment_ids),
            *(jnp.asarray(np.pad(a, (0, extra))) for a in (packed.bin_of, packed.start, packed.length)),
            history=history,
            capacity=capacity,
        )
        # the held-back last tokens, at their own positions: the first decode step of every row
        last = np.pad([int(p.ids[-1]) for p in prompts], (0, extra)).astype(np.int32)
        where = np.pad([int(pos[0, -1]) for pos in positions], (0, extra)).astype(np.int32)
        logits, cache = dense.decode_step(model.graphdef, model.state, cache, jnp.asarray(last), jnp.asarray(where))
    padding = jnp.asarray(np.arange(rows) >= count)
    loop = model.decode_loop(dense, jnp.asarray(where + 1), request)

    def rows_loop(cache, first_B, done_B, rng, stop_ids, num_steps):
        return loop(cache, first_B, done_B | padding, rng, stop_ids, num_steps)  # padding rows cost no decision

    return decode_answer(logits, cache, request, rows_loop)[0]
