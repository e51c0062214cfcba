"""A third-party processor, as a user would write one (see docs/processors.md): the highest
price and the number of Centre Point orders per security-day."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shared.messages import JobParams
from shared.processors import JobContext, StoredResult
from shared.tables import TableSink

SCHEMA = pa.schema([("security", pa.string()), ("trade_date", pa.date32()),
                    ("max_price", pa.float64()), ("cp_orders", pa.int64())])


class PeakJob:
    def __init__(self) -> None:
        self.max_price: float | None = None
        self.cp_orders = 0

    def add(self, rows: pa.Table) -> None:
        peak = pc.max(rows.column("price")).as_py()
        self.max_price = peak if self.max_price is None else max(self.max_price, peak)
        self.cp_orders += int(pc.sum(pc.equal(rows.column("venue"), "CP")).as_py() or 0)

    def finish(self) -> dict[str, Any]:
        return {"max_price": self.max_price, "cp_orders": self.cp_orders}


class PeakProcessor:
    name = "peak"

    def start_job(self, context: JobContext) -> PeakJob:
        return PeakJob()

    def aggregate(self, results: Iterable[StoredResult], params: JobParams, sink: TableSink) -> dict[str, Any]:
        rows = [r for r in results if r.data["max_price"] is not None]
        sink.write("peak", pa.table({
            "security": [r.security for r in rows],
            "trade_date": [dt.date.fromisoformat(r.date) for r in rows],
            "max_price": [r.data["max_price"] for r in rows],
            "cp_orders": [r.data["cp_orders"] for r in rows],
        }, schema=SCHEMA))
        return {"records": sum(r.data["cp_orders"] for r in rows)}
