"""Discovering a month's jobs from the data itself, reading only the key columns."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from shared.inputs import KEY_COLUMNS, month_files, read_batches, trade_dates
from shared.messages import is_valid_security
from shared.storage import Storage


@dataclass
class MonthDiscovery:
    """The (security, trade_date) pairs of one month and their row counts."""

    month: str
    rows: Counter[tuple[str, str]] = field(default_factory=Counter)
    files: int = 0
    rows_scanned: int = 0
    # Rows no job can own: no security, an unusable security code, or no trade date.
    rows_unassigned: int = 0
    invalid_securities: set[str] = field(default_factory=set)


def discover_month(
    storage: Storage,
    month: str,
    market_tz: str,
    securities: set[str] | None = None,
    dates: set[dt.date] | None = None,
) -> MonthDiscovery:
    """Every (security, trade_date) of `month`'s input, after the run's key filters.

    Raises `PermanentError` when the month has no input or a file is unreadable.
    """
    found = MonthDiscovery(month)
    for file in month_files(storage, month):
        found.files += 1
        for batch in read_batches(storage, file, KEY_COLUMNS):
            found.rows_scanned += batch.num_rows
            security = batch.column("security")
            if pa.types.is_dictionary(security.type):
                security = security.dictionary_decode()
            security = security.cast(pa.string())
            table = pa.table({"security": security, "trade_date": trade_dates(batch, market_tz)})
            counts = table.group_by(["security", "trade_date"], use_threads=False).aggregate(
                [([], "count_all")]
            )
            for sec, day, n in zip(
                counts.column("security").to_pylist(),
                counts.column("trade_date").to_pylist(),
                counts.column("count_all").to_pylist(),
                strict=True,
            ):
                if sec is None or day is None or not is_valid_security(sec):
                    found.rows_unassigned += n
                    if sec:
                        found.invalid_securities.add(sec[:40])
                    continue
                if securities is not None and sec not in securities:
                    continue
                if dates is not None and day not in dates:
                    continue
                found.rows[(sec, day.isoformat())] += n
    return found
