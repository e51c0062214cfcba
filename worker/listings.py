"""What the batches of one worker share about a month: its file listings (kept a minute), the
Parquet footers and row groups passes over them keep, and the passes computing whole months."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from shared.dayfiles import DayFiles, read_manifest
from shared.errors import PermanentError
from shared.inputs import InputFile, ParquetCache, month_files, with_stored_slices
from shared.layout import RunLayout
from shared.metrics import get_logger
from shared.storage import Storage
from worker.ahead import MonthPasses

_T = TypeVar("_T")

MONTH_LISTING_TTL_S = 60.0


_Month = tuple[str, str]  # (store, month)


class MonthListings:
    """Caches month file listings, so many jobs of one month list its files once, and what
    passes over those files can share: footers and row groups (`ParquetCache`, forgotten
    whenever a listing is renewed) and the passes that compute a whole month (`MonthPasses`)."""

    def __init__(self, ttl_s: float = MONTH_LISTING_TTL_S, passes: MonthPasses | None = None) -> None:
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._files: dict[_Month, tuple[float, list[InputFile]]] = {}
        self._days: dict[_Month, tuple[float, DayFiles | None]] = {}
        self._slices: dict[_Month, tuple[float, bytes | None]] = {}
        self.parquet = ParquetCache()
        # Whole-month passes that store jobs ahead of their messages; only worth it for a
        # process that serves many batches (a worker), not for one job on its own.
        self.passes = passes

    def files(self, storage: Storage, month: str) -> list[InputFile]:
        """The month's input files (from cache when fresh)."""

        def listed() -> list[InputFile]:
            files = month_files(storage, month)
            self.parquet.clear()
            return files

        return self._fresh(self._files, (storage.uri, month), listed)

    def day_files(self, storage: Storage, month: str) -> DayFiles | None:
        """The month's day files (`shared.dayfiles`), None when it has none; from cache when fresh."""
        return self._fresh(self._days, (storage.uri, month), lambda: read_manifest(storage, month))

    def with_slices(self, output: Storage, layout: RunLayout, month: str, files: list[InputFile]) -> list[InputFile]:
        """`files` with the slices the run's discovery recorded of those that are not Parquet,
        where it did (`shared.inputs.FileSlice`; the stored record from cache when fresh)."""

        def load() -> bytes | None:
            key = layout.month_slices(month)
            return output.read_bytes(key) if output.exists(key) else None

        stored = self._fresh(self._slices, (output.describe(layout.root), month), load)
        if stored is None:
            return files
        try:
            return with_stored_slices(files, stored)
        except PermanentError as exc:  # only the shortcut is lost: the files are read whole
            get_logger().warning("worker.slices_unreadable", month=month, error=str(exc))
            return files

    def _fresh(self, cache: dict[_Month, tuple[float, _T]], key: _Month, load: Callable[[], _T]) -> _T:
        now = time.monotonic()
        with self._lock:
            hit = cache.get(key)
            if hit and now - hit[0] < self._ttl:
                return hit[1]
        value = load()
        with self._lock:
            cache[key] = (now, value)
        return value
