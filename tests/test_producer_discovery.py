"""Job discovery from the ingest key sidecar: exactly the scan's answer, or the scan itself."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import producer.discover as discover
import shared.monthkeys as monthkeys
from producer.discover import MonthDiscovery, discover_month
from shared.errors import PermanentError
from shared.inputs import (
    ALL_COLUMNS,
    KeyBatch,
    key_streams,
    month_files,
    normalise,
    parquet_reader,
    read_batches,
    shared_trade_date,
)
from shared.monthkeys import KEYS_NAME, quarter_starts, quarters_share_dates, read_keys
from shared.storage import open_storage
from tests.conftest import S3Server
from tickq.gen import generate
from tickq.ingest import ingest

TS = pa.timestamp("ns", tz="UTC")
INVALID = ("bad/code", "../up", "x" * 70)


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def ns(when: dt.datetime) -> int:
    return int(when.timestamp()) * 10**9 + when.microsecond * 1000


def month_days(month: str) -> list[dt.date]:
    first = dt.date.fromisoformat(f"{month}-01")
    following = (first + dt.timedelta(days=32)).replace(day=1)
    return [first + dt.timedelta(days=i) for i in range(-1, (following - first).days + 1)]


def boundary_instants(month: str, market_tz: str, extra: tuple[str, ...] = ()) -> list[int]:
    """Instants (ns) on and around each local midnight of the month (and a day either side),
    where a wrong date would show, plus `extra` instants (UTC ISO) and one far outside."""
    zone = ZoneInfo(market_tz)
    out: list[int] = []
    for day in month_days(month):
        midnight = ns(dt.datetime.combine(day, dt.time(), zone).astimezone(dt.UTC))
        minute = 60 * 10**9
        out += [midnight + d for d in (-1, 0, 1, -7 * minute - 30 * 10**9, 7 * minute, 15 * minute - 1)]
    for text in extra:
        at = ns(utc(text))
        out += [at - 1, at, at + 1, at + 7 * 60 * 10**9]
    out.append(ns(utc("2023-12-31T23:59:59.999999")))  # a stray row of another month
    out += [-86_400 * 10**9, -86_400 * 10**9 - 1]  # and of 1969, on a UTC midnight
    return out


def dirty_month(
    raw: Path, month: str, market_tz: str, with_date: bool, rows: int = 20_000, extra: tuple[str, ...] = ()
) -> list[str]:
    """A generated month with null and invalid securities, null ts, rows on date boundaries
    and, `with_date`, a file whose trade_date column overrides some derived dates."""
    gen = generate(str(raw), [month], securities=12, rows=rows, market_tz=market_tz)
    codes: list[str] = gen["securities"]
    path = raw / month / "part-0000.parquet"
    table = pq.read_table(path)
    n = table.num_rows
    i = np.arange(n)
    security = np.array(table.column("security").to_pylist(), dtype=object)
    for step, code in ((83, INVALID[0]), (79, INVALID[2]), (89, "")):
        security[i % step == 0] = code
    security[i % 97 == 0] = None
    ts = table.column("ts").combine_chunks()
    ts = pc.if_else(pa.array(i % 71 == 0), pa.scalar(None, TS), ts)
    table = table.set_column(table.schema.get_field_index("security"), "security", pa.array(security, pa.string()))
    table = table.set_column(table.schema.get_field_index("ts"), "ts", ts)
    pq.write_table(table, path)

    instants = boundary_instants(month, market_tz, extra)
    m = len(instants) + 4
    rng = np.random.default_rng(3)
    extra_ts: list[int | None] = [*instants, None, None, None, instants[0]]
    extra_sec: list[str | None] = [codes[k % len(codes)] for k in range(len(instants))]
    extra_sec += [None, codes[0], INVALID[1], None]  # null ts with and without a security
    columns: dict[str, Any] = {
        "ts": pa.array(extra_ts, pa.int64()).view(TS),
        "security": pa.array(extra_sec, pa.string()),
        "price": pa.array(np.full(m, 10.0)),
        "size": pa.array(np.full(m, 100, dtype=np.int64)),
    }
    if with_date:
        days = month_days(month)
        given: list[str | None] = []
        for _ in range(m):
            pick = rng.integers(0, 5)
            if pick == 0:
                given.append(None)
            elif pick == 1:
                given.append("garbage")  # unparseable: the date comes from ts
            else:
                given.append(days[int(rng.integers(0, len(days)))].isoformat())
        given[-3] = days[5].isoformat()  # a row without ts still has a date
        columns["trade_date"] = pa.array(given, pa.string())
    pq.write_table(pa.table(columns), raw / month / "extra.parquet")
    return codes


def without_keys(root: Path, month: str, market_tz: str, **filters: Any) -> MonthDiscovery:
    """The row scan: discovery with the sidecar moved away (and put back)."""
    sidecar = root / month / KEYS_NAME
    aside = root / f"{month}-keys.parquet"
    sidecar.rename(aside)
    try:
        found = discover_month(open_storage(str(root)), month, market_tz, **filters)
    finally:
        aside.rename(sidecar)
    assert found.source == "scan"
    return found


def assert_same(keys: MonthDiscovery, scan: MonthDiscovery) -> None:
    assert keys.source == "keys" and scan.source == "scan"
    assert keys.rows == scan.rows
    assert (keys.rows_scanned, keys.rows_unassigned, keys.files) == (
        scan.rows_scanned, scan.rows_unassigned, scan.files,
    )  # fmt: skip
    assert keys.invalid_securities == scan.invalid_securities
    assert keys == scan


CASES = [
    ("UTC", "2024-03", False, ()),
    ("Australia/Sydney", "2024-04", False, ("2024-04-06T16:00:00",)),
    ("Australia/Sydney", "2024-04", True, ("2024-04-06T16:00:00",)),
    ("America/New_York", "2024-03", True, ("2024-03-10T07:00:00",)),
    ("Asia/Kathmandu", "2024-03", False, ()),
    ("Asia/Kathmandu", "2024-03", True, ()),
]


@pytest.mark.parametrize(("market_tz", "month", "with_date", "transitions"), CASES)
def test_keys_give_exactly_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, market_tz: str, month: str, with_date: bool,
    transitions: tuple[str, ...],
) -> None:  # fmt: skip
    zone = ZoneInfo(market_tz)
    for text in transitions:  # the instants given are the zone's DST changes
        at = utc(text)
        assert (at - dt.timedelta(seconds=1)).astimezone(zone).utcoffset() != at.astimezone(zone).utcoffset()
    # Small flushes and buckets: equal keys land in several sidecar rows, which must add up.
    monkeypatch.setattr(monthkeys, "FLUSH_ROWS", 50)
    monkeypatch.setattr(monthkeys, "ADD_SLICE_ROWS", 1000)
    # And the scan folds its batches' counts together many times over.
    monkeypatch.setattr(discover._FoldedCounts, "FOLD_ROWS", 100)
    raw, out = tmp_path / "raw", tmp_path / "out"
    codes = dirty_month(raw, month, market_tz, with_date, extra=transitions)
    ingest(str(raw), str(out), [month], row_group_rows=2048, memory_budget_bytes=1 << 20)
    sidecar = pq.read_table(out / month / KEYS_NAME)
    assert ("trade_date" in sidecar.column_names) == with_date
    assert sidecar.num_rows < 20_000

    storage = open_storage(str(out))
    for zone_name in (market_tz, "UTC", "America/New_York"):  # the sidecar holds no zone
        keys = discover_month(storage, month, zone_name)
        scan = without_keys(out, month, zone_name)
        assert_same(keys, scan)
        assert keys.rows_unassigned > 0 and {INVALID[0], INVALID[1], "x" * 40} <= keys.invalid_securities
        # ...and what the raw files give (the ingested month has other files).
        raw_found = discover_month(open_storage(str(raw)), month, zone_name)
        assert (raw_found.rows, raw_found.rows_scanned, raw_found.rows_unassigned) == (
            keys.rows, keys.rows_scanned, keys.rows_unassigned,
        )  # fmt: skip

    pairs = sorted(discover_month(storage, month, market_tz).rows)
    days = sorted({d for _, d in pairs})
    last_sec, last_day = pairs[-1]
    filters: list[dict[str, Any]] = [
        {"securities": {codes[0], codes[3], INVALID[0], "NOPE"}},
        {"dates": {dt.date.fromisoformat(d) for d in (days[0], days[len(days) // 2])} | {dt.date(1999, 1, 1)}},
        {"securities": {last_sec}, "dates": {dt.date.fromisoformat(last_day)}},
    ]
    for chosen in filters:
        keys = discover_month(storage, month, market_tz, **chosen)
        assert_same(keys, without_keys(out, month, market_tz, **chosen))
        assert keys.rows


def test_stale_or_foreign_sidecars_fall_back_to_the_scan(tmp_path: Path) -> None:
    month, market_tz = "2024-03", "Australia/Sydney"
    raw, out = tmp_path / "raw", tmp_path / "out"
    dirty_month(raw, month, market_tz, with_date=True)
    ingest(str(raw), str(out), [month])
    storage = open_storage(str(out))
    first = discover_month(storage, month, market_tz)
    assert first.source == "keys"
    part = out / month / "part-00000.parquet"
    original = part.read_bytes()

    # Same name and size, other rows: only the Parquet footer tells.
    table = pq.read_table(part)
    changed = table.slice(0, table.num_rows * 3 // 4)
    write_padded(changed, part, len(original))
    assert part.stat().st_size == len(original) and part.read_bytes() != original
    assert read_keys(storage, month, month_files(storage, month)) is None
    found = discover_month(storage, month, market_tz)
    assert found.source == "scan" and found.rows_scanned == changed.num_rows < first.rows_scanned
    assert found == without_keys(out, month, market_tz)

    # Another size.
    pq.write_table(changed, part)
    assert discover_month(storage, month, market_tz).source == "scan"
    part.write_bytes(original)
    assert discover_month(storage, month, market_tz) == first

    # A file beside the parts is input too.
    (out / month / "notes.csv").write_text("ts,security,price,size\n2024-03-04T01:00:00Z,ZZZ,1,1\n")
    found = discover_month(storage, month, market_tz)
    assert found.source == "scan" and found.rows[("ZZZ", "2024-03-04")] == 1 and found.files == 2
    (out / month / "notes.csv").unlink()

    # Another month's sidecar, and bytes that are no sidecar.
    generate(str(raw), ["2024-04"], securities=3, rows=1000, market_tz=market_tz)
    ingest(str(raw), str(out), ["2024-04"])
    sidecar = out / month / KEYS_NAME
    good = sidecar.read_bytes()
    shutil.copy(out / "2024-04" / KEYS_NAME, sidecar)
    assert discover_month(storage, month, market_tz).source == "scan"
    for junk in (b"", b"PAR1", good[: len(good) // 2], b"not parquet at all" * 10):
        sidecar.write_bytes(junk)
        assert discover_month(storage, month, market_tz) == first
        assert discover_month(storage, month, market_tz).source == "scan"

    # Metadata naming the right parts, counts that do not add up to them.
    sidecar.write_bytes(good)
    meta = pq.ParquetFile(sidecar).metadata.metadata[b"tickq.keys"]
    keys_table = pq.read_table(sidecar)
    for bad_meta in (b"[1]", b"{}", b"{not json", meta.replace(b'"version": 1', b'"version": 2')):
        pq.write_table(keys_table.replace_schema_metadata({b"tickq.keys": bad_meta}), sidecar)
        assert discover_month(storage, month, market_tz).source == "scan"
    pq.write_table(keys_table.slice(1).replace_schema_metadata({b"tickq.keys": meta}), sidecar)
    assert discover_month(storage, month, market_tz).source == "scan"
    pq.write_table(keys_table.replace_schema_metadata({b"tickq.keys": meta}), sidecar)
    assert discover_month(storage, month, market_tz) == first  # the same counts, rewritten

    sidecar.write_bytes(good)
    assert discover_month(storage, month, market_tz).source == "keys"


def write_padded(table: pa.Table, path: Path, size: int) -> None:
    """`table` as Parquet at `path`, padded (with file metadata) to exactly `size` bytes."""

    def write(pad: int) -> int:
        with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
            writer.write_table(table)
            writer.add_key_value_metadata({"pad": "x" * pad})
        return path.stat().st_size

    pad = size - write(0)
    assert pad > 0, "the changed table must be smaller"
    for attempt in (pad, pad - 1, pad - 2, pad - 3):  # the length's varint takes a byte or more
        if write(attempt) == size:
            return
    raise AssertionError(f"could not pad {path} to {size} bytes")


def test_empty_month_and_reingest(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(str(raw), ["2024-04"], securities=3, rows=0)
    ingest(str(raw), str(out), ["2024-04"])
    found = discover_month(open_storage(str(out)), "2024-04", "UTC")
    assert found.source == "keys" and found.files == 1 and found.rows_scanned == 0 and not found.rows
    # Re-ingesting into more parts replaces the sidecar with one that names them.
    generate(str(raw), ["2024-04"], securities=3, rows=5000)
    ingest(str(raw), str(out), ["2024-04"], row_group_rows=500, max_file_rows=2000)
    found = discover_month(open_storage(str(out)), "2024-04", "Australia/Sydney")
    assert found.source == "keys" and found.files == 3 and found.rows_scanned == 5000
    assert found == without_keys(out, "2024-04", "Australia/Sydney")


ZONE_CASES = [
    # Liberia kept local mean time (-0:44:30) until 1972: no offset a multiple of 15 minutes.
    ("Africa/Monrovia", "1971-06", "1971-06-15T00:44:29", "1971-06-15T00:44:31", ("1971-06-14", "1971-06-15")),
    # Newfoundland changed clocks at 00:01 local until 2011: 2010-11-07 02:31 UTC, mid-quarter,
    # back from 00:01 NDT to 23:01 NST of the day before.
    ("America/St_Johns", "2010-11", "2010-11-07T02:30:30", "2010-11-07T02:40:00", ("2010-11-07", "2010-11-06")),
]


@pytest.mark.parametrize(("market_tz", "month", "first", "second", "dates"), ZONE_CASES)
def test_zones_whose_quarter_hours_straddle_dates_are_scanned(
    tmp_path: Path, market_tz: str, month: str, first: str, second: str, dates: tuple[str, str]
) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(str(raw), [month], securities=5, rows=5000, market_tz=market_tz)
    # Two rows of one UTC quarter hour that fall on different market dates.
    assert ns(utc(first)) // (15 * 60 * 10**9) == ns(utc(second)) // (15 * 60 * 10**9)
    pq.write_table(
        pa.table({
            "ts": pa.array([ns(utc(first)), ns(utc(second))], pa.int64()).view(TS),
            "security": ["EDGE", "EDGE"], "price": [1.0, 1.0], "size": [1, 1],
        }),
        raw / month / "edge.parquet",
    )  # fmt: skip
    ingest(str(raw), str(out), [month])
    storage = open_storage(str(out))
    keys = read_keys(storage, month, month_files(storage, month))
    assert keys is not None  # the sidecar is fine, the zone is not
    assert not quarters_share_dates(month, market_tz, keys.column("quarter"))
    found = discover_month(storage, month, market_tz)
    assert found.source == "scan"
    assert found.rows[("EDGE", dates[0])] == 1 and found.rows[("EDGE", dates[1])] == 1
    # The same files in UTC use the sidecar.
    assert discover_month(storage, month, "UTC").source == "keys"


def test_the_zone_check() -> None:
    none = pa.array([], TS)
    for market_tz, month in [
        ("UTC", "2024-03"), ("Australia/Sydney", "2024-04"), ("America/New_York", "2024-03"),
        ("Asia/Kathmandu", "2024-03"), ("Pacific/Chatham", "2024-04"), ("America/St_Johns", "2012-11"),
    ]:  # fmt: skip
        assert quarters_share_dates(month, market_tz, none), (market_tz, month)
    for market_tz, month in [
        ("Australia/Sydney", "1895-01"),  # local mean time, +10:04:52
        ("Africa/Monrovia", "1972-01"),  # -0:44:30 until 1972-01-07 00:44:30 UTC
        ("America/St_Johns", "2010-03"),  # offsets fine, the change at 00:01 local is not
        ("Nowhere/Special", "2024-03"),
    ]:
        assert not quarters_share_dates(month, market_tz, none), (market_tz, month)
    # Quarters outside the month (and its neighbouring days) are checked one by one.
    stray = pa.array([ns(utc("1971-06-15T00:30:00"))], pa.int64()).view(TS)
    inside = pa.array([ns(utc("2024-03-15T00:30:00")), None], pa.int64()).view(TS)
    assert quarters_share_dates("2024-03", "Africa/Monrovia", inside)
    assert not quarters_share_dates("2024-03", "Africa/Monrovia", stray)
    assert quarters_share_dates("2024-03", "UTC", stray)
    for extreme in (2**63 - 1, -(2**63) + 1):  # where the scan's own date arithmetic overflows
        assert not quarters_share_dates("2024-03", "UTC", pa.array([extreme], pa.int64()).view(TS))


def test_quarter_starts_floor_like_the_calendar() -> None:
    q = 15 * 60 * 10**9
    values = [0, 1, q - 1, q, q + 1, -1, -q, -q - 1, -q + 1, -86_400 * 10**9, 1_709_510_400_123_456_789, None]
    ts = pa.array(values, pa.int64()).view(TS)
    assert quarter_starts(ts).equals(pc.floor_temporal(ts, multiple=15, unit="minute"))


def test_timestamps_at_the_ends_of_the_range_are_scanned(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "2024-03").mkdir(parents=True)
    ts = [ns(utc("2024-03-04T01:00:00")), 2**63 - 1, -(2**63) + 1]
    pq.write_table(
        pa.table({"ts": pa.array(ts, pa.int64()).view(TS), "security": ["A", "B", "C"], "price": [1.0] * 3,
                  "size": [1] * 3}),
        raw / "2024-03" / "a.parquet",
    )  # fmt: skip
    ingest(str(raw), str(out), ["2024-03"])
    for market_tz in ("UTC", "Australia/Sydney"):
        found = discover_month(open_storage(str(out)), "2024-03", market_tz)
        assert found.source == "scan" and found.rows_scanned == 3


def test_instants_past_what_nanoseconds_hold_fail_the_month_in_one_line(tmp_path: Path) -> None:
    """A ts stored in seconds or milliseconds can hold instants past 2262, which no nanosecond
    timestamp holds: the scan, and a job normalising the rows, fail the month permanently,
    saying so (before, with Arrow's or NumPy's own error)."""
    raw = tmp_path / "raw"
    (raw / "2024-03").mkdir(parents=True)
    far = [10**10, 10**10 + 60]  # seconds: the year 2286
    pq.write_table(pa.table({"ts": pa.array(far, pa.timestamp("s", tz="UTC")), "security": ["A", "B"],
                             "price": [1.0, 2.0], "size": [1, 2]}), raw / "2024-03" / "a.parquet")
    storage = open_storage(str(raw))
    with pytest.raises(PermanentError, match=r"2024-03/a\.parquet: column ts has instants outside the years 1677-2262"):
        discover_month(storage, "2024-03", "UTC")
    (file,) = month_files(storage, "2024-03")
    batch = next(read_batches(storage, file, ALL_COLUMNS))
    with pytest.raises(PermanentError, match="ts has instants outside the years 1677-2262"):
        normalise(batch, "UTC")


def test_sidecar_on_s3(tmp_path: Path, s3_server: S3Server) -> None:
    month, market_tz = "2024-04", "Australia/Sydney"
    raw = tmp_path / "raw"
    dirty_month(raw, month, market_tz, with_date=True, rows=5000)
    bucket = s3_server.new_bucket()
    output = f"s3://{bucket}/ingested"
    ingest(str(raw), output, [month], endpoint_url=s3_server.endpoint, row_group_rows=1000, max_file_rows=2000)
    storage = open_storage(output, s3_server.endpoint)
    keys = discover_month(storage, month, market_tz)
    assert keys.source == "keys" and keys.files == 3
    storage.delete(f"{month}/{KEYS_NAME}")
    assert_same(keys, discover_month(storage, month, market_tz))


def test_a_row_group_that_cannot_be_decoded_fails_the_scan_with_the_file_named(tmp_path: Path) -> None:
    """Discovery decodes on a thread of its own: a file that breaks mid-scan still fails the
    month permanently, naming the file, and no half-counted discovery comes back."""
    root = tmp_path / "raw"
    generate(str(root), ["2024-03"], securities=4, rows=40_000)
    part = next((root / "2024-03").glob("*.parquet"))
    table = pq.read_table(part)
    pq.write_table(table, part, row_group_size=4_000)
    meta = pq.ParquetFile(part).metadata
    middle = meta.row_group(meta.num_row_groups // 2).column(1)  # a security chunk mid-file
    body = bytearray(part.read_bytes())
    start = middle.data_page_offset
    body[start:start + middle.total_compressed_size] = b"\xff" * middle.total_compressed_size
    part.write_bytes(bytes(body))

    with pytest.raises(PermanentError, match=part.name):
        discover_month(open_storage(str(root)), "2024-03", "Australia/Sydney")


def test_rows_of_one_trade_date_count_as_any_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A month in time order is counted by security alone wherever its rows share one trade
    date: a row group whose ts statistics say so is read without its ts, a batch whose ts
    say so is not grouped by date. The same jobs, counts and unassigned rows as grouping
    every row by its date."""
    month, market_tz = "2024-04", "Australia/Sydney"
    raw = tmp_path / "raw"
    dirty_month(raw, month, market_tz, with_date=False, extra=("2024-04-06T16:00:00",))
    path = raw / month / "part-0000.parquet"
    table = pq.read_table(path)
    # In time order, null ts last: most row groups of 200 rows hold one trade date, and
    # most batches of 40 rows of the others.
    pq.write_table(table.sort_by([("ts", "ascending")]), path, row_group_size=200)
    monkeypatch.setattr(parquet_reader, "DEFAULT_BATCH_ROWS", 40)
    seen: list[tuple[int | None, bool, int | None]] = []
    count = discover._batch_counts

    def spied(key: KeyBatch, zone: str) -> pa.Table:
        by_ts = shared_trade_date(key.batch, zone) if key.day is None else None
        seen.append((key.day, "ts" in key.batch.schema.names, by_ts))
        return count(key, zone)

    monkeypatch.setattr(discover, "_batch_counts", spied)
    storage = open_storage(str(raw))
    by_security = discover_month(storage, month, market_tz)
    by_stats = [day for day, has_ts, _ in seen if day is not None and not has_ts]
    by_ts = [day for day, has_ts, day_of_ts in seen if day is None and has_ts and day_of_ts is not None]
    by_row = [day for day, _, day_of_ts in seen if day is None and day_of_ts is None]
    assert len(by_stats) > len(seen) / 2 and len(set(by_stats)) > 15
    assert by_ts and by_row and all(has_ts for day, has_ts, _ in seen if day is None)

    monkeypatch.setattr(parquet_reader, "_row_group_days", lambda meta, zone: [None] * meta.num_row_groups)
    monkeypatch.setattr(discover, "shared_trade_date", lambda batch, zone: None)
    grouped = discover_month(storage, month, market_tz)
    assert by_security == grouped
    assert by_security.rows_unassigned > 0 and INVALID[0] in by_security.invalid_securities
    assert sum(by_security.rows.values()) + by_security.rows_unassigned == by_security.rows_scanned


def test_a_month_whose_ts_are_integer_nanoseconds_is_counted_by_its_row_groups_dates_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Integer ts are nanoseconds since the epoch: their statistics give a row group's trade
    date as a timestamp column's do, so the group is read without its ts, and the month gives
    the jobs and counts it gives with timestamps."""
    month, market_tz = "2024-03", "Australia/Sydney"
    generate(str(tmp_path / "stamps"), [month], securities=5, rows=8_000)
    table = pq.read_table(tmp_path / "stamps" / month / "part-0000.parquet").sort_by("ts")
    pq.write_table(table, tmp_path / "stamps" / month / "part-0000.parquet", row_group_size=100)
    (tmp_path / "integers" / month).mkdir(parents=True)
    as_integers = table.set_column(table.schema.get_field_index("ts"), "ts", table.column("ts").cast(pa.int64()))
    pq.write_table(as_integers, tmp_path / "integers" / month / "part-0000.parquet", row_group_size=100)
    read_without_ts: list[bool] = []
    count = discover._batch_counts

    def spied(key: KeyBatch, zone: str) -> pa.Table:
        read_without_ts.append("ts" not in key.batch.schema.names)
        return count(key, zone)

    monkeypatch.setattr(discover, "_batch_counts", spied)
    by_integers = discover_month(open_storage(str(tmp_path / "integers")), month, market_tz)
    assert sum(read_without_ts) > len(read_without_ts) / 2
    assert by_integers == discover_month(open_storage(str(tmp_path / "stamps")), month, market_tz)
    assert sum(by_integers.rows.values()) == table.num_rows


@pytest.mark.parametrize("ways", [1, 2, 3, 5, 40])
def test_a_file_read_as_several_streams_yields_each_row_once(tmp_path: Path, ways: int) -> None:
    """Discovery reads a Parquet file as one stream per core, over runs of its row groups:
    together they hold every row of the file once, whatever the number of streams."""
    raw = tmp_path / "raw"
    generate(str(raw), ["2024-03"], securities=7, rows=9_000)
    path = raw / "2024-03" / "part-0000.parquet"
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=700)
    storage = open_storage(str(raw))
    (file,) = month_files(storage, "2024-03")

    streams = key_streams(storage, file, "Australia/Sydney", ways)
    assert len(streams) == min(ways, pq.ParquetFile(path).metadata.num_row_groups)
    securities = [key.batch.column("security").cast(pa.string()) for stream in streams for key in stream]
    read = pa.chunked_array(securities).value_counts().to_pylist()
    expected = table.column("security").value_counts().to_pylist()
    key = lambda item: item["values"]  # noqa: E731
    assert sorted(read, key=key) == sorted(expected, key=key)


@pytest.mark.parametrize("span_days", [1, 30, 5000])
def test_rows_of_many_dates_are_counted_as_grouping_them_counts(span_days: int) -> None:
    """A batch of rows of several trade dates (a month in no time order, or by security) is
    counted by one pass over a table of (security, date) cells when the dates span few days,
    else by grouping; both give every (security, date) pair its rows, nulls included."""
    rng = np.random.default_rng(span_days)
    n = 20_000
    values = pa.array([f"S{i}" for i in range(40)])
    codes = rng.integers(-1, len(values), n)  # -1: no security
    days = rng.integers(19_000, 19_000 + span_days, n)
    dates = pa.array(days.astype(np.int32), pa.date32(), mask=rng.random(n) < 0.05)  # some rows of no date
    security = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32(), mask=codes < 0), values)

    counted = discover._few_days_counts(discover.label_codes(security)[0], values, dates)
    assert (counted is None) == (span_days == 5000)  # 200,000 cells for 20,000 rows: grouped instead
    expected = pa.table({"security": security.cast(pa.string()), "trade_date": dates}).group_by(
        ["security", "trade_date"], use_threads=False).aggregate([([], "count_all")])
    key = lambda row: (row["security"] or "", row["trade_date"] or dt.date.min)  # noqa: E731
    as_rows = lambda table: sorted(  # noqa: E731
        ({"security": r["security"], "trade_date": r["trade_date"], "count": r.get("count", r.get("count_all"))}
         for r in table.to_pylist()), key=key)
    # No ts: each row's own trade date (or none) is its date.
    batch = pa.record_batch({"ts": pa.nulls(n, pa.timestamp("ns", tz="UTC")), "security": security,
                             "trade_date": dates})
    assert as_rows(discover._batch_counts(discover.KeyBatch(batch, None), "UTC")) == as_rows(expected)
    if counted is not None:
        assert as_rows(counted) == as_rows(expected)
