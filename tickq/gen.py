"""Synthetic monthly order data in tickq's input layout (`tickq gen`).

Output layout under `out` (a local path or ``s3://bucket/prefix``), one slot per month M:

- ``parquet``: ``<out>/M/part-0000.parquet`` … (``files_per_month`` parts);
- ``csv``: ``<out>/M.csv`` (or ``<out>/M/part-0000.csv`` … when ``files_per_month > 1``);
- ``csv.gz``: ``<out>/M.csv.gz`` (or ``<out>/M/part-0000.csv.gz`` …);
- ``dbn``: ``<out>/M.dbn`` (or ``<out>/M/part-0000.dbn`` …), Databento DBN, trades schema;
- ``dbn.zst``: ``<out>/M.dbn.zst`` (or ``<out>/M/part-0000.dbn.zst`` …), zstd-compressed DBN.

Files that an earlier `gen` run left in a month's slot (the names above, in any format) are
removed, so a month's input is exactly what this call wrote.

Columns: ``ts`` (Parquet ``timestamp[ns, tz=UTC]``; CSV ISO-8601 text with ``Z`` and
nanoseconds), ``security`` (plain string), ``price`` (float64), ``size`` (int64 >= 1),
``side`` (``B``/``S``), ``participant`` (``P01``…``P15``, Zipf-like, ~2% null) and ``venue``
(``CP`` ~12%, ``TM`` otherwise, ~0.5% null). Trading days are the weekdays of the month; events
fall in a 10:00-16:00 session in the market time zone with a U-shaped intraday profile; sizes are
heavy-tailed; each security follows its own random walk; a few securities take most of the rows.
Rows are sorted by ``ts`` within a file; the parts of a month cover consecutive time ranges.

DBN output holds the same rows (same seed, same orders) but carries ``ts``, ``security``,
``price``, ``size`` and ``side`` only: DBN has no participant field, so the reader
(`shared.dbn`) gives a null ``participant``, and every record has publisher id 2
(``XNAS.ITCH.XNAS``), which the reader maps to venue ``XNAS`` (not ``CP``/``TM``). Securities
are instrument ids ``1..n`` that the metadata's symbol mappings name over the month's UTC
dates; prices are DBN fixed-point (int64, 1e-9 units), so they read back exactly to 1e-9.

Generation is vectorised in chunks of at most ``CHUNK_ROWS`` rows, so memory stays bounded
whatever ``rows`` is, and the output depends only on the arguments (``seed`` included).
"""

from __future__ import annotations

import calendar
import gzip
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from shared.dbn import DbnWriter
from shared.inputs.files import ORDERS_SCHEMA
from shared.storage import Storage, open_storage

__all__ = ["CHUNK_ROWS", "FORMATS", "generate", "security_codes"]

FORMATS = ("parquet", "csv", "csv.gz", "dbn", "dbn.zst")
CHUNK_ROWS = 1_000_000
ROW_GROUP_ROWS = 256 * 1024
SESSION_OPEN = time(10, 0)
SESSION_MINUTES = 6 * 60  # 10:00-16:00
N_PARTICIPANTS = 15
PARTICIPANT_NULL_P = 0.02
VENUE_NULL_P = 0.005
_NS_PER_MIN = 60_000_000_000
_MAX_PATH_POINTS = 4_000_000  # bound on the (security x time) price-path matrix
_MONTH_RE = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
_CONTENT_TYPES = {
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv",
    "csv.gz": "application/gzip",
    "dbn": "application/octet-stream",
    "dbn.zst": "application/zstd",
}
# Slot names gen may have written for a month, in any format (removed when stale).
_OWN_PART_RE = re.compile(r"^part-\d{4}\.(parquet|csv|csv\.gz|dbn|dbn\.zst)$")

_CURATED = (
    "BHP", "CBA", "CSL", "NAB", "WBC", "ANZ", "WES", "MQG", "FMG", "BRK.B",
    "RIO", "WOW", "TLS", "GMG", "TCL", "WDS", "STO", "QBE", "ALL", "REA",
    "COL", "XRO", "SUN", "ORG", "AMC", "JHX", "IAG", "NST", "MIN", "CPU",
    "SHL", "RMD", "ASX", "APA", "AGL", "QAN", "TWE", "EVN", "NXT", "SEK",
    "CAR", "PME", "LYC", "PLS", "IGO", "AZJ", "MPL", "BXB", "SCG", "DXS",
)  # fmt: skip

SCHEMA = ORDERS_SCHEMA.remove(ORDERS_SCHEMA.get_field_index("trade_date"))
CSV_SCHEMA = SCHEMA.set(0, pa.field("ts", pa.string()))


def security_codes(n: int) -> list[str]:
    """The first `n` codes of a deterministic ticker list.

    Real-looking 3-letter codes first (the 10th is ``BRK.B``, so any universe of 10 or more has
    a code with a dot), then ``AAA``, ``AAB``, … and 4-letter codes beyond those.
    """
    if n < 1:
        raise ValueError("securities must be at least 1")
    codes = list(_CURATED[:n])
    seen = set(codes)
    width = 3
    while len(codes) < n:
        for i in range(26**width):
            code = ""
            for _ in range(width):
                i, r = divmod(i, 26)
                code = chr(ord("A") + r) + code
            if code not in seen:
                codes.append(code)
                seen.add(code)
                if len(codes) == n:
                    break
        width += 1
    return codes


@dataclass(frozen=True)
class _Universe:
    """Per-security properties that do not change from month to month."""

    codes: list[str]
    weights: np.ndarray  # row share per security (sums to 1)
    log_base: np.ndarray  # log of the price level
    daily_vol: np.ndarray  # daily log-return volatility
    cp_share: np.ndarray  # share of rows at Centre Point
    buy_p: np.ndarray  # probability that a row is a buy


def _universe(n: int, seed: int) -> _Universe:
    rng = np.random.default_rng([seed, 0])
    ranks = rng.permutation(n) + 1
    weights = 1.0 / ranks.astype(np.float64) ** 1.1
    return _Universe(
        codes=security_codes(n),
        weights=weights / weights.sum(),
        log_base=rng.uniform(np.log(0.5), np.log(200.0), n),
        daily_vol=rng.uniform(0.01, 0.04, n),
        cp_share=rng.uniform(0.08, 0.16, n),
        buy_p=np.clip(rng.normal(0.5, 0.03, n), 0.4, 0.6),
    )


def _participant_p() -> np.ndarray:
    k = np.arange(1, N_PARTICIPANTS + 1, dtype=np.float64)
    w = 1.0 / k**1.2
    return w / w.sum()


def _intraday_weights() -> np.ndarray:
    """U-shaped activity per session minute: spikes at the open and the close."""
    x = (np.arange(SESSION_MINUTES) + 0.5) / SESSION_MINUTES
    w = 1.0 + 4.0 * np.exp(-x / 0.04) + 3.0 * np.exp(-(1.0 - x) / 0.03) + 0.8 * (2 * x - 1) ** 2
    return w / w.sum()


def _parse_month(month: str) -> tuple[int, int]:
    m = _MONTH_RE.match(month)
    if not m:
        raise ValueError(f"month {month!r} is not YYYY-MM")
    return int(m.group(1)), int(m.group(2))


def _weekdays(year: int, month: int) -> list[date]:
    days = calendar.monthrange(year, month)[1]
    return [d for d in (date(year, month, i) for i in range(1, days + 1)) if d.weekday() < 5]


def _open_ns(days: list[date], tz: ZoneInfo) -> np.ndarray:
    """Session open of each day as UTC nanoseconds since the epoch."""
    out = np.empty(len(days), dtype=np.int64)
    for i, d in enumerate(days):
        local = datetime.combine(d, SESSION_OPEN, tzinfo=tz)
        out[i] = int(local.timestamp()) * 1_000_000_000
    return out


@dataclass
class _Month:
    """Everything a month's chunks share: time bins, their row counts, the price paths."""

    label: str
    days: list[date]
    bin_start: np.ndarray  # UTC ns of each session minute (days x minutes, flattened)
    counts: np.ndarray  # rows per bin
    path: np.ndarray  # log price per (security, path point)
    path_step: int  # bins per path point
    year: int
    month: int


def _plan_month(label: str, rows: int, uni: _Universe, seed: int, tz: ZoneInfo) -> _Month:
    year, month = _parse_month(label)
    days = _weekdays(year, month)
    rng = np.random.default_rng([seed, year, month])
    day_w = rng.lognormal(0.0, 0.25, len(days))
    p = np.outer(day_w, _intraday_weights()).ravel()
    p /= p.sum()
    counts = rng.multinomial(rows, p) if rows > 0 else np.zeros(p.size, dtype=np.int64)
    bin_start = (
        _open_ns(days, tz)[:, None] + np.arange(SESSION_MINUTES, dtype=np.int64) * _NS_PER_MIN
    ).ravel()
    n_sec = len(uni.codes)
    n_bins = p.size
    step = max(1, -(-n_sec * n_bins // _MAX_PATH_POINTS))
    points = -(-n_bins // step)
    sigma = uni.daily_vol * np.sqrt(step / SESSION_MINUTES)
    start = uni.log_base + rng.normal(0.0, 0.08, n_sec)  # month-to-month drift
    steps = rng.standard_normal((n_sec, points)) * sigma[:, None]
    path = start[:, None] + np.cumsum(steps, axis=1)
    return _Month(label, days, bin_start, counts.astype(np.int64), path, step, year, month)


def _ticks(price: np.ndarray) -> np.ndarray:
    return np.where(price < 0.1, 0.001, np.where(price < 2.0, 0.005, 0.01))


def _chunk(
    m: _Month, uni: _Universe, seed: int, index: int, bins: np.ndarray, counts: np.ndarray
) -> dict[str, Any]:
    """The rows of consecutive time bins `bins` (with `counts` rows each), sorted by ts."""
    rng = np.random.default_rng([seed, m.year, m.month, 1, index])
    n = int(counts.sum())
    row_bin = np.repeat(bins, counts)
    ts = m.bin_start[row_bin] + rng.integers(0, _NS_PER_MIN, n, dtype=np.int64)
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    row_bin = row_bin[order]

    sec = rng.choice(len(uni.codes), size=n, p=uni.weights)
    raw = np.exp(m.path[sec, row_bin // m.path_step] + rng.normal(0.0, 0.0008, n))
    tick = _ticks(raw)
    price = np.round(np.maximum(np.round(raw / tick), 1.0) * tick, 3)

    notional = rng.lognormal(np.log(6000.0), 1.3, n)
    block = rng.random(n) < 0.003
    notional[block] *= 10.0 * (1.0 + rng.pareto(1.5, int(block.sum())))
    size = np.maximum(1, np.rint(notional / price)).astype(np.int64)
    lots = (size >= 100) & (rng.random(n) < 0.5)
    size[lots] = np.maximum(100, np.rint(size[lots] / 100.0) * 100).astype(np.int64)
    size = np.minimum(size, 1_000_000_000)

    buy = rng.random(n) < uni.buy_p[sec]
    part = rng.choice(N_PARTICIPANTS, size=n, p=_participant_p())
    part_null = rng.random(n) < PARTICIPANT_NULL_P
    cp = rng.random(n) < uni.cp_share[sec]
    venue_null = rng.random(n) < VENUE_NULL_P
    return {
        "ts": ts,
        "sec": sec,
        "price": price,
        "size": size,
        "side": np.where(buy, 0, 1),
        "part": part,
        "part_null": part_null,
        "venue": np.where(cp, 0, 1),
        "venue_null": venue_null,
    }


def _iso_text(ts_ns: np.ndarray) -> pa.Array:
    """ISO-8601 UTC text with nanoseconds and ``Z``, e.g. ``2024-01-02T23:15:00.123456789Z``.

    Formats each distinct second once (a chunk is a few hours of sorted events), then appends
    the zero-padded fraction: about three times faster than `pyarrow.compute.strftime`.
    """
    secs = ts_ns // 1_000_000_000
    frac = ts_ns - secs * 1_000_000_000
    uniq, inv = np.unique(secs, return_inverse=True)
    head = np.char.add(np.datetime_as_string(uniq.view("datetime64[s]"), unit="s"), ".")
    heads = pa.array(head, type=pa.string()).take(pa.array(inv))
    fracs = pc.utf8_lpad(pc.cast(pa.array(frac), pa.string()), 9, "0")
    return pc.binary_join_element_wise(heads, fracs, "Z", "")


def _table(cols: dict[str, Any], codes: pa.Array, csv: bool) -> pa.Table:
    ts = (
        _iso_text(cols["ts"]) if csv else pa.array(cols["ts"], type=pa.int64()).view(SCHEMA[0].type)
    )
    participants = pa.array([f"P{i:02d}" for i in range(1, N_PARTICIPANTS + 1)])
    arrays = [
        ts,
        codes.take(pa.array(cols["sec"])),
        pa.array(cols["price"], type=pa.float64()),
        pa.array(cols["size"], type=pa.int64()),
        pa.array(["B", "S"]).take(pa.array(cols["side"])),
        participants.take(pa.array(cols["part"], mask=cols["part_null"])),
        pa.array(["CP", "TM"]).take(pa.array(cols["venue"], mask=cols["venue_null"])),
    ]
    return pa.Table.from_arrays(arrays, schema=CSV_SCHEMA if csv else SCHEMA)


def _utc_dates(m: _Month) -> tuple[date, date]:
    """The UTC dates [start, end) the month's events fall on (for DBN symbol mappings)."""
    first = int(m.bin_start.min()) // 1_000_000_000
    last = (int(m.bin_start.max()) + _NS_PER_MIN - 1) // 1_000_000_000
    start = datetime.fromtimestamp(first, UTC).date()
    return start, datetime.fromtimestamp(last, UTC).date() + timedelta(days=1)


class _Writer:
    """Writes one output file locally (Parquet, CSV, gzip CSV or (zstd) DBN) in chunks.

    DBN files need `codes` (the securities) and `dates` (the UTC dates their mappings cover).
    """

    def __init__(
        self, path: Path, fmt: str, codes: list[str] | None = None, dates: tuple[date, date] | None = None
    ) -> None:
        self.fmt = fmt
        self._stream: Any = None
        self._raw: Any = None
        self._pq: pq.ParquetWriter | None = None
        self._csv: pa_csv.CSVWriter | None = None
        self._dbn: DbnWriter | None = None
        if fmt in ("dbn", "dbn.zst"):
            assert codes is not None and dates is not None
            self._raw = open(path, "wb")  # noqa: SIM115 (closed in close())
            self._dbn = DbnWriter(self._raw, codes, dates[0], dates[1], compressed=fmt == "dbn.zst")
        elif fmt == "parquet":
            self._pq = pq.ParquetWriter(
                str(path),
                SCHEMA,
                compression="snappy",
                # A plain (not dictionary) encoded security column, as in many raw files.
                use_dictionary=["side", "participant", "venue"],
            )
        else:
            self._raw = open(path, "wb")  # noqa: SIM115 (closed in close())
            sink: Any = self._raw
            if fmt == "csv.gz":
                # Fast level, and mtime=0 so that the bytes depend on the data only.
                self._stream = gzip.GzipFile(
                    filename="", mode="wb", fileobj=self._raw, compresslevel=3, mtime=0
                )
                sink = self._stream
            self._csv = pa_csv.CSVWriter(
                sink, CSV_SCHEMA, write_options=pa_csv.WriteOptions(quoting_style="none")
            )

    def write(self, table: pa.Table | None, cols: dict[str, Any]) -> None:
        """Write `cols` (as `table` for Parquet and CSV; DBN takes the numpy columns)."""
        if self._dbn is not None:
            self._dbn.write({"ts": cols["ts"], "security": cols["sec"], "price": cols["price"],
                             "size": cols["size"], "side": cols["side"]})  # fmt: skip
            return
        assert table is not None
        if self._pq is not None:
            self._pq.write_table(table, row_group_size=ROW_GROUP_ROWS)
        elif self._csv is not None:
            self._csv.write_table(table)

    def close(self) -> None:
        """Finish the file (idempotent)."""
        if self._pq is not None:
            self._pq.close()
        if self._csv is not None:
            self._csv.close()
        if self._dbn is not None:
            self._dbn.close()
        if self._stream is not None:
            self._stream.close()
        if self._raw is not None:
            self._raw.close()
        self._pq = self._csv = self._stream = self._raw = None
        self._dbn = None


def _file_key(month: str, fmt: str, part: int, files: int) -> str:
    if fmt == "parquet" or files > 1:
        return f"{month}/part-{part:04d}.{fmt}"
    return f"{month}.{fmt}"


def _file_owner(counts: np.ndarray, files: int) -> np.ndarray:
    """The file (part) index of every bin: consecutive runs of roughly equal row counts."""
    total = int(counts.sum())
    if total == 0 or files == 1:
        return np.zeros(counts.size, dtype=np.int64)
    before = np.cumsum(counts) - counts
    return np.minimum(files - 1, before * files // total)


def _chunks(counts: np.ndarray) -> list[np.ndarray]:
    """Group consecutive bins so that each group holds at most CHUNK_ROWS rows.

    (A single bin is never split; with 8,000 minute bins a month that only matters far beyond
    billions of rows.)
    """
    groups: list[np.ndarray] = []
    start, acc = 0, 0
    for i, c in enumerate(counts.tolist()):
        if acc and acc + c > CHUNK_ROWS:
            groups.append(np.arange(start, i))
            start, acc = i, 0
        acc += c
    groups.append(np.arange(start, counts.size))
    return groups


def _remove_stale(storage: Storage, month: str, written: set[str]) -> list[str]:
    removed: list[str] = []
    candidates = [f"{month}.{ext}" for ext in FORMATS]
    candidates += [
        key for key in storage.keys(f"{month}/") if _OWN_PART_RE.match(key.rsplit("/", 1)[-1])
    ]
    for key in candidates:
        if key not in written and storage.exists(key):
            storage.delete(key)
            removed.append(storage.describe(key))
    return removed


def _write_month(
    plan: _Month,
    uni: _Universe,
    seed: int,
    fmt: str,
    files: int,
    codes: pa.Array,
    storage: Storage,
    tmp: Path,
    written: list[str],
) -> None:
    """Generate a month chunk by chunk and store it as `files` parts (keys go to `written`)."""
    owner = _file_owner(plan.counts, files)
    local = tmp / f"part.{fmt}"
    part = 0
    dbn = fmt in ("dbn", "dbn.zst")
    symbols: list[str] = codes.to_pylist()
    dates = _utc_dates(plan) if dbn else None

    def new_writer() -> _Writer:
        return _Writer(local, fmt, symbols, dates)

    writer = new_writer()

    def finish() -> None:
        writer.close()
        key = _file_key(plan.label, fmt, part, files)
        storage.write_file(key, local, content_type=_CONTENT_TYPES[fmt])
        local.unlink()
        written.append(key)

    try:
        # Chunks do not depend on `files` (nor on the format), so neither do the rows.
        for index, group in enumerate(_chunks(plan.counts)):
            cols = _chunk(plan, uni, seed, index, group, plan.counts[group])
            table = None if dbn else _table(cols, codes, csv=fmt != "parquet")
            row_owner = np.repeat(owner[group], plan.counts[group])
            for f in np.unique(row_owner).tolist():
                while part < f:
                    finish()
                    part += 1
                    writer = new_writer()
                lo, hi = (int(x) for x in np.searchsorted(row_owner, [f, f + 1]))
                part_cols = {k: v[lo:hi] for k, v in cols.items()} if dbn else cols
                writer.write(None if table is None else table.slice(lo, hi - lo), part_cols)
        while part < files - 1:
            finish()
            part += 1
            writer = new_writer()
        finish()
    finally:
        writer.close()


def generate(
    out: str,
    months: list[str],
    securities: int = 20,
    rows: int = 200_000,
    fmt: str = "parquet",
    seed: int = 7,
    market_tz: str = "Australia/Sydney",
    endpoint_url: str | None = None,
    files_per_month: int = 1,
) -> dict[str, Any]:
    """Write `rows` synthetic orders per month for `months` (``YYYY-MM``) under `out`.

    Returns a summary: ``out``, ``format``, ``seed``, ``market_tz``, ``months``, ``rows`` (total),
    ``rows_per_month`` ({month: rows}), ``files`` (URIs written), ``removed`` (stale files
    deleted), ``securities`` (the universe's codes) and ``trade_dates`` (ISO dates: the
    weekdays of the months, in the market time zone).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if rows < 0:
        raise ValueError("rows must be >= 0")
    if files_per_month < 1:
        raise ValueError("files_per_month must be >= 1")
    if securities < 1:
        raise ValueError("securities must be at least 1")
    months = list(dict.fromkeys(months))  # each month once, in the order given
    if not months:
        raise ValueError("give at least one month")
    for mo in months:
        _parse_month(mo)
    try:
        tz = ZoneInfo(market_tz)
    except Exception as exc:  # ZoneInfoNotFoundError, ValueError on odd names
        raise ValueError(f"unknown time zone {market_tz!r}") from exc

    storage = open_storage(out, endpoint_url=endpoint_url)
    uni = _universe(securities, seed)
    codes = pa.array(uni.codes, type=pa.string())
    files: list[str] = []
    removed: list[str] = []
    rows_per_month: dict[str, int] = {}
    trade_dates: list[str] = []

    with tempfile.TemporaryDirectory(prefix="tickq-gen-") as tmp:
        for label in months:
            plan = _plan_month(label, rows, uni, seed, tz)
            trade_dates += [d.isoformat() for d in plan.days]
            written: list[str] = []
            _write_month(plan, uni, seed, fmt, files_per_month, codes, storage, Path(tmp), written)
            files += [storage.describe(key) for key in written]
            removed += _remove_stale(storage, label, set(written))
            rows_per_month[label] = int(plan.counts.sum())

    return {
        "out": storage.uri,
        "format": fmt,
        "seed": seed,
        "market_tz": market_tz,
        "months": list(months),
        "rows": sum(rows_per_month.values()),
        "rows_per_month": rows_per_month,
        "files": files,
        "removed": removed,
        "securities": uni.codes,
        "trade_dates": trade_dates,
    }
