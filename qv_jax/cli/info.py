"""``qv-jax info``: what a bug report needs — the versions, the devices, which attention backends run here, the
decoder's workers and shared memory, and with ``--model`` the model's size per device. See docs/guide.md."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

from qv_jax.cli.options import add_placement_options
from qv_jax.cli.report import plural, print_json
from qv_jax.errors import InputError, QVError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="versions, devices, attention backends and decoder resources (what a bug report needs)",
        description="Print the versions of qv-jax and what it runs on (jax, jaxlib, flax, PyAV and its FFmpeg "
        "libraries), the devices and backend, which attention backends this machine can run, the decoder's "
        "worker count and shared-memory space; with --model, the model's config, parameter count and bytes per "
        "device.",
    )
    parser.add_argument(
        "--model", type=Path, help="also describe this model directory, Hugging Face or qv-jax (default: none)"
    )
    add_placement_options(
        parser,
        dtype="with --model: the dtype its bytes are counted in",
        mesh="with --model: the parameter bytes each device holds on this (data, model) mesh of the first "
        "DATA*MODEL devices",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text (default: text)")
    parser.set_defaults(func=run)


def versions() -> dict:
    import av
    import flax
    import jax
    import jaxlib
    import numpy

    import qv_jax

    ffmpeg = {name: ".".join(map(str, v)) for name, v in av.library_versions.items()}
    return {
        "qv-jax": qv_jax.__version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": numpy.__version__,
        "PyAV": av.__version__,
        "FFmpeg": ffmpeg,
    }


def devices() -> dict:
    import jax

    listed = []
    for device in jax.devices():
        stats = device.memory_stats() or {}
        listed.append(
            {"id": device.id, "kind": device.device_kind, "process": device.process_index}
            | ({"memory_bytes": stats["bytes_limit"]} if "bytes_limit" in stats else {})
        )
    return {"backend": jax.default_backend(), "processes": jax.process_count(), "devices": listed}


def attention_backends() -> dict:
    """Each backend: ``"yes"`` or why it cannot run here; and what ``auto`` runs per call kind."""
    from qv_jax.attention.backends import AUTO, AttentionConfig, Backend, platform

    can = {}
    for backend in Backend:
        if backend == Backend.AUTO:
            continue
        try:
            AttentionConfig(backend)
            can[str(backend)] = "yes"
        except QVError as e:
            can[str(backend)] = f"no: {e}"
    auto = {str(kind): str(chosen) for kind, chosen in AUTO.get(platform(), AUTO["cpu"]).items()}
    return {"runs": can, "auto": auto}


def decoder() -> dict:
    from qv_jax.video.buffer import buffer_dirs
    from qv_jax.video.pool import cpu_limit

    space = {}
    for directory in buffer_dirs():
        usage = shutil.disk_usage(directory)
        space[directory] = {"free_bytes": usage.free, "total_bytes": usage.total}
    return {"workers": cpu_limit(), "frame_buffer_space": space}


def model_info(path: Path, mesh_shape: tuple[int, int] | None, dtype: str | None) -> dict:
    """The config, parameter count and bytes per device of the model in ``path``, without reading its weights."""
    import jax
    import numpy as np

    from qv_jax.converters.hf_config import config_from_hf
    from qv_jax.model.checkpoint import is_checkpoint, read_config

    if not path.is_dir():
        raise InputError(f"{path}: no such model directory")
    if is_checkpoint(path):
        config, stored = read_config(path)
    elif (path / "config.json").is_file():
        config = config_from_hf(path)  # a malformed config.json fails here, as a typed error
        raw = json.loads((path / "config.json").read_text())
        stored = str(raw.get("torch_dtype") or raw.get("dtype") or "not stated")
    else:
        raise InputError(f"{path}: neither a qv-jax checkpoint nor a Hugging Face model (config.json)")
    if dtype is None:
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
    count = sum(int(np.prod(shape)) for shape in _shapes(config).values())
    record = {"path": str(path), "variant": config.variant, "stored_dtype": stored, "dtype": dtype}
    record |= {"parameters": count, "bytes": count * itemsize, "config": config.to_dict()}
    if mesh_shape is None:
        record["mesh"], record["bytes_per_device"] = None, count * itemsize
        return record
    from qv_jax.sharding import make_mesh
    from qv_jax.sharding.plan import ShardingPlan

    data, model = mesh_shape
    available = jax.devices()
    if data * model > len(available):
        raise InputError(f"--mesh {data}x{model} needs {data * model} devices, {len(available)} visible")
    plan = ShardingPlan.create(config, make_mesh(data=data, model=model, devices=available[: data * model]))
    shapes = _shapes(plan.config)  # as it runs: KV heads repeated when the model axis outnumbers them
    per_device = sum(int(np.prod(sharding.shard_shape(shapes[p]))) for p, sharding in plan.param_shardings.items())
    record["mesh"], record["bytes_per_device"] = [data, model], per_device * itemsize
    record["kv_repeat"] = plan.kv_repeat
    return record


def _shapes(config) -> dict:
    """Parameter path -> shape, from an abstract model (nothing allocated)."""
    from flax import nnx

    from qv_jax.model.qwen2_5_vl import abstract_model

    _, abstract = abstract_model(config)
    return {tuple(path): var.get_value().shape for path, var in nnx.to_flat_state(abstract)}


def run(args: argparse.Namespace) -> int:
    if args.model is None and (args.mesh is not None or args.dtype is not None):
        raise InputError("--mesh and --dtype describe a model: give --model too")
    record = {"versions": versions(), **devices(), "attention": attention_backends(), "decoder": decoder()}
    if args.model is not None:
        record["model"] = model_info(args.model, args.mesh, args.dtype)
    if args.json:
        print_json(record)
    else:
        print(_text(record))
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _text(record: dict) -> str:
    v = record["versions"]
    ffmpeg = ", ".join(f"{name} {version}" for name, version in v["FFmpeg"].items())
    lines = [f"qv-jax {v['qv-jax']} (Python {v['python']} on {sys.platform})"]
    lines.append(f"jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, numpy {v['numpy']}")
    lines.append(f"PyAV {v['PyAV']}: {ffmpeg}")
    devices_text = ", ".join(
        f"{d['id']}: {d['kind']}" + (f" ({_size(d['memory_bytes'])})" if "memory_bytes" in d else "")
        for d in record["devices"]
    )
    lines.append(f"backend {record['backend']}, {plural(len(record['devices']), 'device')}: {devices_text}")
    attention = record["attention"]
    lines.append("attention backends: " + "; ".join(f"{name} {can}" for name, can in attention["runs"].items()))
    lines.append("auto runs: " + ", ".join(f"{kind} -> {backend}" for kind, backend in attention["auto"].items()))
    decoder_info = record["decoder"]
    space = "; ".join(
        f"{where} {_size(s['free_bytes'])} free of {_size(s['total_bytes'])}"
        for where, s in decoder_info["frame_buffer_space"].items()
    )
    lines.append(f"decoder: {plural(decoder_info['workers'], 'worker')} at most; frame buffers in {space}")
    if "model" in record:
        m = record["model"]
        text, vision = m["config"]["text"], m["config"]["vision"]
        mesh = "one device" if m["mesh"] is None else "a {}x{} mesh".format(*m["mesh"])
        lines.append(
            f"model {m['path']}: {m['variant']}, {_count(m['parameters'])} parameters ({m['parameters']:,}), "
            f"{text['num_layers']} text layers of {text['hidden_size']} ({text['num_heads']} heads, "
            f"{text['num_kv_heads']} KV heads), {vision['depth']} vision blocks; stored dtype {m['stored_dtype']}"
        )
        lines.append(f"  {m['dtype']}: {_size(m['bytes'])} in all, {_size(m['bytes_per_device'])} per device on {mesh}")
    return "\n".join(lines)
