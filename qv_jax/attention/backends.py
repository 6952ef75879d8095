"""Which code runs an attention call: the jnp reference or a Pallas kernel, compiled or interpreted.

A :class:`Backend` says how (``xla``: the jnp reference; ``interpret``: the Pallas kernels in the CPU interpreter;
``pallas``: the kernels compiled for the device), a :class:`Kernel` which family (Mosaic ``tpu`` or Triton
``gpu``). An explicit kernel lets ``pallas`` be traced and lowered for another platform from a CPU.
"""

from __future__ import annotations

import enum

import jax

from qv_jax.errors import InputError


class Backend(enum.StrEnum):
    XLA = "xla"
    INTERPRET = "interpret"
    PALLAS = "pallas"


class Kernel(enum.StrEnum):
    TPU = "tpu"
    GPU = "gpu"


# production tile sizes: TPU tiles fill the 128-lane vregs and the MXU; Triton tiles keep two [64, H] float32
# accumulators of the backward in registers
DEFAULT_BLOCKS = {Kernel.TPU: (128, 128), Kernel.GPU: (64, 64)}

REFERENCE = "reference"  # the kernel entry points' name for their jnp implementation


def parse(enum_type: type[enum.StrEnum], value, what: str) -> enum.StrEnum:
    """``value`` as a member of ``enum_type``; :class:`InputError` naming the choices otherwise."""
    try:
        return enum_type(value)
    except ValueError:
        raise InputError(f"{what}={value!r}: expected one of {', '.join(enum_type)}") from None


def default_kernel() -> Kernel:
    """The Pallas kernel family of ``jax.default_backend()``; raises on a platform that has none."""
    platform = jax.default_backend()
    if platform == "tpu":
        return Kernel.TPU
    if platform in ("gpu", "cuda", "rocm"):
        return Kernel.GPU
    raise InputError(f"backend='pallas' needs a TPU or GPU, but jax runs on {platform!r}; use 'xla' or 'interpret'")


def kernel_impl(backend: str, kernel: str | None) -> tuple[str, bool]:
    """``(impl, interpret)`` for the kernel entry points of ``qv_jax.kernels``.

    ``"reference"`` for ``xla``; else the kernel family, by default the device's (``pallas``) or ``tpu``
    (``interpret``).
    """
    backend = parse(Backend, backend, "backend")
    if backend is Backend.XLA:
        return REFERENCE, False
    kernel = (default_kernel() if backend is Backend.PALLAS else Kernel.TPU) if kernel is None else kernel
    return str(parse(Kernel, kernel, "kernel")), backend is Backend.INTERPRET
