"""Identify retrieval heads: DuoAttention's gate optimisation, or the training-free on-the-fly score.

:func:`identify_heads` trains one gate per (layer, KV head) with AdamW on synthetic passkey and / or video samples
(``qv_jax.duo.data``), the model frozen, checkpointing the gates and optimizer state with orbax so that a run can
resume; ``method="on-the-fly"`` scores the heads by their attention mass outside sink + recent instead. See
docs/duo.md.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qv_jax.duo.data import DATA_KINDS, Sample, sample_for_step, sample_lengths
from qv_jax.duo.gated import distill_loss, outside_mass, pattern_distance
from qv_jax.duo.gates import HeadGates
from qv_jax.errors import CheckpointError, ConfigError, InputError
from qv_jax.runtime import encode

METHODS = ("optimize", "on-the-fly")
# DuoAttention's schedule for its 2000 steps: 400 steps of warm-up from 0.1x, flat, 400 of decay to 0.1x
REFERENCE_STEPS, RAMP_STEPS, RAMP_FLOOR = 2000, 400, 0.1
ON_THE_FLY_SAMPLES = 4
STEP_PREFIX = "step_"


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
    """The jitted training step ``(gates, opt_state, state, x, positions, answer) -> (gates, opt_state, loss)``
    (inputs from :func:`sample_inputs`); one per
    setting, so that a resumed run in the same process reuses its compilations. ``remat=False``: see
    :func:`~qv_jax.duo.gated.distill_loss`."""
    transform = optimizer(lr, steps)

    def step(gates_LK, opt_state, state, x_BTD, positions_3BT, answer_BT):
        (loss, _), grads = jax.value_and_grad(distill_loss, has_aux=True)(
            gates_LK, graphdef, state, x_BTD, positions_3BT, answer_BT, sink=sink, recent=recent, reg=reg, remat=remat
        )
        updates, opt_state = transform.update(grads, opt_state, gates_LK)
        return jnp.clip(optax.apply_updates(gates_LK, updates), 0.0, 1.0), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def sample_inputs(model, sample: Sample) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x [1, T, D], positions [3, 1, T], answer [1, T])`` of a sample for ``model``: its token embeddings, a
    video sample's frames encoded by the (frozen) vision tower into its ``<|video_pad|>`` slots."""
    video = None if sample.frames is None else model.encode_video(sample.frames)
    x_BTD = encode.embed(model.graphdef, model.state, jnp.asarray(sample.ids[None]), None, video)
    return x_BTD, jnp.asarray(sample.positions[:, None]), jnp.asarray(sample.answer[None])


def check_inputs(
    model, *, method: str, steps: int, sink: int, recent: int, min_length: int, max_length: int, data: str = "passkey"
):
    """Typed errors for what would fail later (before any sample is made or any step compiled)."""
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if data not in DATA_KINDS:
        raise InputError(f"data must be one of {', '.join(DATA_KINDS)}, got {data!r}")
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
    data: str = "passkey",
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
    )
    lengths = sample_lengths(min_length, max_length)
    if method == "on-the-fly":
        return _on_the_fly(model, lengths, data, seed=seed, sink=sink, recent=recent, progress=progress)
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
        inputs = sample_inputs(model, sample_for_step(model, lengths, seed, index, data))
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
        score = outside_mass(model.graphdef, model.state, *inputs, sink=sink, recent=recent)
        total = score if total is None else total + score
        if progress is not None:
            progress(index + 1, float("nan"))
    return HeadGates(np.asarray(total / ON_THE_FLY_SAMPLES), method="on-the-fly")


def streaming_distance(model, streaming: np.ndarray, samples, *, sink: int, recent: int) -> float:
    """Mean hidden-state distance over ``samples`` (:class:`~qv_jax.duo.data.Sample`) of the model streaming the
    heads of ``streaming`` ``[layers, kv_heads]`` (True = streaming), against the plain model."""
    gates = jnp.asarray(~np.asarray(streaming, bool), jnp.float32)
    total = 0.0
    for sample in samples:
        x_BTD, positions_3BT, answer_BT = sample_inputs(model, sample)
        inputs = (model.graphdef, model.state, x_BTD, positions_3BT, answer_BT, gates)
        total += float(pattern_distance(*inputs, sink=sink, recent=recent))
    return total / len(samples)


# ---- checkpoints ---------------------------------------------------------------------------------------------


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob(f"{STEP_PREFIX}*"):
        number = path.name[len(STEP_PREFIX) :]
        if number.isdigit() and path.is_dir():
            found.append((int(number), path))
    return sorted(found)


def save(directory: str | os.PathLike, step: int, gates, opt_state, losses: np.ndarray) -> Path:
    """An orbax checkpoint of the run after ``step`` steps; older ones of this run are removed once it is whole."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{STEP_PREFIX}{step}"
    checkpointer = ocp.StandardCheckpointer()
    # orbax writes into a temporary directory and renames it when finished
    checkpointer.save(target, {"gates": gates, "opt_state": opt_state, "losses": jnp.asarray(losses)}, force=True)
    checkpointer.wait_until_finished()
    for number, path in _checkpoints(directory):
        if number != step:
            shutil.rmtree(path, ignore_errors=True)
    return target


def restore(directory: str | os.PathLike, gates, opt_state, losses: np.ndarray):
    """``(step, gates, opt_state, losses)`` of the newest checkpoint in ``directory``, or ``None`` if it has none;
    :class:`CheckpointError` if it does not fit this run (another model or number of steps)."""
    import orbax.checkpoint as ocp

    found = _checkpoints(Path(directory).absolute()) if Path(directory).is_dir() else []
    if not found:
        return None
    step, path = found[-1]
    like = {"gates": gates, "opt_state": opt_state, "losses": jnp.asarray(losses)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    try:
        restored = ocp.StandardCheckpointer().restore(path, abstract)
    except Exception as e:  # orbax raises untyped errors for a tree or shapes that do not match
        raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: {e})") from e
    return step, restored["gates"], restored["opt_state"], np.array(restored["losses"])
