"""What every benchmark script shares: timing, a printed table, and a JSON record naming the machine.

Benchmarks compare against a baseline measured in the same run, so results are read as ratios; absolute times
depend on the machine recorded in the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """The machine and library versions a result was measured with."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import jax

        info["jax"] = jax.__version__
        info["devices"] = [str(d) for d in jax.devices()]
    except ImportError:
        pass
    return info


def time_call(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1) -> dict:
    """Median and min wall time of ``fn()`` in seconds. ``fn`` must block until its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given columns; floats get 4 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(name: str, payload: dict, out: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` plus machine info to ``out`` (default ``benchmarks/results/<name>.json``)."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(), **payload}
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    return path
