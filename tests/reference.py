"""An independent reference computation of tickq's analytics, for tests.

It reads the raw input files of a local directory with pandas/pyarrow and applies the rules of
the product contract (SPEC.md: Input, Run parameters, Analytics) by its own code; it imports
nothing from ``shared``, ``producer``, ``worker`` or ``aggregator``. Meant for test-sized data
(everything is held in memory).

Rules implemented
-----------------
Input files of month M: every file under ``<input>/M/`` (recursively; names starting with ``.``
or ``_`` are skipped, e.g. temporary files and ``_SUCCESS`` markers) plus ``<input>/M.parquet``,
``<input>/M.csv`` and ``<input>/M.csv.gz``. Other extensions (``.dbn``, ``.dbn.zst`` included:
the reference cannot read DBN) raise an error, as does a month with no files or a missing
required column. Columns other than the ones below are ignored.

- ``ts``: Parquet timestamps of any unit, naive = UTC, tz-aware converted to UTC; Parquet
  integers are ns since the epoch; text (CSV, or Parquet strings) is either an integer (ns since
  the epoch) or ISO-8601 (``Z``, ``±HH:MM`` offsets, or naive = UTC). An unparseable value
  counts as null.
- CSV: only an empty field is null (``NA``, ``null`` … are ordinary strings).
- ``trade_date``: the file's ``trade_date`` column where present and not null (Parquet date or
  timestamp, or ``YYYY-MM-DD`` text), else the date of ``ts`` in the market time zone.
- ``hour``: hour (0-23) of ``ts`` in the market time zone (wall clock, DST-aware).
- ``side``: after stripping blanks, any case: ``B``/``BUY`` → B; ``S``/``SELL``/``A`` → S; any
  other value or null counts in neither buy nor sell volume (the row is still accepted).
- Rejected rows (``rows_rejected``): null (or unparseable) ts, security, price or size; empty
  security; price not finite or <= 0; size <= 0 or not an integer (an integral float such as
  ``2.0`` is accepted as 2). Rejection is checked before any run filter.
- Run filters on valid rows (a row filtered out is neither accepted nor rejected):
  ``securities`` (exact match), ``dates`` (list, or ``D1..D2`` inclusive, on trade_date),
  ``participants`` and ``venues`` (a null never matches a list), ``session`` ``HH:MM-HH:MM``
  on the wall-clock time of day in the market zone, start inclusive, end exclusive (a start
  after the end wraps past midnight), ``min_size`` / ``max_size`` inclusive.
- ``size_bucket`` = number of edges <= notional (price * size); ``bucket_lower`` = edge[i-1],
  ``bucket_upper`` = edge[i], null (NaN) where unbounded; edges default to
  10000,50000,200000,500000,1000000.
- Aggregates: ``records``, ``volume`` = Σ size, ``notional`` = Σ price * size, ``vwap`` = notional /
  volume, ``avg_size`` = volume / records, ``low``/``high``, ``buy_volume``/``sell_volume``,
  ``first_ts``/``last_ts``; ``days`` = distinct trade dates per security, ``securities`` =
  distinct securities per date, ``notional_share`` = group notional / total notional. Rows of
  different months with the same (security, trade_date) fall into one group.
- Output frames: the spec's columns in its order, keys ascending, a null participant/venue
  last; trade_date as ``datetime.date``, first_ts/last_ts ``datetime64[ns, UTC]``, integers
  int64, floats float64, strings object with None for null.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "ANALYTICS_COLUMNS",
    "DEFAULT_SIZE_BUCKETS",
    "TABLES",
    "accepted_rows",
    "assert_tables_equal",
    "load_rows",
    "month_files",
    "reference_counts",
    "reference_tables",
]

DEFAULT_SIZE_BUCKETS = (10000.0, 50000.0, 200000.0, 500000.0, 1000000.0)
REQUIRED = ("ts", "security", "price", "size")
ANALYTICS_COLUMNS = [
    "records", "volume", "notional", "vwap", "avg_size", "low", "high",
    "buy_volume", "sell_volume", "first_ts", "last_ts",
]  # fmt: skip
TABLES: dict[str, tuple[list[str], list[str]]] = {
    # name: (keys, value columns)
    "security_daily": (["security", "trade_date"], ANALYTICS_COLUMNS),
    "by_security": (["security"], [*ANALYTICS_COLUMNS, "days"]),
    "by_date": (["trade_date"], [*ANALYTICS_COLUMNS, "securities"]),
    "by_participant": (
        ["participant"],
        ["records", "volume", "notional", "vwap", "notional_share"],
    ),
    "by_hour": (["hour"], ["records", "volume", "notional", "vwap"]),
    "by_size_bucket": (
        ["size_bucket", "bucket_lower", "bucket_upper"],
        ["records", "volume", "notional"],
    ),
    "by_venue": (["venue"], ["records", "volume", "notional", "notional_share"]),
    "timeseries_hourly": (["trade_date", "hour"], ["records", "volume", "notional", "vwap"]),
    "timeseries_daily": (["trade_date"], ["records", "volume", "notional", "vwap"]),
}
INT_COLUMNS = frozenset(
    {"records", "volume", "buy_volume", "sell_volume", "days", "securities", "hour", "size_bucket"}
)
STR_COLUMNS = frozenset({"security", "participant", "venue"})
DATE_COLUMNS = frozenset({"trade_date"})
TS_COLUMNS = frozenset({"first_ts", "last_ts"})
NULL_LAST_KEYS = frozenset({"participant", "venue"})
_EXTENSIONS = (".csv.gz", ".parquet", ".csv")
_INT_TEXT = re.compile(r"^[+-]?\d+$")
_SESSION = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_NS = 1_000_000_000


# --------------------------------------------------------------------------- reading


def month_files(input_dir: str | Path, month: str) -> list[Path]:
    """The input files of `month`: everything under ``<input>/M/`` plus ``<input>/M.<ext>``."""
    root = Path(input_dir)
    found: list[Path] = []
    folder = root / month
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).parts
            if p.is_file() and not any(part.startswith((".", "_")) for part in rel):
                found.append(p)
    for ext in (".parquet", ".csv", ".csv.gz", ".dbn", ".dbn.zst"):
        p = root / f"{month}{ext}"
        if p.is_file():
            found.append(p)
    if not found:
        raise FileNotFoundError(f"no input for month {month} under {root}")
    return found


def _obj(values: Iterable[Any]) -> pd.Series:
    """An object Series with None for every null."""
    out = [None if _is_null(v) else v for v in values]
    return pd.Series(out, dtype=object)


def _is_null(v: Any) -> bool:
    if v is None or v is pd.NaT or v is pd.NA:
        return True
    return isinstance(v, float) and math.isnan(v)


def _ts_from_text(values: pd.Series) -> pd.Series:
    """Integer ns or ISO-8601 text → datetime64[ns, UTC]; unparseable → NaT."""
    text = _obj(values).map(lambda v: v.strip() if isinstance(v, str) else v)
    is_int = text.map(lambda v: isinstance(v, str) and bool(_INT_TEXT.match(v)))
    out = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns, UTC]")
    if is_int.any():
        ns = np.array([int(v) for v in text[is_int]], dtype=np.int64)
        out[is_int] = pd.to_datetime(ns, unit="ns", utc=True)
    iso = text.notna() & ~is_int
    if iso.any():
        parsed = pd.to_datetime(text[iso], format="ISO8601", utc=True, errors="coerce")
        out[iso] = parsed.astype("datetime64[ns, UTC]")
    return out


def _ts_from_arrow(col: pa.ChunkedArray) -> pd.Series:
    t = col.type
    if pa.types.is_timestamp(t):
        ns = col.cast(pa.timestamp("ns", tz=t.tz)).cast(pa.int64())  # UTC instants
        return _ns_series(ns)
    if pa.types.is_integer(t):
        return _ns_series(col.cast(pa.int64()))
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return _ts_from_text(_obj(col.cast(pa.string()).to_pylist()))
    raise ValueError(f"ts has unsupported type {t}")


def _ns_series(ns: pa.ChunkedArray) -> pd.Series:
    mask = np.asarray(ns.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    arr = ns.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    out = pd.Series(pd.to_datetime(arr, unit="ns", utc=True))
    out[mask] = pd.NaT
    return out


def _size_from_text(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values, ok mask); ok is False for null, non-numeric and non-integral sizes."""
    vals = np.zeros(len(values), dtype=np.int64)
    ok = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if _is_null(v):
            continue
        s = str(v).strip()
        if _INT_TEXT.match(s):
            n = int(s)
            if -(2**63) <= n < 2**63:
                vals[i], ok[i] = n, True
            continue
        try:
            f = float(s)
        except ValueError:
            continue
        if math.isfinite(f) and f == math.floor(f) and abs(f) < 2**63:
            vals[i], ok[i] = int(f), True
    return vals, ok


def _size_from_arrow(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    t = col.type
    if pa.types.is_integer(t):
        mask = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        vals = col.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        return vals, ~mask
    return _size_from_text(_obj(col.to_pylist()))


def _price(values: Iterable[Any]) -> np.ndarray:
    return pd.to_numeric(_obj(values), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _side(v: Any) -> str | None:
    if not isinstance(v, str):
        return None
    s = v.strip().upper()
    if s in ("B", "BUY"):
        return "B"
    if s in ("S", "SELL", "A"):
        return "S"
    return None


def _date_value(v: Any) -> date | None:
    if _is_null(v):
        return None
    if isinstance(v, pd.Timestamp | datetime):
        return v.date()
    if isinstance(v, date):
        return v
    if isinstance(v, np.datetime64):
        return pd.Timestamp(v).date()
    try:
        return date.fromisoformat(str(v).strip()[:10])
    except ValueError:
        return None


def _read_file(path: Path) -> pd.DataFrame:
    """One input file → a frame of parsed columns (see `load_rows`)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        table = pq.read_table(path)
        cols = set(table.column_names)
        _check_required(path, cols)
        n = table.num_rows

        def text(c: str) -> pd.Series:
            if c not in cols:
                return pd.Series([None] * n, dtype=object)
            return _obj(table.column(c).cast(pa.string()).to_pylist())

        ts = _ts_from_arrow(table.column("ts"))
        size, size_ok = _size_from_arrow(table.column("size"))
        price = _price(table.column("price").to_pylist())
        trade_date = (
            _obj(_date_value(v) for v in table.column("trade_date").to_pylist())
            if "trade_date" in cols
            else pd.Series([None] * n, dtype=object)
        )
        security = text("security")
    elif name.endswith((".csv", ".csv.gz")):
        raw = pd.read_csv(
            path, dtype=str, keep_default_na=False, na_values=[""], compression="infer"
        )
        cols = set(raw.columns)
        _check_required(path, cols)
        n = len(raw)

        def text(c: str) -> pd.Series:
            if c not in cols:
                return pd.Series([None] * n, dtype=object)
            return _obj(raw[c].tolist())

        ts = _ts_from_text(text("ts"))
        size, size_ok = _size_from_text(text("size"))
        price = _price(text("price"))
        trade_date = _obj(_date_value(v) for v in text("trade_date"))
        security = text("security")
    else:
        raise ValueError(f"{path}: unsupported input format (reference reads parquet and csv)")
    return pd.DataFrame(
        {
            "ts": ts.reset_index(drop=True),
            "security": security.reset_index(drop=True),
            "price": price,
            "size": size,
            "size_ok": size_ok,
            "side": _obj(_side(v) for v in text("side")),
            "participant": text("participant").reset_index(drop=True),
            "venue": text("venue").reset_index(drop=True),
            "file_trade_date": trade_date.reset_index(drop=True),
        }
    )


def _check_required(path: Path, cols: set[str]) -> None:
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {', '.join(missing)}")


def load_rows(input_dir: str | Path, months: list[str], market_tz: str = "UTC") -> pd.DataFrame:
    """Every input row of `months`, parsed, with derived columns.

    Columns: ts (datetime64[ns, UTC], NaT if null), security, price (float), size (int64),
    side (B/S/None), participant, venue, trade_date (date or None), hour, tod_ns (wall-clock
    time of day in ns, market zone), valid (passes the rejection rules), file.
    """
    frames = []
    for month in months:
        for path in month_files(input_dir, month):
            f = _read_file(path)
            f["file"] = str(path)
            frames.append(f)
    rows = pd.concat(frames, ignore_index=True)
    ts = rows["ts"]
    local = ts.dt.tz_convert(market_tz)
    has_ts = ts.notna().to_numpy()
    hour = local.dt.hour.fillna(-1).astype(np.int64)
    minute = local.dt.minute.fillna(0).astype(np.int64)
    second = local.dt.second.fillna(0).astype(np.int64)
    sub = np.where(has_ts, ts.fillna(pd.Timestamp(0, tz="UTC")).astype(np.int64) % _NS, 0)
    rows["hour"] = hour
    rows["tod_ns"] = ((hour * 60 + minute) * 60 + second) * _NS + sub
    derived = _obj(local.dt.date.tolist()) if len(rows) else pd.Series([], dtype=object)
    file_td = rows.pop("file_trade_date")
    rows["trade_date"] = _obj(
        fd if fd is not None else d for fd, d in zip(file_td, derived, strict=True)
    )
    sec = rows["security"]
    price = rows["price"].to_numpy()
    with np.errstate(invalid="ignore"):
        rows["valid"] = (
            has_ts
            & sec.notna().to_numpy()
            & (sec != "").to_numpy()
            & np.isfinite(price)
            & (price > 0)
            & rows["size_ok"].to_numpy()
            & (rows["size"].to_numpy() > 0)
        )
    return rows.drop(columns=["size_ok"])


# --------------------------------------------------------------------------- filters


def _as_list(v: Iterable[str] | str | None) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    return [str(p) for p in v]


def _dates(v: Iterable[str | date] | str | None) -> set[date] | tuple[date, date] | None:
    if v is None:
        return None
    if isinstance(v, str) and ".." in v:
        lo, hi = (date.fromisoformat(p.strip()) for p in v.split("..", 1))
        return (lo, hi)
    items = v.split(",") if isinstance(v, str) else list(v)
    return {d if isinstance(d, date) else date.fromisoformat(str(d).strip()) for d in items}


def _session(v: str | None) -> tuple[int, int] | None:
    if v is None:
        return None
    m = _SESSION.match(v.strip())
    if not m:
        raise ValueError(f"session {v!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"session {v!r} is not HH:MM-HH:MM")
    start, end = (h1 * 60 + m1) * 60 * _NS, (h2 * 60 + m2) * 60 * _NS
    if start == end:
        raise ValueError(f"session {v!r} is empty")
    return start, end


def _edges(v: Iterable[float] | str | None) -> list[float]:
    if v is None:
        return list(DEFAULT_SIZE_BUCKETS)
    items = v.split(",") if isinstance(v, str) else list(v)
    edges = [float(x) for x in items if str(x).strip()]
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError("size bucket edges must be strictly increasing")
    return edges


def _in_scope(rows: pd.DataFrame, securities: list[str] | None, dates: Any) -> np.ndarray:
    """Rows a (security, trade_date) job would read: named security and date, in the filters."""
    sec = rows["security"]
    ok = np.array(sec.notna() & (sec != ""), dtype=bool)  # a writable copy
    ok &= rows["trade_date"].notna().to_numpy()
    if securities is not None:
        ok &= sec.isin(securities).to_numpy()
    if dates is not None:
        ok &= _date_mask(rows["trade_date"], dates)
    return ok


def _date_mask(td: pd.Series, dates: Any) -> np.ndarray:
    if isinstance(dates, tuple):
        lo, hi = dates
        return np.array([d is not None and lo <= d <= hi for d in td], dtype=bool)
    return np.array([d in dates for d in td], dtype=bool)


def _filter_mask(
    rows: pd.DataFrame,
    securities: list[str] | None,
    dates: Any,
    participants: list[str] | None,
    venues: list[str] | None,
    session: tuple[int, int] | None,
    min_size: int | None,
    max_size: int | None,
) -> np.ndarray:
    ok = _in_scope(rows, securities, dates)
    if participants is not None:
        ok &= rows["participant"].isin(participants).to_numpy() & rows["participant"].notna()
    if venues is not None:
        ok &= rows["venue"].isin(venues).to_numpy() & rows["venue"].notna()
    if session is not None:
        start, end = session
        tod = rows["tod_ns"].to_numpy()
        ok &= ((tod >= start) & (tod < end)) if start < end else ((tod >= start) | (tod < end))
    size = rows["size"].to_numpy()
    if min_size is not None:
        ok &= size >= min_size
    if max_size is not None:
        ok &= size <= max_size
    return np.asarray(ok, dtype=bool)


def accepted_rows(
    input_dir: str | Path,
    months: list[str],
    *,
    market_tz: str = "UTC",
    securities: Iterable[str] | str | None = None,
    dates: Iterable[str | date] | str | None = None,
    participants: Iterable[str] | str | None = None,
    venues: Iterable[str] | str | None = None,
    session: str | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> pd.DataFrame:
    """The accepted rows (valid and passing every run filter), as `load_rows` columns."""
    rows = load_rows(input_dir, months, market_tz)
    keep = rows["valid"].to_numpy() & _filter_mask(
        rows,
        _as_list(securities),
        _dates(dates),
        _as_list(participants),
        _as_list(venues),
        _session(session),
        min_size,
        max_size,
    )
    return rows[keep].reset_index(drop=True)


def reference_counts(
    input_dir: str | Path,
    months: list[str],
    *,
    market_tz: str = "UTC",
    securities: Iterable[str] | str | None = None,
    dates: Iterable[str | date] | str | None = None,
    participants: Iterable[str] | str | None = None,
    venues: Iterable[str] | str | None = None,
    session: str | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    size_buckets: Iterable[float] | str | None = None,
) -> dict[str, int]:
    """Row counts of a run.

    - ``rows_read``: every row of the input files;
    - ``rows_rejected``: rows failing the validity rules (checked before any filter);
    - ``rows_accepted``: valid rows passing every run filter;
    - ``rows_filtered``: valid rows removed by a run filter (read = accepted + rejected +
      filtered);
    - ``rows_read_in_scope`` / ``rows_rejected_in_scope``: the same restricted to rows that a
      (security, trade_date) job reads: a non-empty security and a trade date (from the column
      or a valid ts), both within ``securities`` / ``dates``. A pipeline that counts rows per
      job reports these.
    """
    del size_buckets  # accepted for symmetry with reference_tables
    rows = load_rows(input_dir, months, market_tz)
    sec, dts = _as_list(securities), _dates(dates)
    valid = rows["valid"].to_numpy()
    keep = valid & _filter_mask(
        rows,
        sec,
        dts,
        _as_list(participants),
        _as_list(venues),
        _session(session),
        min_size,
        max_size,
    )
    scope = _in_scope(rows, sec, dts)
    return {
        "rows_read": len(rows),
        "rows_accepted": int(keep.sum()),
        "rows_rejected": int((~valid).sum()),
        "rows_filtered": int((valid & ~keep).sum()),
        "rows_read_in_scope": int(scope.sum()),
        "rows_rejected_in_scope": int((scope & ~valid).sum()),
    }


# --------------------------------------------------------------------------- aggregation

_NULL_KEY = "\x00<null>"


def _aggregate(acc: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """All analytics columns (and days / securities) per group of `keys`."""
    work = acc.copy()
    for k in keys:
        if k in NULL_LAST_KEYS:
            work[k] = work[k].map(lambda v: _NULL_KEY if v is None else v).astype(object)
    g = work.groupby(keys, sort=False, dropna=False)
    out = g.agg(
        records=("price", "count"),
        volume=("size", "sum"),
        notional=("notional", "sum"),
        low=("price", "min"),
        high=("price", "max"),
        buy_volume=("buy", "sum"),
        sell_volume=("sell", "sum"),
        first_ts=("ts", "min"),
        last_ts=("ts", "max"),
        days=("trade_date", "nunique"),
        securities=("security", "nunique"),
    ).reset_index()
    out["vwap"] = out["notional"] / out["volume"]
    out["avg_size"] = out["volume"] / out["records"]
    out["notional_share"] = out["notional"] / float(acc["notional"].sum())
    sort_cols: list[str] = []
    for k in keys:
        if k in NULL_LAST_KEYS:
            out[f"__null_{k}"] = out[k] == _NULL_KEY
            sort_cols += [f"__null_{k}", k]
        else:
            sort_cols.append(k)
    out = out.sort_values(sort_cols, kind="mergesort").reset_index(drop=True)
    for k in keys:
        if k in NULL_LAST_KEYS:
            out[k] = _obj(None if v == _NULL_KEY else v for v in out[k])
    return out


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=_dtype(c)) for c in columns})


def _dtype(column: str) -> Any:
    if column in INT_COLUMNS:
        return np.int64
    if column in TS_COLUMNS:
        return "datetime64[ns, UTC]"
    if column in STR_COLUMNS or column in DATE_COLUMNS:
        return object
    return np.float64


def _typed(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(index=frame.index)
    for c in columns:
        dt = _dtype(c)
        out[c] = _obj(frame[c].tolist()) if dt is object else frame[c].astype(dt)
    return out.reset_index(drop=True)


def reference_tables(
    input_dir: str | Path,
    months: list[str],
    *,
    market_tz: str = "UTC",
    securities: Iterable[str] | str | None = None,
    dates: Iterable[str | date] | str | None = None,
    participants: Iterable[str] | str | None = None,
    venues: Iterable[str] | str | None = None,
    session: str | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    size_buckets: Iterable[float] | str | None = None,
) -> dict[str, pd.DataFrame]:
    """Every aggregate table of the spec, computed from the raw files (see module docstring)."""
    acc = accepted_rows(
        input_dir,
        months,
        market_tz=market_tz,
        securities=securities,
        dates=dates,
        participants=participants,
        venues=venues,
        session=session,
        min_size=min_size,
        max_size=max_size,
    )
    edges = _edges(size_buckets)
    price = acc["price"].to_numpy(dtype=np.float64)
    size = acc["size"].to_numpy(dtype=np.int64)
    acc["notional"] = price * size.astype(np.float64)
    acc["buy"] = np.where(acc["side"] == "B", size, 0).astype(np.int64)
    acc["sell"] = np.where(acc["side"] == "S", size, 0).astype(np.int64)
    bucket = np.searchsorted(np.asarray(edges, dtype=np.float64), acc["notional"], side="right")
    acc["size_bucket"] = bucket.astype(np.int64)
    lower = [np.nan, *edges]
    upper = [*edges, np.nan]
    acc["bucket_lower"] = np.array([lower[b] for b in bucket], dtype=np.float64)
    acc["bucket_upper"] = np.array([upper[b] for b in bucket], dtype=np.float64)

    tables: dict[str, pd.DataFrame] = {}
    for name, (keys, values) in TABLES.items():
        columns = keys + values
        if acc.empty:
            tables[name] = _empty(columns)
            continue
        agg_keys = ["size_bucket"] if name == "by_size_bucket" else keys
        out = _aggregate(acc, agg_keys)
        if name == "by_size_bucket":
            out["bucket_lower"] = [lower[b] for b in out["size_bucket"]]
            out["bucket_upper"] = [upper[b] for b in out["size_bucket"]]
        tables[name] = _typed(out, columns)
    return tables


# --------------------------------------------------------------------------- comparison


def _norm(column: str, v: Any) -> Any:
    """A comparable Python value: None for nulls, date, UTC Timestamp, str, int or float."""
    if _is_null(v):
        return None
    if column in DATE_COLUMNS:
        return _date_value(v)
    if column in TS_COLUMNS:
        if isinstance(v, int | np.integer):
            return pd.Timestamp(int(v), unit="ns", tz="UTC")
        t = pd.Timestamp(v)
        return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    if isinstance(v, np.generic):
        v = v.item()
    if column in STR_COLUMNS:
        return str(v)
    return v


def _same(column: str, a: Any, e: Any) -> bool:
    if a is None or e is None:
        return a is None and e is None
    if column in INT_COLUMNS:
        return isinstance(a, int) and not isinstance(a, bool) and a == e
    if isinstance(e, float) or isinstance(a, float):
        try:
            return math.isclose(float(a), float(e), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return bool(a == e)


def _column_values(frame: pd.DataFrame, column: str) -> list[Any]:
    return [_norm(column, v) for v in frame[column].tolist()]


def _int_dtype_problem(frame: pd.DataFrame, column: str) -> str | None:
    s = frame[column]
    if pd.api.types.is_integer_dtype(s.dtype):
        return None
    if s.dtype == object and all(isinstance(v, int | np.integer) for v in s.tolist()):
        return None
    return f"column {column} has dtype {s.dtype}: integers must be exact (an integer type)"


def assert_tables_equal(
    actual: Mapping[str, pd.DataFrame],
    expected: Mapping[str, pd.DataFrame],
    *,
    max_lines: int = 25,
) -> None:
    """Assert that every table of `expected` is in `actual` with the same content.

    Same column set (order is not checked), same rows in the same order (keys as in the
    spec), integer columns of an integer type and exactly equal, floats within a relative 1e-9,
    nulls in the same places. Dates may be dates, timestamps or ISO text; timestamps may be
    tz-aware, naive (= UTC) or ISO text. Extra tables in `actual` are ignored. Raises
    AssertionError listing the differences.
    """
    problems: list[str] = []
    for name, exp in expected.items():
        if name not in actual:
            problems.append(f"{name}: table missing (have {sorted(actual)})")
            continue
        act = actual[name]
        lines = _table_diff(name, act, exp)
        if len(lines) > max_lines:
            lines = [*lines[:max_lines], f"{name}: … {len(lines) - max_lines} more differences"]
        problems += lines
    if problems:
        raise AssertionError("aggregate tables differ:\n" + "\n".join(problems))


def _table_diff(name: str, act: pd.DataFrame, exp: pd.DataFrame) -> list[str]:
    keys = TABLES[name][0] if name in TABLES else []
    keys = [k for k in keys if k in exp.columns]
    lines: list[str] = []
    missing = [c for c in exp.columns if c not in act.columns]
    extra = [c for c in act.columns if c not in exp.columns]
    if missing or extra:
        lines.append(f"{name}: columns differ: missing {missing}, unexpected {extra}")
    for c in exp.columns:
        if c in INT_COLUMNS and c in act.columns and len(act):
            problem = _int_dtype_problem(act, c)
            if problem:
                lines.append(f"{name}: {problem}")
    if len(act) != len(exp):
        lines.append(f"{name}: {len(act)} rows, expected {len(exp)}")
    if any(k not in act.columns for k in keys):
        return lines

    def key_tuples(frame: pd.DataFrame) -> list[tuple[Any, ...]]:
        cols = [_column_values(frame, k) for k in keys]
        return list(zip(*cols, strict=True)) if cols else [(i,) for i in range(len(frame))]

    act_keys, exp_keys = key_tuples(act), key_tuples(exp)
    if act_keys != exp_keys:
        a_set, e_set = set(act_keys), set(exp_keys)
        if a_set - e_set:
            lines.append(f"{name}: unexpected keys {sorted(a_set - e_set, key=repr)[:10]}")
        if e_set - a_set:
            lines.append(f"{name}: missing keys {sorted(e_set - a_set, key=repr)[:10]}")
        if a_set == e_set:
            first = next(
                i for i, (a, e) in enumerate(zip(act_keys, exp_keys, strict=True)) if a != e
            )
            lines.append(
                f"{name}: rows not in key order ({keys}); row {first} is {act_keys[first]}, "
                f"expected {exp_keys[first]}"
            )
    a_index = {k: i for i, k in enumerate(act_keys)}
    common = [c for c in exp.columns if c in act.columns and c not in keys]
    a_values = {c: _column_values(act, c) for c in common}
    e_values = {c: _column_values(exp, c) for c in common}
    for j, key in enumerate(exp_keys):
        i = a_index.get(key)
        if i is None:
            continue
        for c in common:
            a, e = a_values[c][i], e_values[c][j]
            if not _same(c, a, e):
                detail = ""
                if isinstance(a, int | float) and isinstance(e, int | float) and e:
                    detail = f" (rel diff {abs(a - e) / abs(e):.3g})"
                label = dict(zip(keys, key, strict=True)) if keys else {"row": j}
                lines.append(f"{name} {label} {c}: actual {a!r}, expected {e!r}{detail}")
    return lines
