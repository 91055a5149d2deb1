"""A bound on the pixels being decoded at once, shared by every decoding thread.

The decompression-bomb limit bounds one image; the decoding pool runs many at once. A
:class:`PixelBudget` makes a thread wait until its image fits beside those already in
flight, so the memory of a decoding pass is bounded by the budget, not by the thread count.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class PixelBudget:
    """At most ``capacity`` pixels in flight; an image larger than that decodes alone.

    Requests are served first come, first served, so a large image is never starved by a
    stream of small ones (it waits for those ahead of it to finish, then runs).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a pixel budget must be positive, got {capacity}")
        self.capacity = capacity
        self._in_use = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        """Pixels reserved right now."""
        with self._changed:
            return self._in_use

    def _fits(self, pixels: int) -> bool:
        return self._in_use == 0 or self._in_use + pixels <= self.capacity

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block, waiting until they fit."""
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or not self._fits(pixels):
                    self._changed.wait()
            except BaseException:
                self._queue.remove(ticket)
                self._changed.notify_all()
                raise
            self._queue.popleft()
            self._in_use += pixels
            self._changed.notify_all()  # the next in line may fit beside this one
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= pixels
                self._changed.notify_all()
