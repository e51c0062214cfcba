"""Producing a stream's items on a thread of their own, a few ahead of their consumer.

Decoding Parquet and most Arrow compute kernels release the interpreter lock, so a stage of a
pipeline run this way uses a core the consuming stage would leave idle.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")


def read_ahead(items: Iterator[_T], depth: int = 2) -> Generator[_T, None, None]:
    """`items`, produced on a thread of their own up to `depth` ahead of the consumer.

    What the producing raises is raised to the consumer in its place; a consumer that stops
    early (closes the generator) stops the thread and closes `items`.
    """
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def offer(item: tuple[str, Any]) -> bool:
        while not stopped.is_set():
            with contextlib.suppress(queue.Full):
                handoff.put(item, timeout=0.1)
                return True
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(("item", item)):
                    return
                del item  # the consumer's now: not kept while the next one is made
            offer(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            offer(("error", exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="tickq-read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
            del value  # nor kept here while the next one is awaited
    finally:
        stopped.set()
        producer.join()
