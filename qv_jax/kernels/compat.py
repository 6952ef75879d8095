"""The Pallas names our kernels use, resolved once for every jax version we support (0.10.x and 0.11.x).

Kernels import Pallas through this module only, so a rename between jax releases is fixed in one place. Names that
are stable in both releases (``pl.BlockSpec(block_shape, index_map)``, ``pl.pallas_call``, ``pl.program_id``,
``pl.when``, ``pl.ds``) are re-exported as they are; the ones that moved or were renamed across releases
(``pltpu.CompilerParams`` was ``TPUCompilerParams``, ``pl.triton.CompilerParams`` was ``TritonCompilerParams``,
``pl.dot`` left the top-level namespace) get a small constructor here.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

try:  # the Triton backend ships with jaxlib's GPU plugin but its Python side imports on every platform
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - only on installations without the Pallas Triton module
    pltriton = None

__all__ = [
    "pl",
    "pltpu",
    "prefetch_scalar_grid_spec",
    "tpu_compiler_params",
    "tpu_interpret_params",
    "tpu_vmem",
    "triton_compiler_params",
]


def tpu_compiler_params(dimension_semantics: Sequence[str]):
    """Mosaic compiler parameters; ``dimension_semantics`` per grid axis: ``"parallel"`` or ``"arbitrary"``."""
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=tuple(dimension_semantics))


def triton_compiler_params(num_warps: int, num_stages: int):
    """Compiler parameters for the Triton backend of Pallas GPU (selected by passing them to ``pallas_call``)."""
    if pltriton is not None and hasattr(pltriton, "CompilerParams"):
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)  # pragma: no cover - older jax


def prefetch_scalar_grid_spec(*, num_scalar_prefetch: int, grid, in_specs, out_specs, scratch_shapes=()):
    """A grid spec whose first ``num_scalar_prefetch`` operands live in SMEM and feed the index maps."""
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_scalar_prefetch,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch_shapes,
    )


def tpu_vmem(shape: tuple[int, ...], dtype):
    """A VMEM scratch buffer of ``shape`` and ``dtype`` for ``scratch_shapes``."""
    return pltpu.VMEM(shape, dtype)


def tpu_interpret_params():
    """What ``pallas_call(interpret=...)`` takes to run a Mosaic TPU kernel in the CPU interpreter."""
    return pltpu.InterpretParams()
