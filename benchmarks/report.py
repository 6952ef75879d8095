"""A markdown page from benchmark JSON records: the machine they ran on, then each record's tables.

``python -m benchmarks.report OUT.md A.json B.json ...`` (``benchmarks/accelerator.sh`` calls it). Every list of
flat dicts in a record becomes a table; scalar results (ratios, flags) become a list under it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _flat(value: object) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def section(record: dict, source: str) -> str:
    parts = [f"## {record.get('benchmark', source)}", "", f"From `{source}`, measured {record.get('time', '?')}."]
    for key, value in record.items():
        if (
            isinstance(value, list)
            and value
            and all(isinstance(r, dict) and all(map(_flat, r.values())) for r in value)
        ):
            parts += ["", f"**{key}**", "", markdown_table(value)]
    scalars = {k: v for k, v in record.items() if k not in ("benchmark", "time") and _flat(v)}
    if scalars:
        parts += [""] + [f"- {k}: {_cell(v)}" for k, v in scalars.items()]
    return "\n".join(parts)


def report(records: dict[str, dict], title: str) -> str:
    machine = next((r["machine"] for r in records.values() if "machine" in r), {})
    devices = ", ".join(machine.get("devices", [])) or "unknown"
    head = [
        f"# {title}",
        "",
        f"Device: {devices}; jax {machine.get('jax', '?')}, Python {machine.get('python', '?')}, "
        f"{machine.get('cpu_count', '?')} CPU cores, {machine.get('platform', '?')}.",
    ]
    return "\n\n".join(["\n".join(head), *(section(r, s) for s, r in records.items())]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="markdown file to write")
    parser.add_argument("records", type=Path, nargs="+", help="benchmark JSON files (missing ones are noted)")
    parser.add_argument("--title", default="Benchmarks on an accelerator")
    args = parser.parse_args(argv)
    records, missing = {}, []
    for path in args.records:
        try:
            records[path.name] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            missing.append(f"- `{path.name}`: not produced ({e.__class__.__name__}: {e})")
    text = report(records, args.title)
    if missing:
        text += "\n## Missing\n\n" + "\n".join(missing) + "\n"
    partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    partial.write_text(text)
    partial.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
