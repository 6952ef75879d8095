"""Array layouts written in the shape alphabet, and the one parser that turns them into partition specs.

A layout has one letter per dimension (docs/architecture.md): ``B`` rows go on ``"data"`` and ``N`` / ``K`` heads on
``"model"``, each only where the axis divides the dimension; any other letter (or ``.``) stays whole. Caches
declare their fields' layouts with :func:`layout_field`; :func:`per_shard` runs a kernel XLA cannot partition (a
Pallas call) on each device's rows and heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qv_jax.errors import ShardingError
from qv_jax.sharding.mesh import DATA_AXIS, MODEL_AXIS, context_mesh

ROW_LETTER = "B"
HEAD_LETTERS = "NK"


def layout_spec(layout: str, shape: Sequence[int], mesh, *, split_heads: bool | None = None) -> P:
    """The partition spec of an array of ``shape`` laid out as ``layout`` on ``mesh``.

    Heads are split where the model axis divides them, or as ``split_heads`` says for all of them (``shard_map``
    operands must agree on one choice).
    """
    if len(layout) != len(shape):
        raise ShardingError(f"layout {layout!r} names {len(layout)} dimensions, the array has shape {tuple(shape)}")
    entries = []
    for letter, dim in zip(layout, shape, strict=True):
        if letter == ROW_LETTER:
            entries.append(DATA_AXIS if dim % mesh.shape[DATA_AXIS] == 0 else None)
        elif letter in HEAD_LETTERS:
            split = dim % mesh.shape[MODEL_AXIS] == 0 if split_heads is None else split_heads
            entries.append(MODEL_AXIS if split else None)
        else:
            entries.append(None)
    return P(*entries)


def layout_field(layout: str) -> dataclasses.Field:
    """A dataclass field holding an array (or a tuple of per-layer arrays) laid out as ``layout`` on a mesh."""
    return dataclasses.field(metadata={"layout": layout})


def tree_shardings(tree, mesh: Mesh):
    """``tree`` (a cache dataclass, or its ``jax.eval_shape``) with every array replaced by its ``NamedSharding``,
    from the layouts its fields declare (:func:`layout_field`); static fields stay as they are."""
    changes = {}
    for field in dataclasses.fields(tree):
        if field.metadata.get("static"):
            continue
        layout = field.metadata.get("layout")
        if layout is None:
            raise ShardingError(f"{type(tree).__name__}.{field.name} declares no layout (use layout_field)")
        value = getattr(tree, field.name)
        place = lambda x, layout=layout: NamedSharding(mesh, layout_spec(layout, x.shape, mesh))  # noqa: E731
        changes[field.name] = tuple(map(place, value)) if isinstance(value, tuple) else place(value)
    return dataclasses.replace(tree, **changes)


def shard_by_layouts(
    fn: Callable,
    mesh: Mesh,
    *,
    in_layouts: Sequence[str | None],
    out_layouts: str | Sequence[str],
    shapes: Sequence[Sequence[int] | None],
    split_heads: bool,
) -> Callable:
    """``fn`` under ``shard_map``: operands (of ``shapes``) and results laid out as their layouts say, heads split
    or not as ``split_heads`` says; ``None`` is a replicated operand. ``fn`` sees local shapes and must not mix
    rows or heads."""
    rows = next(shape[0] for shape in shapes if shape is not None)

    def spec(layout: str | None, shape=None) -> P:
        if layout is None:
            return P()
        # results take the row and head decisions of the operands
        return layout_spec(layout, shape or _like(layout, rows), mesh, split_heads=split_heads)

    in_specs = tuple(spec(layout, shape) for layout, shape in zip(in_layouts, shapes, strict=True))
    outs = spec(out_layouts) if isinstance(out_layouts, str) else tuple(spec(layout) for layout in out_layouts)
    # Pallas calls carry no varying-axes annotations, so the shard_map type check cannot follow them
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=outs, check_vma=False)


def _like(layout: str, rows: int) -> tuple[int, ...]:
    """A stand-in shape for a result layout: its rows those of the operands, every other dimension unsplit."""
    return tuple(rows if letter == ROW_LETTER else 1 for letter in layout)


def per_shard(
    fn: Callable, *operands: jax.Array, in_layouts: Sequence[str | None], out_layouts: str | Sequence[str]
) -> jax.Array | tuple[jax.Array, ...]:
    """``fn(*operands)``, run on each device's rows and heads when a context mesh is set
    (:func:`~qv_jax.sharding.mesh.context_mesh`), else directly.

    Heads are split when the model axis divides every head dimension of the operands; otherwise each device runs
    all heads of its rows (still exact; the partitioner gathers the heads first).
    """
    mesh = context_mesh()
    if mesh is None:
        return fn(*operands)
    model = mesh.shape[MODEL_AXIS]
    split = all(
        x.shape[i] % model == 0
        for x, layout in zip(operands, in_layouts, strict=True)
        if layout is not None
        for i, letter in enumerate(layout)
        if letter in HEAD_LETTERS
    )
    shapes = [None if layout is None else x.shape for x, layout in zip(operands, in_layouts, strict=True)]
    run = shard_by_layouts(fn, mesh, in_layouts=in_layouts, out_layouts=out_layouts, shapes=shapes, split_heads=split)
    return run(*operands)
