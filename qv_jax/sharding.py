"""The model, its KV caches and its inputs on a ``jax.sharding`` mesh: tensor parallel over ``"model"``, data
parallel over ``"data"``.

A mesh has two axes (:func:`make_mesh`). Parameters carry their partition specs next to their definitions in
``qv_jax.model.qwen2_5_vl`` (``nnx.get_partition_spec``): attention heads, MLP width and vocabulary on
``"model"``. A :class:`ShardingPlan` turns those specs into ``NamedSharding`` s for one model on one mesh and
places weights one tensor at a time, each device receiving only its slice. Everything else — activations,
collectives, the layout of intermediate values — is left to XLA's SPMD partitioner inside the jitted steps.

The head rule (Qwen2.5-VL-7B has 28 query heads and 4 KV heads, 3B has 16 and 2):

1. the model axis ``M`` must divide the number of query heads ``N``; otherwise :class:`ShardingError`, listing the
   model-axis sizes that work;
2. if ``M`` divides the number of KV heads ``K``, KV heads are split like query heads;
3. if ``K`` divides ``M``, each KV head is *replicated* ``M / K`` times when the weights are placed (the ``k`` /
   ``v`` projections are repeated head by head), so every device holds exactly the KV head its query heads read,
   and the KV cache is split by (replicated) KV head: per device it holds ``1 / K`` of the model's KV, the least
   possible. The runtime config then says ``num_kv_heads = M`` (:attr:`ShardingPlan.config`); checkpoints are
   always written in the original layout (:meth:`ShardingPlan.checkpoint_value`);
4. otherwise (e.g. ``K = 4``, ``M = 6``) :class:`ShardingError`.

So 7B runs on model axes of 1, 2, 4 or 28, and 3B on 1, 2, 4, 8 or 16. A parameter whose annotated dimension the
axis does not divide (the vision MLP width 3420 of Qwen2.5-VL on 8 devices) is split along its largest dimension
the axis does divide instead (the vision width 1280), or kept whole when there is none: memory stays split, XLA
adds the collectives the other layout needs; :meth:`ShardingPlan.moved` names those parameters.

Batches go on ``"data"`` when the data axis divides the batch size and are replicated otherwise (a single question
on a ``data=8`` mesh still runs, on every data shard alike). The vision tower splits a video's frames over
``"data"`` (:func:`encode_patches_by_frames`), its weights staying split over ``"model"``.

Multi-host: call ``jax.distributed.initialize(...)`` first in every process, then build the mesh from
``jax.devices()`` (all processes' devices); every process runs the same program with the same arguments
(see docs/sharding.md). :func:`put` and :func:`to_host` move host arrays in and out of global arrays in a way
that works with one process or many.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qv_jax.cache.dense import KVCache
from qv_jax.errors import ShardingError
from qv_jax.model.checkpoint import load_checkpoint, read_config
from qv_jax.model.config import ModelConfig
from qv_jax.model.qwen2_5_vl import abstract_model

DATA_AXIS = "data"
MODEL_AXIS = "model"
AXES = (DATA_AXIS, MODEL_AXIS)

ParamPath = tuple[str | int, ...]
T = TypeVar("T")

# Parameters that hold one slice per KV head, and the axis of those heads (replicated by the head rule).
_KV_HEAD_AXIS = {"k": 1, "v": 1, "k_bias": 0, "v_bias": 0}


# How the fields of the dense KV cache (qv_jax.cache.dense.KVCache) lie on a mesh, in the letters of
# ShardingPlan.layout_sharding: keys / values by row and KV head, slot segment ids by row.
DENSE_CACHE_LAYOUTS = {"k": "BH..", "v": "BH..", "segment_ids": "B.", "length": ""}

# How the fields of the sparse decoding cache (``qv_jax.cache.sparse.SparseKVCache``) lie on a mesh, in the
# letters of ShardingPlan.layout_sharding: pools, key statistics and page lists by row and KV head.
SPARSE_CACHE_LAYOUTS = {
    "k": "BH..",
    "v": "BH..",
    "k_min": "BH..",
    "k_max": "BH..",
    "stream_k": "BH..",
    "stream_v": "BH..",
    "selected": "BH.",
    "segment_ids": "B.",
    "stream_slot": "B.",
    "num_valid": "B",
    "length": "",
    "selected_at": "",
}


# How the fields of QuickPrefill's pruned memory (``qv_jax.pipeline.cache.LayeredKV``, one row) lie on a mesh: keys /
# values by KV head, slot token indices and fills whole.
MEMORY_LAYOUTS = {"k": "BH..", "v": "BH..", "token_index": "...", "lengths": "."}


# ---------------------------------------------------------------------------------------------------------------
# Meshes


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


# ---------------------------------------------------------------------------------------------------------------
# The head rule


def valid_model_axes(num_heads: int, num_kv_heads: int) -> list[int]:
    """Model-axis sizes the head rule accepts for ``num_heads`` query and ``num_kv_heads`` KV heads."""
    return [
        m for m in range(1, num_heads + 1) if num_heads % m == 0 and (num_kv_heads % m == 0 or m % num_kv_heads == 0)
    ]


def kv_head_repeat(num_heads: int, num_kv_heads: int, model: int) -> int:
    """How many times each KV head is replicated on a model axis of size ``model`` (1: KV heads are split)."""
    if num_heads % model == 0:
        if num_kv_heads % model == 0:
            return 1
        if model % num_kv_heads == 0:
            return model // num_kv_heads
    raise ShardingError(
        f"{num_heads} query heads and {num_kv_heads} KV heads cannot be laid out on a model axis of {model}: "
        f"the model axis must divide the query heads and divide or be a multiple of the KV heads; valid sizes "
        f"for this model: {valid_model_axes(num_heads, num_kv_heads)}"
    )


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
# Moving arrays in and out


def put(value, sharding: jax.sharding.Sharding, dtype=None) -> jax.Array:
    """A global array with ``sharding`` made from a host array that every process holds in full.

    Each device receives only its slice, read from ``value`` (a numpy array or a view of one, e.g. a memory map)
    and cast to ``dtype``; slices shared by several devices (replication) are read once.
    """
    host = value if isinstance(value, np.ndarray) else np.asarray(value)
    dtype = np.dtype(host.dtype if dtype is None else jnp.dtype(dtype))
    slices: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in slices:
            # always a copy: a device array must never alias a read-only memory map of a checkpoint
            slices[key] = np.array(host[index], dtype=dtype, order="C", copy=True)
        return slices[key]

    return jax.make_array_from_callback(host.shape, sharding, shard)


def to_host(x: jax.Array) -> np.ndarray:
    """A (global) array as one numpy array in this process; gathers across processes when needed."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def bytes_per_device(tree) -> dict[jax.Device, int]:
    """Bytes each (local) device holds of the arrays in ``tree``."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


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

    def batch_axis(self, batch: int) -> str | None:
        """``"data"`` when the data axis divides ``batch``, else ``None`` (rows replicated)."""
        return DATA_AXIS if batch % self.data_size == 0 else None

    def batch_sharding(self, shape: Sequence[int], batch_dim: int = 0) -> NamedSharding:
        """Rows (dimension ``batch_dim``) on ``"data"`` when it divides them, the rest replicated."""
        entries = [None] * len(shape)
        entries[batch_dim] = self.batch_axis(shape[batch_dim])
        return self.sharding(P(*entries))

    def put_batch(self, value, batch_dim: int = 0) -> jax.Array:
        """A host array of a batch (rows on ``batch_dim``) as a global array, rows on ``"data"``."""
        host = np.asarray(value)
        return put(host, self.batch_sharding(host.shape, batch_dim))

    def layout_sharding(self, shape: Sequence[int], layout: str) -> NamedSharding:
        """Sharding of an array described by letters, one per dimension: ``B`` rows (on ``"data"`` when it divides
        them), ``H`` KV heads (on ``"model"`` when it divides them), anything else whole."""
        entries = []
        for letter, dim in zip(layout, shape, strict=True):
            if letter == "B":
                entries.append(self.batch_axis(dim))
            elif letter == "H":
                entries.append(MODEL_AXIS if dim % self.model_size == 0 else None)
            else:
                entries.append(None)
        return self.sharding(P(*entries))

    def tree_shardings(self, cache, layouts: dict[str, str]):
        """Shardings of a dataclass cache (or its ``jax.eval_shape``) whose fields are arrays or tuples of arrays
        (one per layer), each laid out as ``layouts[field]`` (:meth:`layout_sharding` letters)."""
        changes = {}
        for field, layout in layouts.items():
            value = getattr(cache, field)
            if isinstance(value, tuple):
                changes[field] = tuple(self.layout_sharding(x.shape, layout) for x in value)
            else:
                changes[field] = self.layout_sharding(value.shape, layout)
        return dataclasses.replace(cache, **changes)

    def create_in_shards(self, create: Callable[..., T], layouts: dict[str, str], **kwargs) -> T:
        """``create(**kwargs)`` (a cache constructor whose arguments fix every shape) run so that every field comes
        out in its shards, laid out by ``layouts`` (:meth:`tree_shardings`): no device ever holds the whole cache.

        Compiled once per constructor, arguments and layouts: pass the arguments here (hashable), not bound into a
        fresh ``functools.partial``, which would compile on every call."""
        return _constructor_in_shards(self, create, tuple(sorted(kwargs.items())), tuple(layouts.items()))()

    def new_cache(self, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
        """An empty dense cache created directly in its shards (no device ever holds the whole of it): k / v
        ``[B, K, S, H]`` by KV head on ``"model"`` and rows on ``"data"``, slot segment ids by row."""
        text = self.config.text
        return self.create_in_shards(
            KVCache.create,
            DENSE_CACHE_LAYOUTS,
            num_layers=text.num_layers,
            batch=batch,
            capacity=capacity,
            num_kv_heads=text.num_kv_heads,
            head_dim=text.head_dim,
            dtype=dtype,
        )

    def shard_cache(self, cache: KVCache) -> KVCache:
        """A dense cache built elsewhere (e.g. unsharded) moved to the layout of :meth:`new_cache`."""
        return jax.device_put(cache, self.tree_shardings(cache, DENSE_CACHE_LAYOUTS))

    def new_sparse_cache(self, sparsity, batch: int, capacity: int, dtype=jnp.float32):
        """An empty ``SparseKVCache`` (``sparsity`` in the model's retrieval-first head order) created in its shards:
        a layer's paged pool, key min / max and page lists split by KV head when the model axis divides its
        retrieval heads, its streaming pool likewise for its streaming heads, otherwise whole per row shard."""
        from qv_jax.cache.sparse import SparseKVCache

        text = self.config.text
        cache = self.create_in_shards(
            SparseKVCache.create,
            SPARSE_CACHE_LAYOUTS,
            sparsity=sparsity,
            num_kv_heads=text.num_kv_heads,
            batch=batch,
            capacity=capacity,
            head_dim=text.head_dim,
            dtype=dtype,
            num_layers=text.num_layers,
        )
        return self._with_replicas(cache)

    def shard_sparse_cache(self, cache):
        """A ``SparseKVCache`` built elsewhere (e.g. ``SparseKVCache.from_dense`` of a video memory) moved to the
        layout of :meth:`new_sparse_cache`."""
        return self._with_replicas(jax.device_put(cache, self.tree_shardings(cache, SPARSE_CACHE_LAYOUTS)))

    def shard_memory(self, memory):
        """A video memory (``qv_jax.pipeline.LayeredKV``, e.g. loaded on one device) moved to :data:`MEMORY_LAYOUTS`."""
        return jax.device_put(memory, self.tree_shardings(memory, MEMORY_LAYOUTS))

    def _with_replicas(self, cache):
        # replicas of a KV head must select the pages the head would (see SparseLayout.kv_repeat)
        return dataclasses.replace(cache, layout=dataclasses.replace(cache.layout, kv_repeat=self.kv_repeat))


@functools.lru_cache(maxsize=32)
def _constructor_in_shards(plan: ShardingPlan, create: Callable, kwargs: tuple, layouts: tuple) -> Callable:
    """``create(**kwargs)`` jitted to return its fields in the shards of ``layouts`` (see
    :meth:`ShardingPlan.create_in_shards`); kept, so that a cache of a shape already made does not compile again."""
    bound = functools.partial(create, **dict(kwargs))
    return jax.jit(bound, out_shardings=plan.tree_shardings(jax.eval_shape(bound), dict(layouts)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _repeat_heads(value: jax.Array, repeat: int, axis: int, sharding: NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(jnp.repeat(value, repeat, axis=axis), sharding)


# ---------------------------------------------------------------------------------------------------------------
# The vision tower on a mesh: frames over "data", weights split over "model"


def splits_frames(mesh: Mesh, temporal_patches: int) -> bool:
    """Whether one video of ``temporal_patches`` (frame pairs) is encoded with its frames split over ``"data"``:
    a data axis larger than one that divides them."""
    data = mesh.shape[DATA_AXIS]
    return data > 1 and temporal_patches % data == 0


def _vision_over_data(encode, mesh: Mesh):
    """``encode(state, local_input)`` run per data shard: the ``"data"`` axis manual (each shard its own frames,
    the state whole along it), the ``"model"`` axis left to the partitioner (the weights stay split)."""
    return jax.shard_map(
        encode,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS)),
        out_specs=P(DATA_AXIS),
        axis_names={DATA_AXIS},
        check_vma=False,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "grid", "mesh"))
def encode_patches_by_frames(graphdef: nnx.GraphDef, state: nnx.State, patches_PC, grid, mesh: Mesh) -> jax.Array:
    """Visual embeddings ``[tokens, D]`` of one video's patchified pixels (``grid = ((t, h, w),)``, the processor's
    frame-major order) with its frames split over ``"data"`` (needs :func:`splits_frames`).

    Without this, every data shard would encode the whole video; with it each encodes ``t / data`` temporal patches.
    Exact: vision attention (windows and full) never crosses frames, and tokens come out frame-major.
    """
    ((t, h, w),) = grid
    local = ((t // mesh.shape[DATA_AXIS], h, w),)

    def encode(state, patches):
        return nnx.merge(graphdef, state).encode_vision(patches, local)

    return _vision_over_data(encode, mesh)(state, patches_PC)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def encode_frames_by_frames(graphdef: nnx.GraphDef, state: nnx.State, frames_THWC, mesh: Mesh) -> jax.Array:
    """:func:`encode_patches_by_frames` for uint8 frames ``[T, H, W, 3]`` (patchified on device, per shard); ``T``
    must split into whole temporal patches per data shard."""
    from qv_jax.model.preprocess import patchify

    def encode(state, frames):
        model = nnx.merge(graphdef, state)
        patches, grid = patchify(frames, model.config.vision)
        return model.encode_vision(patches, grid)

    return _vision_over_data(encode, mesh)(state, frames_THWC)


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


def restore_checkpoint(path: str | os.PathLike, mesh: Mesh, dtype=None) -> tuple[ShardingPlan, nnx.GraphDef, nnx.State]:
    """A qv-jax checkpoint restored onto ``mesh``: orbax reads each device's slice of each parameter straight
    into its shard; KV projections of a replicated-KV plan are restored whole and then repeated per device."""
    config, _ = read_config(path)
    plan = ShardingPlan.create(config, mesh)
    _, _, state = load_checkpoint(path, dtype, sharding=lambda p, _: plan.checkpoint_sharding(p))
    values = {tuple(p): plan.runtime_value(tuple(p), v.get_value()) for p, v in nnx.to_flat_state(state)}
    return plan, *plan.build(values)
