"""Input batches built and put on the devices ahead of the step that consumes them.

A background thread reads the next per-process batch from the data iterator and assembles the
global arrays (`jax.make_array_from_process_local_data`) while the devices run the current
step, so the training loop only dispatches.  Each batch comes with the iterator state recorded
right after it was read: the state a checkpoint of the step that consumes the batch must hold
(the iterator itself is already further ahead).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetcher:
    """Iterator of (global batch, data iterator state after it); `depth` batches ahead at most."""

    def __init__(self, iterator: Iterator[dict], to_global: Callable[[dict], dict], depth: int = 2):
        self._iterator = iterator
        self._to_global = to_global
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                local = next(self._iterator)
                state = self._iterator.get_state() if hasattr(self._iterator, "get_state") else None
                if not self._put((self._to_global(local), state)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer (StopIteration, data errors)
            self._put(_Failure(e))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, dict | None]:
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._put(item)  # later calls fail the same way
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
