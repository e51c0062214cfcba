"""DBN input (`shared.dbn`): small DBN files built here, offline, decoded into tickq's columns."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import IO, Any, cast

import databento_dbn as dbn
import numpy as np
import pyarrow as pa
import pytest
import zstandard

from shared.dbn import DBN_SCHEMA, DbnError, DbnWriter, dbn_batches, encode_dbn, encode_metadata, encode_records

T0 = 1_704_186_000_000_000_000  # 2024-01-02T09:00:00Z
DAY = 86_400_000_000_000
UNDEF_PRICE = int(np.iinfo(np.int64).max)
UNDEF_TS = int(np.iinfo(np.uint64).max)
# databento_dbn's type stubs declare its enums' members as plain str: taken by value, they are
# typed as the members they are.
ADD, CLEAR, TRADE = dbn.Action("A"), dbn.Action("R"), dbn.Action("T")
ASK, BID, NO_SIDE = dbn.Side("A"), dbn.Side("B"), dbn.Side("N")
RAW_SYMBOL, INSTRUMENT_ID = dbn.SType("raw_symbol"), dbn.SType("instrument_id")
OHLCV_1M = dbn.Schema("ohlcv-1m")


# ---------------------------------------------------------------------------------------
# Writing DBN for tests: `shared.dbn`'s encoder (metadata by databento_dbn, records by numpy),
# or databento_dbn's record classes (independent of the decoder's layouts).
# ---------------------------------------------------------------------------------------


def dbn_metadata(
    schema: str | None,
    mappings: dict[str, list[tuple[dt.date, dt.date, str]]] | None = None,
    ts_out: bool = False,
) -> bytes:
    """Encoded DBN metadata (raw_symbol -> instrument_id intervals), by `shared.dbn`."""
    return encode_metadata(schema, mappings, start_ns=T0, end_ns=T0 + 40 * DAY, ts_out=ts_out)


def dbn_records(schema: str, columns: dict[str, Any], ts_out: bool = False) -> bytes:
    """Records of `schema` built by `shared.dbn.encode_records` (ts_recv 1 us after ts_event)."""
    fields = {"ts_recv": np.asarray(columns["ts_event"], dtype=np.uint64) + 1000, **columns}
    if ts_out:
        fields["ts_out"] = np.asarray(fields["ts_recv"], dtype=np.uint64) + 5
    return encode_records(schema, fields, ts_out)


def write_dbn_for_tests(
    path: Path,
    schema: str,
    columns: dict[str, Any],
    mappings: dict[str, list[tuple[dt.date, dt.date, str]]] | None = None,
    compressed: bool = False,
    ts_out: bool = False,
    frames: int = 1,
) -> Path:
    """A DBN (or, `compressed`, zstd DBN in `frames` frames) file of `schema` records."""
    data = dbn_metadata(schema, mappings, ts_out) + dbn_records(schema, columns, ts_out)
    if compressed:
        step = -(-len(data) // frames)
        compressor = zstandard.ZstdCompressor(level=3)
        data = b"".join(compressor.compress(data[i : i + step]) for i in range(0, len(data), step))
    path.write_bytes(data)
    return path


class OneWay(io.RawIOBase):
    """A non-seekable reader handing out at most 1000 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        chunk = self._data.read(min(len(b), 1000))
        b[: len(chunk)] = chunk
        return len(chunk)


def decode(source: bytes | Path, compressed: bool = False, batch_rows: int = 65_536) -> pa.Table:
    data = source.read_bytes() if isinstance(source, Path) else source
    batches = list(dbn_batches(io.BytesIO(data), compressed=compressed, batch_rows=batch_rows))
    for batch in batches:
        assert batch.schema == DBN_SCHEMA
        assert 0 < batch.num_rows <= batch_rows
    return values_of(pa.Table.from_batches(batches, schema=DBN_SCHEMA))


def values_of(table: pa.Table) -> pa.Table:
    """`table` with its coded (dictionary) columns as plain values: which codes a read gives
    depends on how it was batched, the values do not."""
    return pa.table({name: column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column
                     for name, column in zip(table.column_names, table.columns, strict=True)})


def random_trades(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "publisher_id": rng.choice([2, 2, 2, 39, 60000], n).astype(np.uint16),
        "instrument_id": rng.choice([15, 16, 17, 99], n).astype(np.uint32),
        "ts_event": (T0 + np.sort(rng.integers(0, 20 * DAY, n))).astype(np.uint64),
        "price": rng.integers(1, 500_000, n) * 10_000_000,
        "size": rng.integers(0, 5000, n).astype(np.uint32),
        "side": rng.choice(np.array([b"A", b"B", b"N"]), n),
        "action": np.full(n, b"T"),
    }


MAPPINGS = {
    "AAPL": [(dt.date(2024, 1, 1), dt.date(2024, 2, 1), "15")],
    "MSFT": [(dt.date(2024, 1, 1), dt.date(2024, 2, 1), "16")],
    "BRK.B": [(dt.date(2024, 1, 1), dt.date(2024, 2, 1), "17")],
}


def expected_table(cols: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    names = {15: "AAPL", 16: "MSFT", 17: "BRK.B"}
    venues = {2: "XNAS", 39: "XCHI"}
    sides = {b"A": "S", b"B": "B", b"N": None}
    price = cols["price"].astype(np.int64)
    ts = cols["ts_event"].astype(np.uint64)
    return {
        "ts": [
            None
            if t == UNDEF_TS
            else dt.datetime.fromtimestamp(int(t) // 10**9, dt.UTC).replace(microsecond=(int(t) % 10**9) // 1000)
            for t in ts
        ],
        "security": [names.get(int(i), str(int(i))) for i in cols["instrument_id"]],
        "price": [None if p == UNDEF_PRICE else int(p) / 1e9 for p in price],
        "size": [int(s) for s in cols["size"]],
        "side": [sides[bytes(s)] for s in cols["side"]],
        "participant": [None] * len(ts),
        "venue": [venues.get(int(p)) for p in cols["publisher_id"]],
    }


def assert_matches(table: pa.Table, cols: dict[str, np.ndarray]) -> None:
    want = expected_table(cols)
    got = table.to_pydict()
    for name in DBN_SCHEMA.names:
        if name == "ts":
            # Python datetimes stop at microseconds: compare the exact nanoseconds too.
            raw = table.column("ts").cast(pa.int64()).to_pylist()
            want_raw = [None if t == UNDEF_TS else int(t) for t in cols["ts_event"]]
            assert raw == want_raw
        else:
            assert got[name] == want[name], name


# ---------------------------------------------------------------------------------------


def test_mbo_records_from_databento_classes(tmp_path: Path) -> None:
    """Records encoded by databento_dbn itself decode to the expected tickq columns."""
    records = [
        dbn.MBOMsg(publisher_id=2, instrument_id=15, ts_event=T0 + 1, order_id=1,
                   price=123_450_000_000, size=100, action=ADD, side=ASK,
                   ts_recv=T0 + 7),
        dbn.MBOMsg(publisher_id=2, instrument_id=16, ts_event=T0 + 2, order_id=2,
                   price=1_000_000, size=5, action=ADD, side=BID,
                   ts_recv=T0 + 8),
        dbn.MBOMsg(publisher_id=39, instrument_id=99, ts_event=T0 + 3, order_id=3,
                   price=UNDEF_PRICE, size=0, action=CLEAR, side=NO_SIDE,
                   ts_recv=T0 + 9),
    ]  # fmt: skip
    data = dbn_metadata("mbo", MAPPINGS) + b"".join(bytes(r) for r in records)
    table = decode(data)
    assert table.column("ts").cast(pa.int64()).to_pylist() == [T0 + 1, T0 + 2, T0 + 3]
    assert table.column("security").to_pylist() == ["AAPL", "MSFT", "99"]
    assert table.column("price").to_pylist() == [123.45, 0.001, None]
    assert table.column("size").to_pylist() == [100, 5, 0]
    assert table.column("side").to_pylist() == ["S", "B", None]
    assert table.column("participant").null_count == 3
    assert table.column("venue").to_pylist() == ["XNAS", "XNAS", "XCHI"]
    assert table.schema.field("ts").type == pa.timestamp("ns", tz="UTC")


@pytest.mark.parametrize("schema", ["trades", "mbo", "mbp-1"])
def test_schemas_match_databento_decoder(tmp_path: Path, schema: str) -> None:
    """numpy-built files decode like databento_dbn's own (per-record) decoder says."""
    cols = random_trades(3000, seed=len(schema))
    path = write_dbn_for_tests(tmp_path / f"x.{schema}.dbn", schema, cols, MAPPINGS)
    table = decode(path, batch_rows=1000)
    assert_matches(table, cols)
    decoder = dbn.DBNDecoder()
    decoder.write(path.read_bytes())
    records = [r for r in decoder.decode() if isinstance(r, dbn.TradeMsg | dbn.MBOMsg | dbn.MBP1Msg)]
    assert [r.ts_event for r in records] == table.column("ts").cast(pa.int64()).to_pylist()
    assert [r.pretty_price for r in records] == table.column("price").to_pylist()
    assert [r.size for r in records] == table.column("size").to_pylist()
    side = {"A": "S", "B": "B", "N": None}
    codes = [r.side.value if isinstance(r.side, dbn.Side) else r.side for r in records]  # the stubs allow str
    assert [side[str(code)] for code in codes] == table.column("side").to_pylist()


@pytest.mark.parametrize("frames", [1, 3])
def test_zstd_streamed_and_batched(tmp_path: Path, frames: int) -> None:
    cols = random_trades(50_000)
    plain = write_dbn_for_tests(tmp_path / "m.dbn", "trades", cols, MAPPINGS)
    packed = write_dbn_for_tests(tmp_path / "m.dbn.zst", "trades", cols, MAPPINGS, compressed=True, frames=frames)
    assert packed.stat().st_size < plain.stat().st_size
    expected = decode(plain)
    assert_matches(expected, cols)
    assert decode(packed, compressed=True, batch_rows=7_000).equals(expected)
    # A non-seekable stream that returns short reads works too.
    batches = list(dbn_batches(cast(IO[bytes], OneWay(packed.read_bytes())), compressed=True, batch_rows=4096))
    assert max(b.num_rows for b in batches) == 4096
    assert values_of(pa.Table.from_batches(batches)).equals(expected)
    # zstd is recognised by its magic number whatever the caller says.
    assert decode(packed, compressed=False).equals(expected)


def test_undefined_values_and_ts_out(tmp_path: Path) -> None:
    cols = random_trades(10)
    cols["price"][3] = UNDEF_PRICE
    cols["ts_recv"] = cols["ts_event"] + 1000  # symbols map by ts_recv's date
    cols["ts_event"][4] = UNDEF_TS
    path = write_dbn_for_tests(tmp_path / "t.dbn", "trades", cols, MAPPINGS, ts_out=True)
    table = decode(path)
    assert_matches(table, cols)
    assert table.column("price")[3].as_py() is None
    assert table.column("ts")[4].as_py() is None


def test_dated_symbol_mappings(tmp_path: Path) -> None:
    """An instrument id re-used for another symbol maps by the record's date."""
    mappings = {
        "OLD": [(dt.date(2024, 1, 1), dt.date(2024, 1, 10), "7")],
        "NEW": [(dt.date(2024, 1, 10), dt.date(2024, 2, 1), "7")],
    }
    days = [0, 5, 7, 8, 9, 31]  # from 2024-01-02: day 8 is 2024-01-10, day 31 is in February
    cols = {
        "instrument_id": np.full(len(days), 7, np.uint32),
        "ts_event": np.array([T0 + d * DAY for d in days], np.uint64),
        "price": np.full(len(days), 10**9),
        "size": np.ones(len(days), np.uint32),
        "side": np.full(len(days), b"B"),
    }
    path = write_dbn_for_tests(tmp_path / "d.dbn", "trades", cols, mappings)
    assert decode(path).column("security").to_pylist() == ["OLD", "OLD", "OLD", "NEW", "NEW", "7"]


def test_instruments_of_one_interval_each_map_as_dated_intervals_do(tmp_path: Path) -> None:
    """Most files map each instrument to one symbol over one date range: those are looked up
    directly, with the same answers as the search through dated intervals (which a file with
    an instrument id too large to look up directly still makes)."""
    days = [0, 5, 7, 8, 31, 3, 4, 6]
    ids = [7, 7, 7, 7, 7, 9, 8, 2_000_000]
    cols = {
        "instrument_id": np.array(ids, np.uint32),
        "ts_event": np.array([T0 + d * DAY for d in days], np.uint64),
        "price": np.full(len(days), 10**9),
        "size": np.ones(len(days), np.uint32),
        "side": np.full(len(days), b"B"),
    }
    one_each = {
        "AAA": [(dt.date(2024, 1, 1), dt.date(2024, 1, 10), "7")],
        "BBB": [(dt.date(2024, 1, 1), dt.date(2024, 2, 1), "9")],
    }
    # Day 8 is 2024-01-10, past AAA's interval; 8 and 2,000,000 are mapped by neither.
    expected = ["AAA", "AAA", "AAA", "7", "7", "BBB", "8", "2000000"]
    direct = write_dbn_for_tests(tmp_path / "direct.dbn", "trades", cols, one_each)
    assert decode(direct).column("security").to_pylist() == expected
    searched = write_dbn_for_tests(tmp_path / "searched.dbn", "trades", cols,
                                   {**one_each, "BIG": [(dt.date(2024, 1, 1), dt.date(2024, 2, 1), "3000000")]})
    assert decode(searched).column("security").to_pylist() == expected


def test_live_stream_with_symbol_mapping_records_and_mixed_records() -> None:
    """Interleaved record types and in-stream symbol mappings (as live data has)."""

    def mapping(iid: int, symbol: str, ts: int) -> bytes:
        return bytes(
            dbn.SymbolMappingMsg(
                publisher_id=2, instrument_id=iid, ts_event=ts, stype_in=RAW_SYMBOL,
                stype_in_symbol=symbol, stype_out=INSTRUMENT_ID,
                stype_out_symbol=symbol, start_ts=ts, end_ts=ts + DAY,
            )
        )  # fmt: skip

    def trade(iid: int, ts: int, price: int) -> bytes:
        return bytes(
            dbn.TradeMsg(
                publisher_id=2, instrument_id=iid, ts_event=ts, price=price, size=10,
                action=TRADE, side=BID, depth=0, ts_recv=ts,
            )
        )  # fmt: skip

    def order(iid: int, ts: int, price: int) -> bytes:
        return bytes(
            dbn.MBOMsg(
                publisher_id=2, instrument_id=iid, ts_event=ts, order_id=1, price=price, size=3,
                action=ADD, side=ASK, ts_recv=ts,
            )
        )  # fmt: skip

    system = bytes(dbn.SystemMsg(ts_event=T0, msg="heartbeat"))
    body = [trade(5, T0, 10**9), mapping(5, "QQQ", T0 + 1), system]
    for i in range(6):
        make = trade if i % 2 else order
        body.append(make(5, T0 + 2 + i, (i + 1) * 10**9))
    table = decode(dbn_metadata(None) + b"".join(body), batch_rows=4)
    assert table.column("security").to_pylist() == ["5"] + ["QQQ"] * 6
    assert table.column("price").to_pylist() == [1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert table.column("size").to_pylist() == [10, 3, 10, 3, 10, 3, 10]
    assert table.column("side").to_pylist() == ["B", "S", "B", "S", "B", "S", "B"]


def test_errors(tmp_path: Path) -> None:
    cols = random_trades(20)
    good = write_dbn_for_tests(tmp_path / "g.dbn", "trades", cols, MAPPINGS).read_bytes()
    with pytest.raises(DbnError, match="truncated"):
        decode(good[:-5])
    with pytest.raises(DbnError, match="not a DBN"):
        decode(b"ts,security,price\n1,A,2\n")
    with pytest.raises(DbnError):
        decode(zstandard.ZstdCompressor().compress(good)[:-20], compressed=True)
    ohlcv = dbn.Metadata(
        dataset="XNAS.ITCH", start=T0, stype_in=RAW_SYMBOL,
        stype_out=INSTRUMENT_ID, schema=OHLCV_1M,
    )  # fmt: skip
    with pytest.raises(DbnError, match="ohlcv-1m"):
        decode(bytes(ohlcv.encode()))
    # An empty file (metadata only) is no rows, not an error.
    assert decode(dbn_metadata("trades", MAPPINGS)).num_rows == 0


def test_read_batches_reads_dbn_months(tmp_path: Path) -> None:
    """Through `shared.inputs.read_batches` (once it dispatches DBN to `shared.dbn`)."""
    from shared.errors import PermanentError
    from shared.inputs import ALL_COLUMNS, month_files, read_batches
    from shared.storage import open_storage

    cols = random_trades(5000)
    write_dbn_for_tests(tmp_path / "2024-01.dbn.zst", "trades", cols, MAPPINGS, compressed=True)
    storage = open_storage(str(tmp_path))
    (file,) = month_files(storage, "2024-01")
    try:
        batches = list(read_batches(storage, file, ALL_COLUMNS, security="MSFT", batch_rows=1000))
    except PermanentError as exc:
        if "not supported" in str(exc):
            pytest.skip("shared.inputs does not dispatch DBN to shared.dbn yet")
        raise
    table = pa.Table.from_batches(batches)
    assert set(table.column("security").to_pylist()) == {"MSFT"}
    assert table.num_rows == int((cols["instrument_id"] == 16).sum())


@pytest.mark.parametrize("schema", ["trades", "mbo"])
@pytest.mark.parametrize("compressed", [False, True])
def test_writer_round_trip(schema: str, compressed: bool) -> None:
    """`DbnWriter` (chunk by chunk) and `encode_dbn` write tickq rows the reader gives back."""
    rng = np.random.default_rng(3)
    n = 5000
    symbols = ["BHP", "CBA", "BRK.B"]
    cols = {
        "ts": T0 + np.sort(rng.integers(0, 3 * DAY, n)),
        "security": rng.integers(0, 3, n),
        "price": np.round(rng.uniform(0.001, 500.0, n), 3),
        "size": rng.integers(1, 10**9, n),
        "side": rng.integers(0, 3, n),
    }
    cols["price"][7] = np.nan
    start, end = dt.date(2024, 1, 2), dt.date(2024, 1, 6)
    out = io.BytesIO()
    writer = DbnWriter(out, symbols, start, end, schema=schema, compressed=compressed)
    for lo in range(0, n, 1700):
        writer.write({k: v[lo : lo + 1700] for k, v in cols.items()})
    writer.close()
    data = out.getvalue()
    assert data == encode_dbn(cols, symbols, start, end, schema=schema, compressed=compressed)
    table = decode(data, compressed=compressed, batch_rows=1000)
    assert table.column("ts").cast(pa.int64()).to_pylist() == cols["ts"].tolist()
    assert table.column("security").to_pylist() == [symbols[i] for i in cols["security"]]
    got = np.array(table.column("price").to_pylist(), dtype=np.float64)
    assert np.isnan(got[7]) and table.column("price").null_count == 1
    ok = np.isfinite(cols["price"])
    np.testing.assert_allclose(got[ok], cols["price"][ok], rtol=1e-9, atol=0)
    assert table.column("size").to_pylist() == cols["size"].tolist()
    assert table.column("side").to_pylist() == [["B", "S", None][i] for i in cols["side"]]
    assert set(table.column("venue").to_pylist()) == {"XNAS"}
    assert table.column("participant").null_count == n
    # Records outside the mapped dates fall back to the instrument id.
    late = encode_dbn({k: v[-1:] for k, v in cols.items()}, symbols, start, start + dt.timedelta(days=1))
    assert decode(late).column("security").to_pylist() == [str(int(cols["security"][-1]) + 1)]
