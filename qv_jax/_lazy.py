"""Lazy re-exports for package ``__init__`` files: each public name is imported from its module on first use.

Packages stay cheap to import (``qv_jax.video`` in decoder processes never pulls in JAX, ``qv_jax.attention`` loads
its Pallas kernels only when one is asked for), and importing a submodule never runs its siblings.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names come from ``exports`` (name -> module).

    Use at the end of a package ``__init__``: ``__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)``.
    """

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list:
        return sorted({*exports, *vars(sys.modules[package])})

    return __getattr__, __dir__
