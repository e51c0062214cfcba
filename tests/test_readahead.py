"""A stream read ahead on its own thread gives the same items, in order, raises what its source
raised, and stops its thread and closes its source when the consumer stops early."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from shared.readahead import read_ahead


def _threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "tickq-read-ahead")


def test_items_come_in_order_and_the_thread_ends() -> None:
    assert list(read_ahead(iter(range(1000)), depth=3)) == list(range(1000))
    assert _threads() == 0


def test_a_failure_of_the_source_reaches_the_consumer_after_the_items_before_it() -> None:
    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("row group 3 is unreadable")

    seen: list[int] = []
    with pytest.raises(ValueError, match="row group 3 is unreadable"):
        for item in read_ahead(failing()):
            seen.append(item)
    assert seen == [1, 2]
    assert _threads() == 0


def test_a_consumer_that_stops_early_stops_the_thread_and_closes_the_source() -> None:
    closed = threading.Event()
    produced: list[int] = []

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                produced.append(n)
                yield n
                n += 1
        finally:
            closed.set()

    stream = read_ahead(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert closed.is_set()
    assert _threads() == 0
    assert len(produced) <= 5 + 2 + 1  # never more than `depth` (and the one being offered) ahead


def test_nested_stages_each_run_on_their_own_thread() -> None:
    names: list[str] = []

    def source() -> Iterator[int]:
        for n in range(10):
            names.append(threading.current_thread().name)
            yield n

    def doubled(items: Iterator[int]) -> Iterator[int]:
        for n in items:
            yield 2 * n

    assert list(read_ahead(doubled(read_ahead(source())))) == [2 * n for n in range(10)]
    assert set(names) == {"tickq-read-ahead"}
    assert _threads() == 0
