"""How one model's weights, caches and inputs lie on a mesh: :class:`ShardingPlan` (docs/sharding.md).

Parameters carry their partition specs beside their definitions in ``qv_jax.model.qwen2_5_vl``; the plan turns
them into ``NamedSharding`` s, places weights one tensor at a time (each device receives only its slice), repeats
KV heads where the head rule (``qv_jax.sharding.heads``) says so, and creates caches directly in their shards.
Activations and collectives are left to XLA's SPMD partitioner inside the jitted steps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qv_jax.model.config import ModelConfig
from qv_jax.model.qwen2_5_vl import abstract_model
from qv_jax.sharding.heads import kv_head_repeat
from qv_jax.sharding.layout import layout_spec, tree_shardings
from qv_jax.sharding.mesh import DATA_AXIS, MODEL_AXIS, check_mesh
from qv_jax.sharding.transfer import put, to_host

ParamPath = tuple[str | int, ...]
T = TypeVar("T")

# Parameters that hold one slice per KV head, and the axis of those heads (replicated by the head rule).
_KV_HEAD_AXIS = {"k": 1, "v": 1, "k_bias": 0, "v_bias": 0}


# ---------------------------------------------------------------------------------------------------------------
# Parameter specs


def _spec_entries(spec) -> tuple:
    return tuple(spec) if spec is not None else ()


def fit_spec(spec: P | None, shape: Sequence[int], mesh: Mesh) -> P:
    """``spec`` made to fit ``shape`` on ``mesh``: an entry whose mesh axes do not divide its dimension moves to the
    largest unsplit dimension they divide (the parameter stays split, along another dimension), or is dropped
    (that dimension replicated) when there is none."""
    entries = list(_spec_entries(spec))
    entries += [None] * (len(shape) - len(entries))
    for i, entry in enumerate(entries):
        size = _axes_size(entry, mesh)
        if entry is None or shape[i] % size == 0:
            continue
        entries[i] = None
        free = [j for j, dim in enumerate(shape) if entries[j] is None and j != i and dim % size == 0]
        if free:
            entries[max(free, key=lambda j: shape[j])] = entry
    return P(*entries)


def _axes_size(entry, mesh: Mesh) -> int:
    """Devices along a spec entry (``None``, one axis name or a tuple of them)."""
    if entry is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry)]))


def _index(entries: Sequence, axis: str) -> int | None:
    return entries.index(axis) if axis in entries else None


def _flat_specs(state: nnx.State) -> dict[ParamPath, P]:
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(nnx.get_partition_spec(state))}


def _kv_head_axis(path: ParamPath) -> int | None:
    return _KV_HEAD_AXIS.get(path[-1]) if path and path[0] == "text" and isinstance(path[-1], str) else None


# ---------------------------------------------------------------------------------------------------------------
# One model on one mesh


@dataclasses.dataclass(frozen=True, eq=False)
class ShardingPlan:
    """How one model's weights, caches and inputs lie on ``mesh`` (see the module doc for the head rule).

    ``checkpoint_config`` is the model as stored; :attr:`config` the model as it runs (KV heads replicated when
    ``kv_repeat > 1``). Build with :meth:`create`.
    """

    mesh: Mesh
    checkpoint_config: ModelConfig
    kv_repeat: int

    @classmethod
    def create(cls, config: ModelConfig, mesh: Mesh) -> ShardingPlan:
        """Check the head rule for ``config`` on ``mesh``; raises :class:`ShardingError` when it cannot hold."""
        check_mesh(mesh)
        text = config.text
        return cls(mesh, config, kv_head_repeat(text.num_heads, text.num_kv_heads, mesh.shape[MODEL_AXIS]))

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA_AXIS]

    @property
    def model_size(self) -> int:
        return self.mesh.shape[MODEL_AXIS]

    @functools.cached_property
    def config(self) -> ModelConfig:
        """The config of the arrays that run (``num_kv_heads`` multiplied by :attr:`kv_repeat`)."""
        if self.kv_repeat == 1:
            return self.checkpoint_config
        text = self.checkpoint_config.text
        text = dataclasses.replace(text, num_kv_heads=text.num_kv_heads * self.kv_repeat)
        return dataclasses.replace(self.checkpoint_config, text=text)

    def sharding(self, spec: P | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, P() if spec is None else spec)

    # ---- parameters ---------------------------------------------------------------------------------------

    @functools.cached_property
    def _runtime(self) -> tuple[nnx.GraphDef, nnx.State]:
        return abstract_model(self.config)

    @functools.cached_property
    def param_shardings(self) -> dict[ParamPath, NamedSharding]:
        """Parameter path -> sharding of the running (replicated-KV) layout, from the parameters' specs."""
        _, abstract = self._runtime
        specs = _flat_specs(abstract)
        return {
            tuple(path): self.sharding(fit_spec(specs[tuple(path)], var.get_value().shape, self.mesh))
            for path, var in nnx.to_flat_state(abstract)
        }

    def moved(self) -> dict[str, str]:
        """Parameters the model axis does not divide where annotated: name -> where they are split instead
        (``"dim N"``) or ``"replicated"``."""
        _, abstract = self._runtime
        specs = _flat_specs(abstract)
        out = {}
        for path, sharding in self.param_shardings.items():
            annotated = _spec_entries(specs[path])
            placed = _spec_entries(sharding.spec) + (None,) * (len(annotated) - len(_spec_entries(sharding.spec)))
            if MODEL_AXIS in annotated and annotated.index(MODEL_AXIS) != _index(placed, MODEL_AXIS):
                where = _index(placed, MODEL_AXIS)
                out[".".join(map(str, path))] = "replicated" if where is None else f"dim {where}"
        return out

    def checkpoint_sharding(self, path: ParamPath) -> NamedSharding:
        """Where a parameter of the checkpoint layout is restored before :meth:`runtime_value` (same as the
        running layout, except the KV projections of a replicated-KV plan: whole, they are small)."""
        if self.kv_repeat > 1 and _kv_head_axis(path) is not None:
            return self.sharding(P())
        return self.param_shardings[tuple(path)]

    def runtime_value(self, path: ParamPath, value):
        """A checkpoint-layout parameter (numpy or jax) in the running layout: KV heads repeated when planned."""
        axis = _kv_head_axis(path)
        if self.kv_repeat == 1 or axis is None:
            return value
        if isinstance(value, jax.Array):
            return _repeat_heads(value, self.kv_repeat, axis, self.param_shardings[tuple(path)])
        return np.repeat(value, self.kv_repeat, axis=axis)

    def checkpoint_value(self, path: ParamPath, value):
        """A running-layout parameter in the checkpoint layout (one of each group of replicated KV heads)."""
        axis = _kv_head_axis(path)
        if self.kv_repeat == 1 or axis is None:
            return value
        return value[(slice(None),) * axis + (slice(None, None, self.kv_repeat),)]

    def place(self, path: ParamPath, value, dtype=None) -> jax.Array:
        """One checkpoint-layout host tensor (numpy or a memory-mapped view) as a sharded running-layout array."""
        return put(self.runtime_value(path, value), self.param_shardings[tuple(path)], dtype)

    def build(self, values: dict[ParamPath, jax.Array]) -> tuple[nnx.GraphDef, nnx.State]:
        """``(graphdef, state)`` of the running model from placed arrays (one per parameter path)."""
        graphdef, abstract = abstract_model(self.config)
        nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(values))
        return graphdef, abstract

    def place_state(self, state: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
        """A checkpoint-layout state (anywhere: host, one device) on the mesh, one tensor at a time."""
        values = {}
        for path, var in nnx.to_flat_state(state):
            value = var.get_value()
            values[tuple(path)] = self.place(tuple(path), value if isinstance(value, np.ndarray) else to_host(value))
        return self.build(values)

    def checkpoint_state(self, state: nnx.State) -> nnx.State:
        """The running ``state`` in the checkpoint layout (for saving); arrays stay where they are."""
        _, abstract = abstract_model(self.checkpoint_config)
        values = {
            tuple(path): self.checkpoint_value(tuple(path), var.get_value()) for path, var in nnx.to_flat_state(state)
        }
        nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(values))
        return abstract

    def reshard(self, state: nnx.State) -> nnx.State:
        """A running-layout state (e.g. transformed on device) moved back to the planned parameter shardings."""
        values = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}
        return self.build({p: jax.device_put(x, self.param_shardings[p]) for p, x in values.items()})[1]

    # ---- batches and caches -------------------------------------------------------------------------------

    def batch_sharding(self, shape: Sequence[int], batch_dim: int = 0) -> NamedSharding:
        """Rows (dimension ``batch_dim``) on ``"data"`` when it divides them, the rest replicated."""
        layout = "".join("B" if i == batch_dim else "." for i in range(len(shape)))
        return self.sharding(layout_spec(layout, shape, self.mesh))

    def put_batch(self, value, batch_dim: int = 0) -> jax.Array:
        """A host array of a batch (rows on ``batch_dim``) as a global array, rows on ``"data"``."""
        host = np.asarray(value)
        return put(host, self.batch_sharding(host.shape, batch_dim))

    def create_in_shards(self, create: Callable[..., T], **kwargs) -> T:
        """``create(**kwargs)`` (a cache constructor whose arguments fix every shape) run so that every field comes
        out in the shards its class declares (``qv_jax.sharding.layout``): no device ever holds the whole cache.

        Compiled once per constructor and arguments: pass the arguments here (hashable), not bound into a fresh
        ``functools.partial``, which would compile on every call."""
        return _constructor_in_shards(self, create, tuple(sorted(kwargs.items())))()

    def shard(self, tree: T) -> T:
        """A cache built elsewhere (e.g. on one device) moved to the shards its class declares."""
        return jax.device_put(tree, tree_shardings(tree, self.mesh))


@functools.lru_cache(maxsize=32)
def _constructor_in_shards(plan: ShardingPlan, create: Callable, kwargs: tuple) -> Callable:
    """``create(**kwargs)`` jitted to return its fields in their declared shards (see
    :meth:`ShardingPlan.create_in_shards`); kept, so that a cache of a shape already made does not compile again."""
    bound = functools.partial(create, **dict(kwargs))
    return jax.jit(bound, out_shardings=tree_shardings(jax.eval_shape(bound), plan.mesh))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _repeat_heads(value: jax.Array, repeat: int, axis: int, sharding: NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(jnp.repeat(value, repeat, axis=axis), sharding)


def describe(plan: ShardingPlan, dtype=jnp.float32) -> dict:
    """A summary of a plan for logs and benchmarks, from shapes alone (nothing is allocated): mesh, KV replication,
    parameters split along another dimension than annotated (:meth:`ShardingPlan.moved`), parameter bytes in all
    and per device."""
    _, abstract = plan._runtime  # shapes only: the dtype enters through its item size
    total = 0
    per_device = 0
    for path, var in nnx.to_flat_state(abstract):
        nbytes = int(np.prod(var.get_value().shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize
        total += nbytes
        sharding = plan.param_shardings[tuple(path)]
        per_device += nbytes // _shard_count(sharding)
    return {
        "mesh": dict(plan.mesh.shape),
        "kv_repeat": plan.kv_repeat,
        "moved": plan.moved(),
        "param_bytes": total,
        "param_bytes_per_device": per_device,
    }


def _shard_count(sharding: NamedSharding) -> int:
    return int(np.prod([_axes_size(e, sharding.mesh) for e in _spec_entries(sharding.spec)]))
