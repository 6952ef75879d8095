"""Integer helpers shared by the cache-size and padding arithmetic."""

from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-n // multiple) * multiple
