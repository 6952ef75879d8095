"""Attention kernels run per shard on a mesh: ``shard_map`` over KV heads (``"model"``) and rows (``"data"``).

XLA's partitioner splits the jnp attention of ``qv_jax.attention.dense`` by itself, but a Pallas kernel is opaque
to it: left alone it would be gathered onto every device and run whole. Here each device runs the kernel on its
own KV heads (and the query heads of their groups) and rows; attention never mixes heads or rows, so no
communication is needed and the result is exactly the unsharded one.

Per-head patterns differ from shard to shard (DuoAttention streaming heads, LongGen offsets), and a kernel's block
tables are static. Each distinct set of local patterns gets its own kernel, and each device picks its own with
``lax.switch`` on its position along ``"model"``: shards with the same patterns share one compiled kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qv_jax.attention.patterns import HeadPattern, normalize_patterns
from qv_jax.attention.sparse import sparse_attention

DATA_AXIS = "data"
MODEL_AXIS = "model"

Array = jax.Array


def layout_spec(layout: str | None, mesh, batch: int, *, split_heads: bool = True) -> P:
    """The partition spec of an array described by letters: ``B`` rows (on ``"data"`` when it divides ``batch``),
    ``H`` KV or query heads (on ``"model"`` when ``split_heads``), anything else unsplit; ``None`` is a replicated
    operand."""
    if layout is None:
        return P()
    rows = DATA_AXIS if batch % mesh.shape[DATA_AXIS] == 0 else None
    heads = MODEL_AXIS if split_heads else None
    return P(*(rows if c == "B" else heads if c == "H" else None for c in layout))


def _specs(layouts, mesh, batch: int, split_heads: bool):
    if layouts is None or isinstance(layouts, str):
        return layout_spec(layouts, mesh, batch, split_heads=split_heads)
    return tuple(layout_spec(layout, mesh, batch, split_heads=split_heads) for layout in layouts)


def shard_heads(
    fn: Callable,
    mesh,
    *,
    batch: int,
    in_layouts: Sequence[str | None],
    out_layouts: str | Sequence[str],
    split_heads: bool = True,
) -> Callable:
    """``fn`` run on each device's rows and heads: operands and results described by :func:`layout_spec` letters.

    ``fn`` sees local shapes (``H / model`` heads, ``B / data`` rows) and must not mix heads or rows.
    """
    # Pallas calls carry no varying-axes annotations, so the shard_map type check cannot follow them
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=_specs(tuple(in_layouts), mesh, batch, split_heads),
        out_specs=_specs(out_layouts, mesh, batch, split_heads),
        check_vma=False,
    )


def context_mesh():
    """The qv-jax mesh of the enclosing ``jax.set_mesh`` (as the runtime sets it for a sharded model), or ``None``:
    no mesh, a single device, or already inside a ``shard_map``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or tuple(mesh.axis_names) != (DATA_AXIS, MODEL_AXIS):
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh


def per_shard(
    fn: Callable, *operands: Array, in_layouts: Sequence[str | None], out_layouts: str | Sequence[str]
) -> Array | tuple[Array, ...]:
    """``fn(*operands)``, run per shard when a context mesh is set (see :func:`context_mesh`), else directly.

    For kernels XLA cannot partition (Pallas calls). Layouts as in :func:`layout_spec`, ``B`` taken from the first
    operand's leading dimension. Heads are split when the model axis divides every ``H`` dimension; otherwise each
    device runs all heads of its rows (still correct; the partitioner gathers the heads first).
    """
    mesh = context_mesh()
    if mesh is None:
        return fn(*operands)
    model = mesh.shape[MODEL_AXIS]
    split = all(
        x.shape[i] % model == 0
        for x, layout in zip(operands, in_layouts, strict=True)
        if layout is not None
        for i, c in enumerate(layout)
        if c == "H"
    )
    run = shard_heads(
        fn,
        mesh,
        batch=operands[0].shape[0],
        in_layouts=in_layouts,
        out_layouts=out_layouts,
        split_heads=split,
    )
    return run(*operands)


def sharded_sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    patterns: HeadPattern | Sequence[HeadPattern],
    segment_ids=None,
    causal: bool = True,
    backend: str = "pallas",
    block_q: int | None = None,
    block_kv: int | None = None,
    *,
    mesh,
    kernel: str | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """:func:`~qv_jax.attention.sparse_attention` with each device running its own KV heads and rows.

    Same arguments and results as ``sparse_attention`` (``patterns`` one per KV head of the whole ``k``), plus the
    ``mesh`` (a model axis that does not divide the KV heads leaves every device all heads of its rows). Segment
    ids may be ``None``, key ids ``[B, S]`` or a pair ``(q ids [B, T], kv ids [B, S])``. On CPU,
    ``backend="interpret"`` interprets the GPU kernel unless ``kernel`` says otherwise.
    """
    B, Hkv = k.shape[0], k.shape[1]
    split_heads = Hkv % mesh.shape[MODEL_AXIS] == 0
    local = Hkv // mesh.shape[MODEL_AXIS] if split_heads else Hkv
    patterns = normalize_patterns(patterns, Hkv)
    shard_patterns = [patterns[i * local : (i + 1) * local] for i in range(Hkv // local)]
    variants = list(dict.fromkeys(shard_patterns))
    branch_of_shard = [variants.index(p) for p in shard_patterns]

    segments: tuple[Array, ...] = ()
    seg_layouts: tuple[str, ...] = ()
    if isinstance(segment_ids, tuple | list):
        segments = tuple(jnp.broadcast_to(jnp.asarray(s), (B, s.shape[-1])) for s in segment_ids)
        seg_layouts = ("BT", "BS")
    elif segment_ids is not None:
        segments = (jnp.broadcast_to(jnp.asarray(segment_ids), (B, segment_ids.shape[-1])),)
        seg_layouts = ("BS",)

    if backend == "interpret" and kernel is None:
        # the TPU interpreter simulates every device of a shard_map with barriers between them, which hangs when
        # XLA's CPU client does not run all the shards at once; the GPU kernel interprets shard by shard
        kernel = "gpu"
    run = functools.partial(
        sparse_attention,
        causal=causal,
        backend=backend,
        block_q=block_q,
        block_kv=block_kv,
        kernel=kernel,
        scale=scale,
        return_lse=True,
    )

    def local_attention(q, k, v, *segs):
        local_segments = None if not segs else (segs if len(segs) == 2 else segs[0])
        branches = [functools.partial(run, q, k, v, p, local_segments) for p in variants]
        if len(branches) == 1:
            return branches[0]()
        index = jnp.asarray(branch_of_shard, jnp.int32)[jax.lax.axis_index(MODEL_AXIS)]
        return jax.lax.switch(index, branches)

    fn = shard_heads(
        local_attention,
        mesh,
        batch=B,
        in_layouts=("BHTD", "BHSD", "BHSD", *seg_layouts),
        out_layouts=("BHTD", "BHT"),
        split_heads=split_heads,
    )
    out, lse = fn(q, k, v, *segments)
    return (out, lse) if return_lse else out
