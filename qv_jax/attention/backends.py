"""Which code runs an attention call: the jnp reference, the kernels' tiles in jnp, a Pallas kernel, or cuDNN.

A :class:`Backend` says how, a :class:`Kernel` which Pallas family (Mosaic ``tpu`` or Triton ``gpu``; an explicit
one lets a CPU trace and lower for another platform), and an :class:`AttentionConfig` — one per model — what each
kind of call runs, ``auto`` choosing by platform (:data:`AUTO`). See docs/attention.md, "Backends".
"""

from __future__ import annotations

import dataclasses
import enum

from qv_jax.errors import InputError


class Backend(enum.StrEnum):
    REFERENCE = "reference"  # the jnp oracle: materialises [T, S]; tests ("xla", its former name, still parses)
    CHUNKED = "chunked"  # the kernels' tiles in jnp: online softmax, memory O(T x block); the CPU default
    PALLAS = "pallas"  # our Pallas kernels compiled for the device
    INTERPRET = "interpret"  # the same kernels in the CPU interpreter (tests)
    CUDNN = "cudnn"  # jax.nn.dot_product_attention(implementation="cudnn") for dense calls; Pallas for the rest
    JAX = "jax"  # jax's shipped Pallas kernel for a call where one serves (qv_jax/kernels/jax_*.py), ours otherwise
    JAX_INTERPRET = "jax-interpret"  # the same in the CPU interpreter (tests)
    AUTO = "auto"


class Kernel(enum.StrEnum):
    TPU = "tpu"
    GPU = "gpu"


class CallKind(enum.StrEnum):
    """The attention calls a model makes (``qv_jax.attention.calls``)."""

    SELF = "self"  # a chunk over itself, no segment ids: vision full-attention blocks, unpadded prompts
    SELF_SEGMENTS = "self_segments"  # the same with segment ids: vision windows, padded or packed prompts
    MEMORY = "memory"  # a chunk over earlier keys masked by segment ids: a cache, QuickPrefill's memory
    DECODE = "decode"  # one token per row over a cache


_ALIASES = {"xla": Backend.REFERENCE}

# tile sizes: TPU tiles fill the 128-lane vregs and the MXU; Triton tiles keep two [64, H] float32 accumulators of
# the backward in registers; the jnp tiles are large enough that XLA's CPU loop overhead stays small
DEFAULT_BLOCKS = {Kernel.TPU: (128, 128), Kernel.GPU: (64, 64), Backend.CHUNKED: (256, 256)}

REFERENCE = "reference"  # the kernel entry points' name for their dense jnp implementation
CHUNKED = "chunked"  # ... and for the tiles in jnp

# What "auto" runs, per platform and call kind. Not yet measured on TPU / GPU hardware: TPU and GPU use our Pallas
# kernels (block tables, segment ids, GQA and T < S in one kernel), GPU hands dense unsegmented calls to cuDNN.
# benchmarks/attention.py on an accelerator times ours, jax's kernels (Backend.JAX) and cuDNN per call kind and
# writes the fastest of each ("fastest_per_call"): set this table from that record.
AUTO = {
    "cpu": dict.fromkeys(CallKind, Backend.CHUNKED),
    "tpu": dict.fromkeys(CallKind, Backend.PALLAS),
    "gpu": {**dict.fromkeys(CallKind, Backend.PALLAS), CallKind.SELF: Backend.CUDNN},
}


INTERPRETED = (Backend.INTERPRET, Backend.JAX_INTERPRET)
SHIPPED = (Backend.JAX, Backend.JAX_INTERPRET)  # jax's kernels where they serve a call, ours for the rest


def parse(enum_type: type[enum.StrEnum], value, what: str) -> enum.StrEnum:
    """``value`` as a member of ``enum_type`` (``"xla"`` is the reference backend); :class:`InputError` naming the
    choices otherwise."""
    if enum_type is Backend and value in _ALIASES:
        return _ALIASES[value]
    try:
        return enum_type(value)
    except ValueError:
        raise InputError(f"{what}={value!r}: expected one of {', '.join(enum_type)}") from None


def platform() -> str:
    """``"cpu"``, ``"tpu"`` or ``"gpu"`` for ``jax.default_backend()``."""
    import jax  # here, not at the top: the command line reads the enums above without starting jax

    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def default_kernel() -> Kernel:
    """The Pallas kernel family of ``jax.default_backend()``; raises on a platform that has none."""
    name = platform()
    if name in ("tpu", "gpu"):
        return Kernel(name)
    raise InputError(
        f"the Pallas kernels ('pallas', 'jax') need a TPU or GPU, but jax runs on {name!r}; use 'chunked', "
        "'interpret' or 'jax-interpret', or name a kernel family to lower for"
    )


def kernel_impl(backend: str, kernel: str | None) -> tuple[str, bool]:
    """``(impl, interpret)`` for the kernel entry points of ``qv_jax.kernels``.

    ``"reference"`` or ``"chunked"`` for the jnp backends; else the kernel family, by default the device's
    (``pallas``, ``cudnn``) or ``tpu`` (``interpret``).
    """
    backend = parse(Backend, backend, "backend")
    if backend == Backend.AUTO:
        raise InputError("backend='auto' is resolved by an AttentionConfig; give a concrete backend here")
    if backend in (Backend.REFERENCE, Backend.CHUNKED):
        return str(backend), False
    interpret = backend in INTERPRETED
    if kernel is None:
        kernel = Kernel.TPU if interpret else default_kernel()
    return str(parse(Kernel, kernel, "kernel")), interpret


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """What runs a model's attention: one ``backend`` for every call (``auto``: :data:`AUTO` by platform), the
    Pallas ``kernel`` family (default: the device's; ``tpu`` when interpreting) and optional tile sizes.

    Frozen and hashable: the model carries it in its graph definition, so each choice compiles its own steps.
    """

    backend: str = Backend.AUTO
    kernel: str | None = None
    block_q: int | None = None
    block_kv: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "backend", parse(Backend, self.backend, "attention"))
        if self.kernel is not None:
            object.__setattr__(self, "kernel", parse(Kernel, self.kernel, "attention_kernel"))
        if self.backend in (Backend.PALLAS, Backend.JAX) and self.kernel is None:
            default_kernel()  # fails now, on a machine with no kernel family, rather than at the first call
        if self.backend == Backend.CUDNN and platform() != "gpu":
            raise InputError(f"attention='cudnn' needs a GPU, but jax runs on {platform()!r}")
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")

    def for_call(self, kind: CallKind) -> tuple[Backend, Kernel | None]:
        """``(backend, kernel)`` that runs a call of ``kind`` on this platform."""
        backend = AUTO.get(platform(), AUTO["cpu"])[kind] if self.backend == Backend.AUTO else self.backend
        return backend, self.kernel

    def blocks(self) -> tuple[int | None, int | None]:
        """``(block_q, block_kv)``; ``None`` takes the backend's default tiles."""
        return self.block_q, self.block_kv
