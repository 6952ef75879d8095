"""The device mesh: two axes, ``"data"`` (rows of a batch) and ``"model"`` (heads, MLP width, vocabulary).

See docs/sharding.md. Multi-host: call ``jax.distributed.initialize(...)`` in every process before building a mesh
from ``jax.devices()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from qv_jax.errors import ShardingError

DATA_AXIS = "data"
MODEL_AXIS = "model"
AXES = (DATA_AXIS, MODEL_AXIS)


def make_mesh(
    data: int | None = None, model: int | None = None, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: every device of every process).

    With neither size given the whole mesh is tensor parallel (``data=1``); with one given the other is what is
    left. Axes are ``Auto`` (XLA propagates shardings through the jitted steps). With several processes, devices
    are ordered by process, so a model axis that divides the local device count never leaves a host.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not n:
        raise ShardingError("make_mesh: no devices")
    for name, size in (("data", data), ("model", model)):
        if size is not None and (not isinstance(size, int | np.integer) or size < 1):
            raise ShardingError(f"make_mesh: {name}={size!r} must be a positive integer")
    if data is None and model is None:
        data, model = 1, n
    elif data is None or model is None:
        given, size = ("model", model) if data is None else ("data", data)
        if n % size:
            raise ShardingError(f"make_mesh: {given}={size} does not divide the {n} devices")
        data, model = (n // size, size) if data is None else (size, n // size)
    elif data * model != n:
        raise ShardingError(
            f"make_mesh: data={data} x model={model} does not use the {n} devices exactly "
            "(pass devices= to use a subset)"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    if len({d.process_index for d in devices}) > 1 and devices[0].platform != "tpu":
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        return Mesh(np.array(ordered, dtype=object).reshape(data, model), AXES, axis_types=axis_types)
    return jax.make_mesh((data, model), AXES, axis_types=axis_types, devices=devices)


def check_mesh(mesh: Mesh) -> None:
    """Raise :class:`ShardingError` unless ``mesh`` has exactly the axes ``("data", "model")``."""
    if not isinstance(mesh, Mesh):
        raise ShardingError(f"expected a jax.sharding.Mesh (see qv_jax.make_mesh), got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != AXES:
        raise ShardingError(f"mesh axes {tuple(mesh.axis_names)}; qv-jax needs {AXES} (use qv_jax.make_mesh)")


def context_mesh():
    """The qv-jax mesh of the enclosing ``jax.set_mesh`` (the runtime sets it around a sharded model's steps), or
    ``None``: no mesh, a single device, or already inside a ``shard_map``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or tuple(mesh.axis_names) != AXES:
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh
