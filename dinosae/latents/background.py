"""Iterating in a background thread: what lets reading, encoding and writing overlap."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any


def background(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate `items` in a thread, `depth` ahead; exceptions are re-raised here; stopping early
    (break, close) stops the thread."""
    q: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer
            put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
