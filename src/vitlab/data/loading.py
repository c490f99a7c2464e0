"""Small helpers to keep decoding off the model's critical path."""

from __future__ import annotations

import queue
import threading
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
    An exception in the producer is re-raised in the consumer."""
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

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


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
