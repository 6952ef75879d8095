""":func:`finetune`: the training loop around :mod:`qv_jax.training.step`, with checkpoints, resume, a JSON-lines
log, a loss curve and the finetuned model saved as a model directory.

``OUT`` holds ``checkpoints/step_N`` (parameters, optimizer state, step and data position; see
:mod:`qv_jax.training.checkpoint`), ``log.jsonl`` (one ``{"step", "loss", "tokens_per_s"}`` line per step),
``loss.png`` and, when the run ends, ``model/`` (loadable with ``qv_jax.load_model``). See docs/training.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.errors import CheckpointError, ConfigError, InputError, OutputError
from qv_jax.marker import atomic_output, check_output
from qv_jax.training import checkpoint
from qv_jax.training.data import DataSource
from qv_jax.training.step import StepConfig, batch_arrays, make_init, make_step, split_text

CHECKPOINTS, LOG, CURVE, MODEL = "checkpoints", "log.jsonl", "loss.png", "model"
ARCHITECTURE = "architecture.json"  # in checkpoints/: what the run trains, checked on --resume


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """The finetuned model (in memory, and saved as ``out/model``) and the loss of every step of this run's log
    (the resumed part included)."""

    model: object
    losses: np.ndarray
    out: Path


def check_patterns(layer_patterns, *, num_layers: int, seq_len: int):
    """Typed errors for per-layer patterns that do not fit the model or cannot tile ``seq_len``."""
    if layer_patterns is None:
        return
    if len(layer_patterns) != num_layers:
        raise ConfigError(f"{len(layer_patterns)} layer patterns for a model of {num_layers} layers")
    for i, patterns in enumerate(layer_patterns):
        for pattern in patterns if isinstance(patterns, tuple) else (patterns,):
            block = getattr(pattern, "block", None)
            if block is not None and seq_len % block:
                raise InputError(
                    f"seq_len {seq_len} is not a whole number of layer {i}'s {block}-token pattern blocks: "
                    f"use a multiple of {block}"
                )
            pattern.validate(seq_len)


def _replicated(layer_patterns, repeat: int):
    """Per-head patterns of the stored KV heads, each repeated for a mesh's replicas of it."""
    if layer_patterns is None or repeat == 1:
        return layer_patterns
    return tuple(
        tuple(p for p in patterns for _ in range(repeat)) if isinstance(patterns, tuple) else patterns
        for patterns in layer_patterns
    )


def _check_architecture(path: Path, architecture: dict) -> None:
    """:class:`CheckpointError` when the checkpoints in ``path``'s directory were written for another model."""
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    differ = [name for name in architecture if saved.get(name) != architecture[name]]
    if differ:
        raise CheckpointError(
            f"{path}: the checkpoints there are of another architecture ({', '.join(differ)} differ): "
            "cannot resume this run from them"
        )


def _read_log(path: Path, upto: int) -> list[dict]:
    """The log's entries of steps ``1..upto`` (a resumed run drops what came after its checkpoint)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= upto:
            entries.append(entry)
    return entries


def _write_log(path: Path, entries: list[dict]) -> None:
    with atomic_output(path, overwrite=True, directory=False) as partial:
        partial.write_text("".join(json.dumps(e) + "\n" for e in entries))


def plot_losses(path: Path, entries: list[dict]) -> None:
    """The loss curve as a PNG, written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("finetuning loss")
    ax.grid(alpha=0.3)
    with atomic_output(path, overwrite=True, directory=False) as partial:
        fig.savefig(partial, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def finetune(
    model,
    data: DataSource,
    out: str | os.PathLike,
    *,
    seq_len: int,
    steps: int,
    batch_tokens: int | None = None,
    lr: float = 2e-5,
    warmup: int = 100,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    checkpoint_every: int = 100,
    layer_patterns: tuple | None = None,
    sparsity=None,
    compute_dtype: str | None = None,
    resume: bool = False,
    save_model: Callable | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> FinetuneResult:
    """Train the text decoder of ``model`` (a :class:`~qv_jax.runtime.VisionLanguageModel`) on ``data`` for
    ``steps`` steps of ``batch_tokens`` tokens (default: one row of ``seq_len``), writing into ``out``.

    ``sparsity``: a :class:`~qv_jax.attention.SparsityConfig` with per-layer kinds (``SparsityConfig.longgen``),
    the hybrid model to make and train, saved with the model; a model loaded with one (a saved hybrid) trains as
    that hybrid. ``layer_patterns``: hand-built per-layer patterns instead (per layer, one
    :class:`~qv_jax.attention.patterns.HeadPattern` per stored KV head, or one for all), not saved with the model;
    neither trains the dense model. ``compute_dtype``: the dtype the forward runs in (default the model's; the
    master weights and optimizer state are float32 either way).
    ``resume``: continue from the newest complete checkpoint in ``out/checkpoints`` (a fresh start if none);
    without it ``out`` must be new or empty. ``save_model(model, directory)`` writes the final model (default
    ``model.save``). ``progress(step, loss, tokens_per_s)`` is called after every step.
    """
    t = model.config.text
    batch_tokens = seq_len if batch_tokens is None else batch_tokens
    if seq_len < 2 or steps < 1 or checkpoint_every < 1 or warmup < 0:
        raise InputError(
            f"need seq_len >= 2, steps >= 1, checkpoint_every >= 1 and warmup >= 0; got seq_len={seq_len}, "
            f"steps={steps}, checkpoint_every={checkpoint_every}, warmup={warmup}"
        )
    if batch_tokens < seq_len or batch_tokens % seq_len:
        raise InputError(f"batch_tokens {batch_tokens} must be a positive multiple of seq_len {seq_len}")
    rows = batch_tokens // seq_len
    data_shards = 1 if model.plan is None else model.plan.mesh.shape.get("data", 1)
    if rows % data_shards:
        raise InputError(f"{rows} rows per batch do not split over the mesh's {data_shards} data shards")
    if sparsity is not None:
        if model.sparsity is not None and model.sparsity != sparsity.retrieval_first():
            raise ConfigError("the model already has a sparsity config (a saved hybrid): finetune it as it is")
        model = with_sparsity(model, sparsity)
    if model.sparsity is not None:
        if layer_patterns is not None:
            raise ConfigError("give layer_patterns or a sparsity config, not both")
        layer_patterns = model.sparsity.layer_patterns(t.num_layers, t.num_kv_heads, model.kv_repeat)
        repeat = 1  # already per running KV head
    else:
        repeat = model.kv_repeat
    check_patterns(layer_patterns, num_layers=t.num_layers, seq_len=seq_len)
    out = Path(out).absolute()
    if not resume:
        check_output(out, overwrite=False)
    elif out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is a file")
    data.batch(0, rows, seq_len)  # the data's own errors (e.g. a row too short for the task) before any work

    config = StepConfig(
        steps=steps,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        clip=clip,
        compute_dtype=str(jnp.dtype(compute_dtype or model.dtype)),
        attention=model.attention,
        layer_patterns=_replicated(layer_patterns, repeat),
    )
    text_def, treedef, params = split_text(model)
    with model.mesh_context():
        opt_state = make_init(config)(params)
    sparse = None if model.sparsity is None else model.sparsity.fold_replicas(model.kv_repeat)
    architecture = {
        "config": model.checkpoint_config.to_dict(),
        "sparsity": None if sparse is None else sparse.to_dict(),
        "layer_patterns": None if layer_patterns is None else repr(layer_patterns),
    }
    architecture = json.loads(json.dumps(architecture))  # as it reads back: lists, not tuples
    start, position = 0, 0
    if resume:
        _check_architecture(out / CHECKPOINTS / ARCHITECTURE, architecture)
        like = {"params": params, "opt_state": opt_state, "step": np.int64(0), "position": np.int64(0)}
        found = checkpoint.restore(out / CHECKPOINTS, like)
        if found is not None:
            start, restored = found
            params, opt_state, position = restored["params"], restored["opt_state"], int(restored["position"])
    (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    with atomic_output(out / CHECKPOINTS / ARCHITECTURE, overwrite=True, directory=False) as partial:
        partial.write_text(json.dumps(architecture, indent=1) + "\n")
    entries = _read_log(out / LOG, start)
    _write_log(out / LOG, entries)

    step = make_step(text_def, treedef, config)
    put = jnp.asarray if model.plan is None else model.plan.put_batch
    with open(out / LOG, "a") as log:
        for index in range(start, steps):
            began = time.perf_counter()
            batch, position = data.batch(position, rows, seq_len)
            with model.mesh_context():
                params, opt_state, loss = step(params, opt_state, tuple(put(a) for a in batch_arrays(batch)))
            loss = float(loss)
            entry = {"step": index + 1, "loss": loss, "tokens_per_s": batch.tokens / (time.perf_counter() - began)}
            entries.append(entry)
            log.write(json.dumps(entry) + "\n")  # one write of one line: a reader never sees half of it
            log.flush()
            done = index + 1
            if done % checkpoint_every == 0 or done == steps:
                tree = {
                    "params": params,
                    "opt_state": opt_state,
                    "step": np.int64(done),
                    "position": np.int64(position),
                }
                checkpoint.save(out / CHECKPOINTS, done, tree)
                plot_losses(out / CURVE, entries)
            if progress is not None:
                progress(done, loss, entry["tokens_per_s"])
    if not entries:
        raise InputError(f"{out}: nothing to train: its checkpoint is already at step {start} of {steps}")
    trained = with_text_params(model, text_def, treedef, params)
    (save_model or (lambda m, d: m.save(d, overwrite=True)))(trained, out / MODEL)
    return FinetuneResult(trained, np.asarray([e["loss"] for e in entries], np.float32), out)


def with_sparsity(model, sparsity):
    """``model`` (loaded without sparsity) as the hybrid ``sparsity`` describes (heads reordered if it has
    DuoAttention streaming heads)."""
    from qv_jax.runtime.vlm import VisionLanguageModel

    if model.sparsity is not None:
        return model
    return VisionLanguageModel(
        model.config,
        model.graphdef,
        model.state,
        tokenizer=model.tokenizer,
        eos_token_ids=model.eos_token_ids,
        pad_token_id=model.pad_token_id,
        source=model.source,
        plan=model.plan,
        sparsity=sparsity,
        attention=model.attention,
    )


def with_text_params(model, text_def, treedef, params):
    """``model`` (a copy: the arrays it shares are not changed) with its text decoder's parameters replaced by
    ``params``, cast to the model's dtype; its sparsity config and head order stay."""
    dtype = model.dtype
    text_state = jax.tree.unflatten(treedef, [p.astype(dtype) for p in params])
    whole = nnx.merge(model.graphdef, jax.tree.map(lambda x: x, model.state))  # fresh variables: model stays
    nnx.update(whole.text, text_state)
    trained = copy.copy(model)
    trained.state = nnx.split(whole)[1]
    return trained
