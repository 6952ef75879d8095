"""Device prefetch: move decoded frame groups to the accelerator ahead of use.

The only place in :mod:`qv_jax.video` that imports JAX, and only when called, so decoder workers never do.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace

from qv_jax.errors import InputError
from qv_jax.video.reader import Frames

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(groups: Iterable[Frames], depth: int = 2, *, device=None) -> Iterator[Frames]:
    """Yield ``groups`` with ``frames`` as device arrays, transferring up to ``depth`` groups ahead of the consumer.

    A background thread pulls each group from ``groups`` (e.g. ``reader.stream(...)``) the moment it is decoded
    and starts its host-to-device copy (``jax.device_put`` is asynchronous), while the consumer works on earlier
    groups: with the default ``depth=2`` one group is in flight while one is in use (double buffering).
    ``device`` is a ``jax.Device`` or ``Sharding`` (default: the default device). Closing this generator stops the
    thread and closes ``groups``.
    """
    import jax

    if not isinstance(depth, int) or depth < 1:
        raise InputError(f"prefetch depth must be a positive integer, got {depth!r}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(groups)
        try:
            for group in source:
                if not offer(replace(group, frames=jax.device_put(group.frames, device))):
                    return
            offer(_END)
        except BaseException as e:  # hand every failure, KeyboardInterrupt included, to the consumer
            offer(_Failure(e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="qv-jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
