"""DuoAttention head identification (``qv_jax.duo``): what one training step costs, against what a user would
run instead, and how the two methods' patterns compare.

Per length: one plain forward of the frozen model (the floor), the training-free on-the-fly score of one sample,
and one optimisation step (gated forward with full and streaming attention, backward, AdamW), with its compiled
temporary memory with and without per-layer rematerialisation. Then both methods on the same model: their
50 %-streaming patterns' hidden-state distance on held-out samples, against a random pattern of the same size.
``--preset bench`` is the 42M-parameter, 8-layer model of benchmarks/e2e.py. Run ``python -m benchmarks.identify``;
prints tables and writes ``benchmarks/results/identify.json``. Results: docs/duo.md.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import format_table, time_call, write_json
from benchmarks.e2e import random_model
from qv_jax.attention.heads import load_duo_attention_heads
from qv_jax.duo import identify_heads
from qv_jax.duo.data import passkey_sample
from qv_jax.duo.gated import hidden_states, outside_mass
from qv_jax.duo.train import make_step, optimizer, streaming_distance

MIB = 2**20


def temp_mib(step, *args) -> float:
    """XLA's temporary buffer size of a compiled step (what it holds besides its inputs and outputs); a step
    already run is not compiled again."""
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes / MIB


def time_length(model, length: int, *, sink: int, recent: int, steps: int, repeats: int) -> dict:
    sample = passkey_sample(model.tokenizer, length, np.random.default_rng(length))
    ids, answer = jnp.asarray(sample.ids[None]), jnp.asarray(sample.answer[None])
    g, s = model.graphdef, model.state
    forward = jax.jit(functools.partial(hidden_states, sink=sink, recent=recent), static_argnums=0)
    fwd = time_call(lambda: forward(g, s, ids).block_until_ready(), repeats=repeats)
    fly = time_call(
        lambda: outside_mass(g, s, ids, answer, sink=sink, recent=recent).block_until_ready(), repeats=repeats
    )
    t = model.config.text
    # the settings of the comparison's run below, whose compilations this one then shares
    settings = dict(lr=0.02, steps=steps, sink=sink, recent=recent, reg=0.05)
    step = make_step(g, **settings)
    holder = {"gates": jnp.ones((t.num_layers, t.num_kv_heads), jnp.float32)}
    holder["opt"] = optimizer(0.02, steps).init(holder["gates"])
    inputs = (holder["gates"], holder["opt"], s, ids, answer)
    memory = {
        "temp_mib_remat": temp_mib(step, *inputs),
        "temp_mib_no_remat": temp_mib(make_step(g, remat=False, **settings), *inputs),
    }

    def one_step():
        holder["gates"], holder["opt"], loss = step(holder["gates"], holder["opt"], s, ids, answer)
        loss.block_until_ready()

    train = time_call(one_step, repeats=repeats)
    return {
        "tokens": length,
        "forward_ms": 1e3 * fwd["median_s"],
        "on_the_fly_ms": 1e3 * fly["median_s"],
        "step_ms": 1e3 * train["median_s"],
        "steps_per_s": 1.0 / train["median_s"],
        "step_per_forward": train["median_s"] / fwd["median_s"],
        **memory,
    }


def compare_methods(model, scratch: Path, *, length: int, steps: int, sink: int, recent: int) -> list[dict]:
    """Both methods' 50 % patterns and a random one: hidden-state distance on held-out samples (lower is better)."""
    settings = dict(sink=sink, recent=recent, min_length=length, max_length=length, seed=0)
    made = {
        "optimize": identify_heads(model, steps=steps, **settings),
        "on-the-fly": identify_heads(model, method="on-the-fly", **settings),
    }
    held_out = [passkey_sample(model.tokenizer, length, np.random.default_rng([7, i])) for i in range(2)]

    def distance(streaming: np.ndarray) -> float:
        return streaming_distance(model, streaming, held_out, sink=sink, recent=recent)

    rows = []
    for name, gates in made.items():
        mask = load_duo_attention_heads(gates.save(scratch / name), sparsity=0.5)
        rows.append({"pattern": name, "streaming": int(mask.sum()), "distance": distance(mask)})
    rng = np.random.default_rng(0)
    mask = np.zeros(mask.size, bool)
    mask[rng.choice(mask.size, rows[0]["streaming"], replace=False)] = True
    rows.append(
        {"pattern": "random", "streaming": int(mask.sum()), "distance": distance(mask.reshape(gates.gates.shape))}
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("tiny", "bench"), default="bench", help="random model (default bench)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="sample lengths to time")
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="optimisation steps of the method comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/identify.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = random_model(args.preset, "float32", Path(scratch))
        rows = [
            time_length(model, n, sink=args.sink, recent=args.recent, steps=args.steps, repeats=args.repeats)
            for n in args.lengths
        ]
        methods = compare_methods(
            model, Path(scratch), length=min(args.lengths), steps=args.steps, sink=args.sink, recent=args.recent
        )
    columns = ["tokens", "forward_ms", "on_the_fly_ms", "step_ms", "steps_per_s", "step_per_forward"]
    print(format_table(rows, [*columns, "temp_mib_remat", "temp_mib_no_remat"]))
    print(format_table(methods, ["pattern", "streaming", "distance"]))
    t = model.config.text
    record = {
        "args": vars(args) | {"out": str(args.out) if args.out else None},
        "model": {"preset": args.preset, "layers": t.num_layers, "kv_heads": t.num_kv_heads, "width": t.hidden_size},
        "rows": rows,
        "methods": methods,
    }
    print(f"wrote {write_json('identify', record, args.out)}")


if __name__ == "__main__":
    main()
