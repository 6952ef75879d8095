"""The jitted train step: next-token cross-entropy of the text decoder on packed rows, AdamW on float32 master
weights, each decoder layer rematerialised.

The trained parameters are the text decoder's (the vision tower is left as it is), held as a flat list of
float32 arrays (the master weights, which the optimizer state matches) and cast to the compute dtype inside the
step. Attention runs through :class:`~qv_jax.model.qwen2_5_vl.ChunkAttention` with the packed rows' segment ids
and, for hybrid sparse models, one pattern per layer and KV head, so its gradient is the attention kernels'
backward pass. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qv_jax.attention.backends import AttentionConfig
from qv_jax.model.qwen2_5_vl import ChunkAttention, Rope

Array = jax.Array

LOSS_CHUNK = 1024  # tokens whose float32 logits exist at once in the loss (a [chunk, vocab] block)
FINAL_LR = 0.1  # the cosine ends at this fraction of the peak learning rate


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What fixes the compiled step: optimizer settings, compute dtype, attention and per-layer patterns."""

    steps: int
    lr: float = 2e-5
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    compute_dtype: str = "float32"
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    layer_patterns: tuple | None = None
    remat: bool = True


def schedule(lr: float, warmup: int, steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr`` over ``warmup`` steps (the first step already at ``lr / warmup``), then a cosine
    down to ``FINAL_LR * lr`` at ``steps``."""

    def rate(count):
        count = jnp.asarray(count, jnp.float32) + 1
        up = jnp.minimum(1.0, count / max(warmup, 1))
        progress = jnp.clip((count - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        down = FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return lr * up * down

    return rate


def optimizer(config: StepConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (weight decay on matrices only, not on norms or biases)."""
    adamw = optax.adamw(
        schedule(config.lr, config.warmup, config.steps),
        weight_decay=config.weight_decay,
        mask=lambda params: [p.ndim >= 2 for p in params],
    )
    return optax.chain(optax.clip_by_global_norm(config.clip), adamw)


def _layer(layer_def, index: int, config: StepConfig, layer_state, x_BTD, cos_BTH, sin_BTH, segments_BT):
    layer = nnx.merge(layer_def, layer_state)
    kv = ChunkAttention(segments_BT, config.attention, config.layer_patterns)
    return layer(x_BTD, Rope(cos_BTH, sin_BTH), kv, index)


def hidden_states(text, config: StepConfig, ids_BT: Array, segments_BT: Array, positions_BT: Array) -> Array:
    """Final post-norm hidden states ``[B, T, D]`` of packed text rows (M-RoPE's three axes equal)."""
    x_BTD = text.embed_tokens(ids_BT)
    rope = text.rope(jnp.broadcast_to(positions_BT, (3, *positions_BT.shape)))
    for i, layer in enumerate(text.layers):
        layer_def, layer_state = nnx.split(layer)
        run = functools.partial(_layer, layer_def, i, config)
        if config.remat:
            run = jax.checkpoint(run)
        x_BTD = run(layer_state, x_BTD, rope.cos_BTH, rope.sin_BTH, segments_BT)
    return text.norm(x_BTD)


def token_losses(text, hidden_BTD: Array, targets_BT: Array) -> Array:
    """``-log p(target)`` ``[B, T]`` in float32, the logits made ``LOSS_CHUNK`` tokens at a time (and remade in
    the backward pass) so a long row never holds ``[T, vocab]`` of them."""
    B, T, D = hidden_BTD.shape
    chunk = min(T, LOSS_CHUNK)
    pad = -T % chunk
    h_CBtD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, chunk, D).transpose(1, 0, 2, 3)
    t_CBt = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, -1, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def one(args):
        h_BtD, t_Bt = args
        logits_BtV = text.logits(h_BtD)
        picked = jnp.take_along_axis(logits_BtV, t_Bt[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits_BtV, axis=-1) - picked

    return jax.lax.map(one, (h_CBtD, t_CBt)).transpose(1, 0, 2).reshape(B, -1)[:, :T]


def loss_fn(params, text_def, treedef, config: StepConfig, batch) -> tuple[Array, Array]:
    """``(mean loss, scored tokens)`` over the batch's ``loss_mask`` (never across documents or on padding)."""
    dtype = jnp.dtype(config.compute_dtype)
    text = nnx.merge(text_def, jax.tree.unflatten(treedef, [p.astype(dtype) for p in params]))
    ids_BT, segments_BT, positions_BT, mask_BT = batch
    hidden_BTD = hidden_states(text, config, ids_BT, segments_BT, positions_BT)
    targets_BT = jnp.roll(ids_BT, -1, axis=1)
    losses_BT = token_losses(text, hidden_BTD, targets_BT)
    count = jnp.sum(mask_BT)
    return jnp.sum(losses_BT * mask_BT) / jnp.maximum(count, 1.0), count


@functools.lru_cache(maxsize=8)
def make_step(text_def, treedef, config: StepConfig):
    """``(params, opt_state, batch) -> (params, opt_state, loss)``, jitted, the parameters and optimizer state
    donated; one per setting, so a resumed run in the same process reuses its compilation."""
    transform = optimizer(config)

    def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, text_def, treedef, config, batch)
        updates, opt_state = transform.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def make_init(config: StepConfig):
    """The jitted optimizer-state initialiser (its state placed like the parameters)."""
    return jax.jit(optimizer(config).init)


def split_text(model) -> tuple[nnx.GraphDef, object, list[Array]]:
    """``(text graphdef, treedef, float32 master weights)`` of a model's text decoder (shardings kept)."""
    text_def, text_state = nnx.split(model.model.text)
    leaves, treedef = jax.tree.flatten(text_state)
    # copies, never the model's own arrays: the step donates (frees) the ones it is given
    return text_def, treedef, [jax.device_put(leaf.astype(jnp.float32), may_alias=False) for leaf in leaves]


def batch_arrays(batch) -> tuple[np.ndarray, ...]:
    """A :class:`~qv_jax.training.data.Batch` as the step's ``(ids, segment_ids, positions, loss_mask)``."""
    return batch.ids, batch.segment_ids, batch.positions, batch.loss_mask
