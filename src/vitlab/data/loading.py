"""Small helpers to keep decoding off the model's critical path."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from vitlab.data.images import decode_rgb_array

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` in a background thread, `depth` items ahead. PIL decoding and pyarrow
    reads release the GIL, so the next batch is prepared while the model runs on this one.
    The thread starts now, not at the first `next` (the local engine loads the next shard
    while this one is on the device). An exception in the producer is re-raised in the
    consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                buffer.put(item)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            buffer.put(err)
            return
        buffer.put(_DONE)

    threading.Thread(target=produce, daemon=True, name="vitlab-prefetch").start()
    return Prefetched(buffer, stop)


class Prefetched(Iterator):
    """The consumer's side of `prefetch`. `close()` (also at the end, or on an error in the
    producer) stops the producer and frees what it had buffered, even when nothing was read
    (the local engine closes the shard it loaded ahead when a run stops)."""

    def __init__(self, buffer: queue.Queue, stop: threading.Event) -> None:
        self._buffer, self._stop = buffer, stop

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        item = self._buffer.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while not self._buffer.empty():  # unblock a producer waiting on a full buffer
            self._buffer.get_nowait()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to free
            pass


def ordered_map(
    fn: Callable[[T], object], items: Iterable[T], pool: ThreadPoolExecutor, ahead: int
) -> Iterator:
    """`fn` over `items` on `pool`, at most `ahead` calls in flight, results in order (a
    lazy `pool.map`: a quadrat is decoded only shortly before it is needed)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def decode_uint8_batch(
    blobs: Sequence[bytes], names: Sequence[str], pool: ThreadPoolExecutor | None = None
) -> np.ndarray:
    """Decode same-size encoded images into one (N, H, W, 3) uint8 array."""

    def one(i: int) -> np.ndarray:
        return decode_rgb_array(blobs[i], names[i])

    arrays = list(pool.map(one, range(len(blobs)))) if pool else [one(i) for i in range(len(blobs))]
    return np.stack(arrays)


def chunks(seq: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def map_threads(fn: Callable[[T], object], items: Sequence[T], workers: int) -> list:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(fn, items))
