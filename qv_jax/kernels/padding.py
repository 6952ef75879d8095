"""Padding operands to the shapes the kernels compute with, shared by the kernel entry points."""

from __future__ import annotations

import jax.numpy as jnp


def pad_axis(x, axis: int, size: int, *, value=0, mode: str = "constant"):
    """``x`` padded at the end of ``axis`` to ``size`` with ``value`` (``mode="edge"``: repeating the last entry)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, n - 1).bit_length()


def triton_dot_size(n: int) -> int:
    """A tile dimension of ``n`` rounded up to what Triton's ``tl.dot`` takes: a power of two, at least 16."""
    return max(16, next_pow2(n))
