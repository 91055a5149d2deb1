"""Batches loaded ahead of the training step, so the device never waits for the next one.

:class:`Prefetcher` runs a ``load`` function (index the stored images, pin, copy to the device) for
the items after the current one in one background thread, while the caller trains on the current
one. ``load`` must draw nothing from torch's generator: it is shared with the caller's thread,
and draws from two threads would interleave differently from run to run (the training feed's
augmentation draws from a NumPy generator of each batch's own instead, :mod:`raytl.train_feed`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import torch

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")
# what a queue entry holds: a loaded item; the end (every item loaded); the error load raised
_LOADED, _DONE, _FAILED = object(), object(), object()


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value``: itself, or inside (nested) tuples and lists."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for part in value:
            yield from tensors_in(part)


class Prefetcher(Generic[Item, Loaded]):
    """Yields ``load(item)`` for every item, in order, loaded up to ``depth`` items ahead.

    Use it as a context manager: leaving the block (at the end, on ``break`` or on an exception)
    stops the thread and drops what it loaded ahead. An exception raised by ``load`` is raised by
    the iteration, at the item that caused it. ``depth=0`` loads each item when it is asked for,
    in the caller's thread (no thread at all).

    On a GPU the thread's copies run on a side stream: before an item is yielded the caller's
    stream waits for its copies (an event), and its tensors are marked as used by the caller's
    stream (``record_stream``), so the caching allocator does not reuse their memory too early.
    """

    def __init__(
        self,
        items: Iterable[Item],
        load: Callable[[Item], Loaded],
        device: torch.device,
        depth: int = 2,
    ) -> None:
        self.items, self.load, self.depth = items, load, depth
        self.queue: queue.Queue[tuple[object, Any, torch.cuda.Event | None]] = queue.Queue(
            maxsize=max(1, depth)
        )
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        cuda = device.type == "cuda" and depth > 0
        # a stream of the caller's device (its current one for a bare "cuda"); the thread's own
        # current device would be cuda:0
        self.stream = torch.cuda.Stream(device) if cuda else None

    def __enter__(self) -> Prefetcher[Item, Loaded]:
        if self.depth > 0:
            self.thread = threading.Thread(target=self._produce, name="raytl-prefetch", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread (it may be waiting for room on the queue) and drop what it loaded."""
        self.stop.set()
        while self.thread is not None and self.thread.is_alive():
            self._drain()
            self.thread.join(timeout=0.05)
        self.thread = None
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def _put(self, entry: tuple[object, Any, torch.cuda.Event | None]) -> bool:
        """Put ``entry`` once there is room; False if the prefetcher was closed meanwhile."""
        while not self.stop.is_set():
            try:
                self.queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            with torch.cuda.stream(self.stream):  # a no-op for None (the CPU)
                for item in self.items:
                    if self.stop.is_set():
                        return
                    loaded = self.load(item)
                    event = None
                    if self.stream is not None:
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    if not self._put((_LOADED, loaded, event)):
                        return
            self._put((_DONE, None, None))
        except BaseException as error:  # handed to the caller, raised there
            self._put((_FAILED, error, None))

    def __iter__(self) -> Iterator[Loaded]:
        if self.depth == 0:
            yield from (self.load(item) for item in self.items)
            return
        if self.thread is None:
            raise RuntimeError("iterate a Prefetcher inside its `with` block")
        while True:
            kind, value, event = self.queue.get()
            if kind is _DONE:
                return
            if kind is _FAILED:
                raise value
            if event is not None and self.stream is not None:  # wait for the side stream's copies
                stream = torch.cuda.current_stream(self.stream.device)
                stream.wait_event(event)
                for tensor in tensors_in(value):
                    tensor.record_stream(stream)
            yield value
