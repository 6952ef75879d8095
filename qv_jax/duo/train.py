"""Identify retrieval heads: DuoAttention's gate optimisation, or the training-free on-the-fly score.

:func:`identify_heads` trains one gate per (layer, KV head) with AdamW on synthetic passkey and / or video samples
(``qv_jax.duo.data``), the model frozen, checkpointing the gates and optimizer state with orbax so that a run can
resume; ``method="on-the-fly"`` scores the heads by their attention mass outside sink + recent instead. See
docs/duo.md.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qv_jax.duo.data import DATA_KINDS, Sample, sample_for_step, sample_lengths
from qv_jax.duo.gated import distill_loss, outside_mass, pattern_distance
from qv_jax.duo.gates import HeadGates
from qv_jax.errors import ConfigError, InputError
from qv_jax.runtime import encode
from qv_jax.training import checkpoint

METHODS = ("optimize", "on-the-fly")
# DuoAttention's schedule for its 2000 steps: 400 steps of warm-up from 0.1x, flat, 400 of decay to 0.1x
REFERENCE_STEPS, RAMP_STEPS, RAMP_FLOOR = 2000, 400, 0.1
ON_THE_FLY_SAMPLES = 4


def learning_rate(lr: float, steps: int) -> optax.Schedule:
    """Warm-up from ``0.1·lr``, flat, linear decay to ``0.1·lr``; the ramps scaled from 400 of 2000 steps."""
    ramp = max(1, round(steps * RAMP_STEPS / REFERENCE_STEPS))

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        up = RAMP_FLOOR + (1 - RAMP_FLOOR) * jnp.clip(count / ramp, 0.0, 1.0)
        down = RAMP_FLOOR + (1 - RAMP_FLOOR) * jnp.clip((steps - count) / ramp, 0.0, 1.0)
        return lr * jnp.minimum(up, down)

    return schedule


def optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    return optax.adamw(learning_rate(lr, steps), weight_decay=0.0)


@functools.lru_cache(maxsize=8)
def make_step(
    graphdef, *, lr: float, steps: int, sink: int, recent: int, reg: float, remat: bool = True, kv_repeat: int = 1
):
    """The jitted training step ``(gates, opt_state, state, x, positions, answer) -> (gates, opt_state, loss)``
    (inputs from :func:`sample_inputs`); one per setting, so that a resumed run in the same process reuses its
    compilations. The gates are the stored KV heads'; on a mesh that replicates each head ``kv_repeat`` times the
    replicas share their head's gate. ``remat=False``: see :func:`~qv_jax.duo.gated.distill_loss`."""
    transform = optimizer(lr, steps)

    def loss(gates_LK, state, x_BTD, positions_3BT, answer_BT):
        gates = jnp.repeat(gates_LK, kv_repeat, axis=1)
        inputs = (graphdef, state, x_BTD, positions_3BT, answer_BT)
        return distill_loss(gates, *inputs, sink=sink, recent=recent, reg=reg, remat=remat)

    def step(gates_LK, opt_state, state, x_BTD, positions_3BT, answer_BT):
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(gates_LK, state, x_BTD, positions_3BT, answer_BT)
        updates, opt_state = transform.update(grads, opt_state, gates_LK)
        return jnp.clip(optax.apply_updates(gates_LK, updates), 0.0, 1.0), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def sample_inputs(model, samples: Sample | Sequence[Sample]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x [B, T, D], positions [3, B, T], answer [B, T])`` of one or more samples of one length for ``model``:
    their token embeddings, a video sample's frames encoded by the (frozen) vision tower into its
    ``<|video_pad|>`` slots; on a mesh, rows on its ``"data"`` axis."""
    samples = [samples] if isinstance(samples, Sample) else list(samples)
    rows = []
    for sample in samples:
        video = None if sample.frames is None else model.encode_video(sample.frames)
        with model.mesh_context():
            rows.append(encode.embed(model.graphdef, model.state, jnp.asarray(sample.ids[None]), None, video))
    positions = np.stack([s.positions for s in samples], axis=1)
    answer = np.stack([s.answer for s in samples])
    if model.plan is None:
        return jnp.concatenate(rows), jnp.asarray(positions), jnp.asarray(answer)
    put = model.plan.put_batch
    return put(np.concatenate([np.asarray(x) for x in rows]), 0), put(positions, 1), put(answer, 0)


def _data_shards(model) -> int:
    return 1 if model.plan is None else model.plan.mesh.shape.get("data", 1)


def check_inputs(
    model,
    *,
    method: str,
    steps: int,
    sink: int,
    recent: int,
    min_length: int,
    max_length: int,
    data: str = "both",
    rows: int | None = None,
):
    """Typed errors for what would fail later (before any sample is made or any step compiled)."""
    shards = _data_shards(model)
    if rows is not None and (rows < 1 or rows % shards):
        raise InputError(f"rows ({rows}) must be a positive multiple of the mesh's {shards} data shards")
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if data not in DATA_KINDS:
        raise InputError(f"data must be one of {', '.join(DATA_KINDS)}, got {data!r}")
    if model.tokenizer is None:
        where = f"{model.source}: " if model.source else ""
        raise ConfigError(f"{where}the model has no tokenizer (tokenizer.json); its synthetic samples need one")
    if model.sparsity is not None:
        raise ConfigError("identify heads on a model loaded without sparsity (its heads are reordered)")
    if steps < 1 and method == "optimize":
        raise InputError(f"steps must be >= 1, got {steps}")
    if sink < 0 or recent < 1:
        raise InputError(f"need sink >= 0 and recent >= 1, got sink={sink}, recent={recent}")
    if min_length <= sink + recent or max_length < min_length:
        raise InputError(
            f"lengths {min_length}..{max_length} must exceed sink + recent ({sink} + {recent} = {sink + recent}): "
            "a shorter sample has nothing outside the streaming window to retrieve"
        )


def identify_heads(
    model,
    *,
    method: str = "optimize",
    steps: int = 2000,
    lr: float = 0.02,
    reg: float = 0.05,
    sink: int = 128,
    recent: int = 256,
    min_length: int = 1024,
    max_length: int = 32768,
    data: str = "both",
    rows: int | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> HeadGates:
    """Gates ``[layers, kv_heads]`` of a :class:`~qv_jax.runtime.VisionLanguageModel` (text decoder, frozen).

    ``method="optimize"``: ``steps`` AdamW steps of DuoAttention's distillation loss, one synthetic sample of
    ``min_length..max_length`` tokens each (``data``: ``"passkey"`` text, ``"video"`` needle frames, or ``"both"``
    alternating), a function of ``(seed, step)``; with ``checkpoint_dir`` the gates and
    optimizer state are saved every ``checkpoint_every`` steps and, with ``resume``, the run continues from the
    newest one there. ``method="on-the-fly"``: no training, the heads' attention mass outside sink + recent on a
    few samples. ``progress(step, loss)`` is called after every step.

    ``rows``: samples per step (default: one per ``"data"`` shard of the model's mesh, else one). On a mesh
    (``load_model(..., mesh=)``) the model is split over ``"model"`` and a step's rows over ``"data"``; the gates
    are the stored KV heads'.
    """
    check_inputs(
        model,
        method=method,
        steps=steps,
        sink=sink,
        recent=recent,
        min_length=min_length,
        max_length=max_length,
        data=data,
        rows=rows,
    )
    lengths = sample_lengths(min_length, max_length)
    if method == "on-the-fly":
        return _on_the_fly(model, lengths, data, seed=seed, sink=sink, recent=recent, progress=progress)
    t = model.checkpoint_config.text
    gates = jnp.ones((t.num_layers, t.num_kv_heads), jnp.float32)
    opt_state = optimizer(lr, steps).init(gates)
    losses = np.full(steps, np.nan, np.float32)
    start = 0
    if resume and checkpoint_dir is not None:
        found = restore(checkpoint_dir, gates, opt_state, losses)
        if found is not None:
            start, gates, opt_state, losses = found
    step = make_step(model.graphdef, lr=lr, steps=steps, sink=sink, recent=recent, reg=reg, kv_repeat=model.kv_repeat)
    rows = rows or _data_shards(model)
    for index in range(start, steps):
        inputs = sample_inputs(model, [sample_for_step(model, lengths, seed, index, data, row) for row in range(rows)])
        with model.mesh_context():
            gates, opt_state, loss = step(gates, opt_state, model.state, *inputs)
        losses[index] = float(loss)
        done = index + 1
        if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps):
            save(checkpoint_dir, done, gates, opt_state, losses)
        if progress is not None:
            progress(done, losses[index])
    return HeadGates(np.asarray(gates), losses, method)


def _on_the_fly(model, lengths, data: str, *, seed: int, sink: int, recent: int, progress) -> HeadGates:
    total = None
    for index in range(ON_THE_FLY_SAMPLES):
        inputs = sample_inputs(model, sample_for_step(model, lengths, seed, index, data))
        with model.mesh_context():
            score = outside_mass(model.graphdef, model.state, *inputs, sink=sink, recent=recent)
        # a mesh's replicas of a stored head each hold an equal share of its query heads: their mean is its score
        score = score.reshape(score.shape[0], -1, model.kv_repeat).mean(axis=-1)
        total = score if total is None else total + score
        if progress is not None:
            progress(index + 1, float("nan"))
    return HeadGates(np.asarray(total / ON_THE_FLY_SAMPLES), method="on-the-fly")


def streaming_distance(model, streaming: np.ndarray, samples, *, sink: int, recent: int) -> float:
    """Mean hidden-state distance over ``samples`` (:class:`~qv_jax.duo.data.Sample`) of the model streaming the
    heads of ``streaming`` ``[layers, kv_heads]`` (True = streaming), against the plain model."""
    gates = jnp.repeat(jnp.asarray(~np.asarray(streaming, bool), jnp.float32), model.kv_repeat, axis=1)
    total = 0.0
    for sample in samples:
        x_BTD, positions_3BT, answer_BT = sample_inputs(model, sample)
        inputs = (model.graphdef, model.state, x_BTD, positions_3BT, answer_BT, gates)
        with model.mesh_context():
            total += float(pattern_distance(*inputs, sink=sink, recent=recent))
    return total / len(samples)


def save(directory: str | os.PathLike, step: int, gates, opt_state, losses: np.ndarray) -> Path:
    """An orbax checkpoint of the run after ``step`` steps (:func:`qv_jax.training.checkpoint.save`)."""
    return checkpoint.save(directory, step, {"gates": gates, "opt_state": opt_state, "losses": jnp.asarray(losses)})


def restore(directory: str | os.PathLike, gates, opt_state, losses: np.ndarray):
    """``(step, gates, opt_state, losses)`` of the newest checkpoint in ``directory``, or ``None`` if it has none;
    :class:`CheckpointError` if it does not fit this run (another model or number of steps)."""
    found = checkpoint.restore(directory, {"gates": gates, "opt_state": opt_state, "losses": jnp.asarray(losses)})
    if found is None:
        return None
    step, restored = found
    return step, restored["gates"], restored["opt_state"], np.array(restored["losses"])
