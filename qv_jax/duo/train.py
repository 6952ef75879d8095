"""Identify retrieval heads: DuoAttention's gate optimisation, or the training-free on-the-fly score.

:func:`identify_heads` trains one gate per (layer, KV head) with AdamW on synthetic passkey samples
(``qv_jax.duo.data``), the model frozen, checkpointing the gates and optimizer state with orbax so that a run can
resume; ``method="on-the-fly"`` scores the heads by their attention mass outside sink + recent instead. See
docs/duo.md.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qv_jax.duo.data import sample_for_step, sample_lengths
from qv_jax.duo.gated import distill_loss, outside_mass, pattern_distance
from qv_jax.duo.gates import HeadGates
from qv_jax.errors import ConfigError, InputError
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
def make_step(graphdef, *, lr: float, steps: int, sink: int, recent: int, reg: float, remat: bool = True):
    """The jitted training step ``(gates, opt_state, state, ids, answer) -> (gates, opt_state, loss)``; one per
    setting, so that a resumed run in the same process reuses its compilations. ``remat=False``: see
    :func:`~qv_jax.duo.gated.distill_loss`."""
    transform = optimizer(lr, steps)

    def step(gates_LK, opt_state, state, ids_BT, answer_BT):
        (loss, _), grads = jax.value_and_grad(distill_loss, has_aux=True)(
            gates_LK, graphdef, state, ids_BT, answer_BT, sink=sink, recent=recent, reg=reg, remat=remat
        )
        updates, opt_state = transform.update(grads, opt_state, gates_LK)
        return jnp.clip(optax.apply_updates(gates_LK, updates), 0.0, 1.0), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def check_inputs(model, *, method: str, steps: int, sink: int, recent: int, min_length: int, max_length: int):
    """Typed errors for what would fail later (before any sample is made or any step compiled)."""
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if model.tokenizer is None:
        where = f"{model.source}: " if model.source else ""
        raise ConfigError(f"{where}the model has no tokenizer (tokenizer.json); its synthetic samples need one")
    if model.sparsity is not None:
        raise ConfigError("identify heads on a model loaded without sparsity (its heads are reordered)")
    if model.plan is not None:
        raise ConfigError("identifying heads on a mesh is not supported yet: load the model on one device")
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
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> HeadGates:
    """Gates ``[layers, kv_heads]`` of a :class:`~qv_jax.runtime.VisionLanguageModel` (text decoder, frozen).

    ``method="optimize"``: ``steps`` AdamW steps of DuoAttention's distillation loss, one synthetic sample of
    ``min_length..max_length`` tokens each, a function of ``(seed, step)``; with ``checkpoint_dir`` the gates and
    optimizer state are saved every ``checkpoint_every`` steps and, with ``resume``, the run continues from the
    newest one there. ``method="on-the-fly"``: no training, the heads' attention mass outside sink + recent on a
    few samples. ``progress(step, loss)`` is called after every step.
    """
    check_inputs(
        model, method=method, steps=steps, sink=sink, recent=recent, min_length=min_length, max_length=max_length
    )
    lengths = sample_lengths(min_length, max_length)
    if method == "on-the-fly":
        return _on_the_fly(model, lengths, seed=seed, sink=sink, recent=recent, progress=progress)
    t = model.config.text
    gates = jnp.ones((t.num_layers, t.num_kv_heads), jnp.float32)
    opt_state = optimizer(lr, steps).init(gates)
    losses = np.full(steps, np.nan, np.float32)
    start = 0
    if resume and checkpoint_dir is not None:
        found = restore(checkpoint_dir, gates, opt_state, losses)
        if found is not None:
            start, gates, opt_state, losses = found
    step = make_step(model.graphdef, lr=lr, steps=steps, sink=sink, recent=recent, reg=reg)
    for index in range(start, steps):
        sample = sample_for_step(model.tokenizer, lengths, seed, index)
        gates, opt_state, loss = step(gates, opt_state, model.state, sample.ids[None], sample.answer[None])
        losses[index] = float(loss)
        done = index + 1
        if checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps):
            save(checkpoint_dir, done, gates, opt_state, losses)
        if progress is not None:
            progress(done, losses[index])
    return HeadGates(np.asarray(gates), losses, method)


def _on_the_fly(model, lengths, *, seed: int, sink: int, recent: int, progress) -> HeadGates:
    total = None
    for index in range(ON_THE_FLY_SAMPLES):
        sample = sample_for_step(model.tokenizer, lengths, seed, index)
        score = outside_mass(
            model.graphdef, model.state, sample.ids[None], sample.answer[None], sink=sink, recent=recent
        )
        total = score if total is None else total + score
        if progress is not None:
            progress(index + 1, float("nan"))
    return HeadGates(np.asarray(total / ON_THE_FLY_SAMPLES), method="on-the-fly")


def streaming_distance(model, streaming: np.ndarray, samples, *, sink: int, recent: int) -> float:
    """Mean hidden-state distance over ``samples`` (:class:`~qv_jax.duo.data.Sample`) of the model streaming the
    heads of ``streaming`` ``[layers, kv_heads]`` (True = streaming), against the plain model."""
    gates = jnp.asarray(~np.asarray(streaming, bool), jnp.float32)
    total = 0.0
    for s in samples:
        total += float(pattern_distance(model.graphdef, model.state, s.ids[None], s.answer[None], gates, sink=sink,
                                        recent=recent))  # fmt: skip
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
