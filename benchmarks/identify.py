"""DuoAttention head identification (``qv_jax.duo``): what one training step costs, against what a user would
run instead, and how the two methods' patterns compare.

Per length: one plain forward of the frozen model (the floor), the training-free on-the-fly score of one sample,
and one optimisation step (gated forward with full and streaming attention, backward, AdamW), with its compiled
temporary memory with and without per-layer rematerialisation. Then both methods on the same model: their
50 %-streaming patterns' hidden-state distance on held-out samples, against a random pattern of the same size.
Last, what a full identification of Qwen2.5-VL-7B (2000 steps, 1K-32K tokens) would take on one H100 and on a
v5e-8: the 7B model's forward FLOPs at each length times the forwards a step does (:data:`STEP_FORWARDS`; the
step / forward time ratio measured here is printed beside it), at a stated fraction of each chip's peak (an
estimate, not a measurement, until an accelerator runs this file).
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
from benchmarks.e2e import PRESETS, random_model
from qv_jax.attention.heads import load_duo_attention_heads
from qv_jax.duo import identify_heads
from qv_jax.duo.data import passkey_sample, sample_lengths
from qv_jax.duo.gated import hidden_states, outside_mass
from qv_jax.duo.train import make_step, optimizer, sample_inputs, streaming_distance
from qv_jax.model.config import ModelConfig

MIB = 2**20


def temp_mib(step, *args) -> float:
    """XLA's temporary buffer size of a compiled step (what it holds besides its inputs and outputs); a step
    already run is not compiled again."""
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes / MIB


def time_length(model, length: int, *, sink: int, recent: int, steps: int, repeats: int) -> dict:
    x, positions, answer = sample_inputs(model, passkey_sample(model.tokenizer, length, np.random.default_rng(length)))
    g, s = model.graphdef, model.state
    forward = jax.jit(functools.partial(hidden_states, sink=sink, recent=recent), static_argnums=0)
    fwd = time_call(lambda: forward(g, s, x, positions).block_until_ready(), repeats=repeats)
    fly = time_call(
        lambda: outside_mass(g, s, x, positions, answer, sink=sink, recent=recent).block_until_ready(), repeats=repeats
    )
    t = model.config.text
    # the settings of the comparison's run below, whose compilations this one then shares
    settings = dict(lr=0.02, steps=steps, sink=sink, recent=recent, reg=0.05)
    step = make_step(g, **settings)
    holder = {"gates": jnp.ones((t.num_layers, t.num_kv_heads), jnp.float32)}
    holder["opt"] = optimizer(0.02, steps).init(holder["gates"])
    inputs = (holder["gates"], holder["opt"], s, x, positions, answer)
    memory = {
        "temp_mib_remat": temp_mib(step, *inputs),
        "temp_mib_no_remat": temp_mib(make_step(g, remat=False, **settings), *inputs),
    }

    def one_step():
        holder["gates"], holder["opt"], loss = step(holder["gates"], holder["opt"], s, x, positions, answer)
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


# A step's work in forwards of the frozen model: the teacher's forward, the gated student's (its streaming attention
# is small beside the rest), the student's recomputation under per-layer remat, and its backward (twice a forward).
STEP_FORWARDS = 5.0
# bf16 dense peak of one chip / slice, and the fraction of it a step is assumed to reach (a range, not measured)
ACCELERATORS = (("H100 SXM (1 chip)", 989e12), ("TPU v5e-8 (8 chips)", 8 * 197e12))
UTILISATION = (0.3, 0.5)


def forward_flops(config: ModelConfig, length: int) -> float:
    """Multiply-add FLOPs of one forward of the text decoder over ``length`` tokens to its hidden states: the
    projections and MLP of every layer, and causal attention's two matmuls (half the ``[T, T]`` square)."""
    t = config.text
    projections = 2 * t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    per_token = t.num_layers * (projections + 6 * t.hidden_size * t.intermediate_size)
    attention = t.num_layers * 2 * t.num_heads * t.head_dim * length * length
    return per_token * length + attention


def estimate_full_run(
    step_per_forward: float = STEP_FORWARDS, *, steps: int = 2000, min_length: int = 1024, max_length: int = 32768
):
    """Hours of a full identification of Qwen2.5-VL-7B on each accelerator at each assumed utilisation."""
    config = ModelConfig.qwen2_5_vl_7b()
    lengths = sample_lengths(min_length, max_length)  # each step draws one of these uniformly
    step_flops = step_per_forward * float(np.mean([forward_flops(config, int(n)) for n in lengths]))
    rows = []
    for name, peak in ACCELERATORS:
        hours = [steps * step_flops / (peak * u) / 3600 for u in UTILISATION]
        rows.append({"accelerator": name, "step_tflop": step_flops / 1e12, "hours_at_50%": hours[1],
                     "hours_at_30%": hours[0]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="bench", help="random model (default bench)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32; bfloat16 for 7b)")
    parser.add_argument("--no-compare", action="store_true", help="time the lengths only, no method comparison")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="sample lengths to time")
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="optimisation steps of the method comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/identify.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = random_model(args.preset, args.dtype, Path(scratch))
        rows = [
            time_length(model, n, sink=args.sink, recent=args.recent, steps=args.steps, repeats=args.repeats)
            for n in args.lengths
        ]
        methods = [] if args.no_compare else compare_methods(
            model, Path(scratch), length=min(args.lengths), steps=args.steps, sink=args.sink, recent=args.recent
        )  # fmt: skip
    columns = ["tokens", "forward_ms", "on_the_fly_ms", "step_ms", "steps_per_s", "step_per_forward"]
    print(format_table(rows, [*columns, "temp_mib_remat", "temp_mib_no_remat"]))
    if methods:
        print(format_table(methods, ["pattern", "streaming", "distance"]))
    estimate = estimate_full_run()
    measured = ", ".join(f"{row['step_per_forward']:.1f}x at {row['tokens']}" for row in rows)
    print(f"Qwen2.5-VL-7B, 2000 steps of 1K-32K tokens, a step = {STEP_FORWARDS:.0f} forwards (measured here on this")
    print(f"machine: {measured}), estimated:")
    print(format_table(estimate, ["accelerator", "step_tflop", "hours_at_50%", "hours_at_30%"]))
    t = model.config.text
    record = {
        "args": vars(args) | {"out": str(args.out) if args.out else None},
        "model": {"preset": args.preset, "layers": t.num_layers, "kv_heads": t.num_kv_heads, "width": t.hidden_size},
        "rows": rows,
        "methods": methods,
        "estimate_7b": {"step_per_forward": STEP_FORWARDS, "utilisation": UTILISATION, "rows": estimate},
    }
    print(f"wrote {write_json('identify', record, args.out)}")


if __name__ == "__main__":
    main()
