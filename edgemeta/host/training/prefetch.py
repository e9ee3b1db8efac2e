"""The episodes of the coming training steps, drawn on a background thread."""

from __future__ import annotations

import queue
import threading


class EpisodePrefetcher:
    """Draws the episodes of the coming steps on a background thread, `depth` steps ahead, so that the
    sampling and stacking of images (numpy, on the host) overlaps the training step on the device.

    ``next()`` returns ``(first, arrays)`` in order: the step's first episode index and what
    `EpisodicTrainer.prepare` made for it."""

    def __init__(self, prepare, first: int, per_step: int, depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(prepare, first, per_step), daemon=True,
                                        name="edgemeta-episodes")
        self._thread.start()

    def _run(self, prepare, first: int, per_step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (first, prepare(first))
            except BaseException as e:  # handed to the training loop, which raises it
                item = (first, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            first += per_step

    def next(self):
        first, arrays = self._queue.get()
        if isinstance(arrays, BaseException):
            raise arrays
        return first, arrays

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
