"""Databento Binary Encoding (DBN) input: ``.dbn`` and zstd-compressed ``.dbn.zst`` files.

`dbn_batches` streams a DBN file into record batches of tickq's input columns. The metadata
header is parsed by ``databento_dbn`` (so every DBN version it knows is accepted); the records
themselves are never turned into Python objects: the raw record bytes are viewed through numpy
structured dtypes (field offsets taken from ``databento_dbn``'s own record layouts), a run of
same-type records at a time. Memory stays bounded: the input is read (and decompressed) in
chunks of about `batch_rows` records.

Records and columns
-------------------
Every MBO, trades (MBP-0), MBP-1 / TBBO, MBP-10, CMBP-1 and TCBBO record becomes one row,
whatever its ``action`` (add, cancel, modify, trade, fill, ...): the file is taken as it is,
like any other input, and rows that the contract rejects are rejected by the worker. Other
record types (symbol mappings, system and error messages, statistics, definitions, ...) are
not rows; a file whose metadata declares a schema without order or trade records (OHLCV, definition,
statistics, ...) raises `DbnError`.

- ``ts``: ``ts_event`` as ``timestamp[ns, tz=UTC]`` (null where undefined);
- ``security``: the symbol the file's symbology maps the record's ``instrument_id`` to on the
  record's UTC date (``ts_recv``, else ``ts_event``): the metadata's symbol mappings, and
  symbol-mapping records met in the stream (live data); the ``instrument_id`` as text when
  there is no mapping;
- ``price``: the fixed-point price (int64 in units of 1e-9) as float64, null where undefined
  (``UNDEF_PRICE``), so such rows are rejected;
- ``size``: int64 (0 stays 0 and is rejected);
- ``side``: ``B`` for bid (buy), ``S`` for ask (sell), null for ``N`` (none);
- ``participant``: always null: DBN carries no participant (broker) field;
- ``venue``: the venue (MIC, e.g. ``XNAS``) of the record's ``publisher_id`` as
  ``databento_dbn``'s publisher table names it (the dataset.venue pair ``XNAS.ITCH.XNAS`` gives
  ``XNAS``); null for publisher ids that table does not know.

Files that hold one record type throughout (every historical file) decode at numpy speed. A
stream that interleaves record types of different sizes record by record still decodes
correctly, only slower.

Writing
-------
`DbnWriter` (and `encode_dbn`, its in-memory form) writes tickq rows as a DBN file (``tickq gen``):
metadata whose symbol mappings map instrument id ``i + 1`` to ``symbols[i]`` over a date range,
then trades (or MBO) records built as numpy structured arrays, chunk by chunk, optionally zstd
compressed. `encode_metadata` and `encode_records` are the lower-level pieces.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import IO, Any, cast

import databento_dbn as dbn
import numpy as np
import pyarrow as pa
import zstandard

__all__ = [
    "DBN_COLUMNS",
    "DBN_SCHEMA",
    "DEFAULT_PUBLISHER_ID",
    "DbnError",
    "DbnWriter",
    "dbn_batches",
    "encode_dbn",
    "encode_metadata",
    "encode_records",
    "instrument_mappings",
]

TS_UTC = pa.timestamp("ns", tz="UTC")
DBN_SCHEMA = pa.schema(
    [
        ("ts", TS_UTC),
        # Coded as the file codes it (a symbol per instrument): readers group and match the
        # few distinct values, not every row's text.
        ("security", pa.dictionary(pa.int32(), pa.string())),
        ("price", pa.float64()),
        ("size", pa.int64()),
        ("side", pa.dictionary(pa.int32(), pa.string())),
        ("participant", pa.string()),
        ("venue", pa.dictionary(pa.int32(), pa.string())),
    ]
)
DBN_COLUMNS = tuple(DBN_SCHEMA.names)

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SIDE_VALUES = pa.array(["B", "S"], pa.string())
# Instrument ids below this are looked up in an array of one entry per id (8 MB at most).
_DIRECT_IDS = 1 << 20
_PREFIX_BYTES = 8  # b"DBN", version (u8), metadata length (u32 little-endian)
_HEADER_BYTES = 16  # every record starts with length/4 (u8), rtype (u8), publisher, instrument, ts
_MAX_METADATA_BYTES = 1 << 30
_PRICE_SCALE = 1e9  # DBN fixed-point prices are int64 in units of 1e-9
_UNDEF_PRICE = np.int64(np.iinfo(np.int64).max)
_UNDEF_TS = np.uint64(np.iinfo(np.uint64).max)
_NS_PER_DAY = 86_400_000_000_000
_SYMBOL_MAPPING_RTYPE = 0x16
_SIDE_BID, _SIDE_ASK = ord("B"), ord("A")

# The record types that are orders or trades, by rtype, and their databento_dbn classes.
_ROW_RECORDS: dict[int, Any] = {
    0x00: dbn.TradeMsg,  # trades (MBP-0)
    0x01: dbn.MBP1Msg,  # MBP-1 and TBBO
    0x0A: dbn.MBP10Msg,  # MBP-10
    0xA0: dbn.MBOMsg,  # MBO
    0xB1: dbn.CMBP1Msg,  # CMBP-1
    0xC2: dbn.CBBOMsg,  # TCBBO (trades with the consolidated BBO)
}
_ROW_SCHEMAS = {"mbo", "trades", "mbp-1", "tbbo", "mbp-10", "cmbp-1", "tcbbo"}
_FIELDS = ("publisher_id", "instrument_id", "ts_event", "price", "size", "side", "ts_recv")
_FIELD_FORMATS = ("<u2", "<u4", "<u8", "<i8", "<u4", "u1", "<u8")
_PUBLISHER_RE = re.compile(r"publisher_id=[A-Z0-9]+\.[A-Z0-9]+\.([A-Z0-9]+) \(\d+\)")


class DbnError(ValueError):
    """The bytes are not a DBN stream tickq can read (bad header, truncated, wrong schema)."""


@functools.cache
def _record_dtype(rtype: int, length: int) -> np.dtype:
    """The fields tickq uses of a record of `rtype` that is `length` bytes long (ts_out too)."""
    layout = np.dtype(_ROW_RECORDS[rtype]._dtypes).fields
    assert layout is not None
    offsets = [layout[name][1] for name in _FIELDS]
    return np.dtype(
        {
            "names": list(_FIELDS),
            "formats": list(_FIELD_FORMATS),
            "offsets": offsets,
            "itemsize": length,
        }
    )


@functools.cache
def venue_of(publisher_id: int) -> str | None:
    """The venue (MIC) of a Databento publisher id, per databento_dbn's table; None if unknown."""
    # The stubs type the enum members as str; the binding wants the enum members.
    action: Any = dbn.Action.TRADE
    side: Any = dbn.Side.NONE
    try:
        record = dbn.TradeMsg(
            publisher_id=publisher_id,
            instrument_id=0,
            ts_event=0,
            price=0,
            size=0,
            action=action,
            side=side,
            depth=0,
            ts_recv=0,
        )
    except (ValueError, OverflowError, TypeError):
        return None
    match = _PUBLISHER_RE.search(repr(record))
    return match.group(1) if match else None


def _name(value: Any) -> str:
    """An SType / Schema (or its text, or None) as its text value."""
    if value is None:
        return ""
    return str(getattr(value, "value", value))


@dataclass
class _Symbology:
    """instrument_id -> symbol: the metadata's dated intervals, then live symbol-mapping records."""

    names: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    # Metadata intervals, sorted by key = instrument_id << 32 | start day.
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    starts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ends: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    symbol_of_interval: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    # Where every instrument has one interval and the ids are small (nearly every file): each
    # id's interval, -1 for none, looked up per row instead of searched for.
    interval_of_id: np.ndarray | None = None
    live: dict[int, int] = field(default_factory=dict)
    live_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))
    live_symbols: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    _values: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # `names`, as Arrow

    def _symbol(self, name: str) -> int:
        if name not in self.index:
            self.index[name] = len(self.names)
            self.names.append(name)
        return self.index[name]

    @classmethod
    def from_metadata(cls, meta: Any) -> _Symbology:
        out = cls()
        stype_in, stype_out = _name(meta.stype_in), _name(meta.stype_out)
        rows: list[tuple[int, int, int, int]] = []
        for key, intervals in (meta.mappings or {}).items():
            for interval in intervals:
                symbol = str(interval["symbol"])
                if stype_out == "instrument_id" and symbol.isdigit():
                    iid, name = int(symbol), str(key)
                elif stype_in == "instrument_id" and str(key).isdigit() and symbol:
                    iid, name = int(key), symbol
                else:
                    continue
                if not 0 <= iid < 1 << 32:
                    continue
                start = interval["start_date"].toordinal() - 719_163  # days since 1970-01-01
                end = interval["end_date"].toordinal() - 719_163
                rows.append((iid, start, end, out._symbol(name)))
        if rows:
            rows.sort()
            table = np.array(rows, dtype=np.int64)
            out.keys = (table[:, 0].astype(np.uint64) << np.uint64(32)) | table[:, 1].astype(
                np.uint64
            )
            out.starts = table[:, 1]
            out.ends = table[:, 2]
            out.symbol_of_interval = table[:, 3]
            ids = table[:, 0]
            if ids[-1] < _DIRECT_IDS and np.all(ids[1:] != ids[:-1]):  # sorted: repeats are neighbours
                out.interval_of_id = np.full(ids[-1] + 1, -1, dtype=np.int64)
                out.interval_of_id[ids] = np.arange(ids.size)
        return out

    def add_live(self, instrument_id: int, symbol: str) -> None:
        """A symbol-mapping record: `instrument_id` is `symbol` from now on."""
        if not symbol:
            return
        self.live[instrument_id] = self._symbol(symbol)
        ids = sorted(self.live)
        self.live_ids = np.array(ids, dtype=np.uint32)
        self.live_symbols = np.array([self.live[i] for i in ids], dtype=np.int64)

    def resolve(self, instrument_id: np.ndarray, day: np.ndarray) -> pa.DictionaryArray:
        """The security of each row: its mapped symbol, else its instrument_id as text; coded,
        one dictionary value per distinct security."""
        n = instrument_id.size
        found = np.full(n, -1, dtype=np.int64)
        if self.interval_of_id is not None:
            lookup = self.interval_of_id
            at = lookup[np.minimum(instrument_id, lookup.size - 1)]
            at[instrument_id >= lookup.size] = -1
            safe = np.maximum(at, 0)
            hit = (at >= 0) & (day >= self.starts[safe]) & (day < self.ends[safe])
            found = np.where(hit, self.symbol_of_interval[safe], found)
        elif self.keys.size:
            key = (instrument_id.astype(np.uint64) << np.uint64(32)) | np.clip(
                day, 0, (1 << 32) - 1
            ).astype(np.uint64)
            at = np.searchsorted(self.keys, key, side="right") - 1
            safe = np.maximum(at, 0)
            hit = (
                (at >= 0)
                & ((self.keys[safe] >> np.uint64(32)) == instrument_id.astype(np.uint64))
                & (day < self.ends[safe])
            )
            found = np.where(hit, self.symbol_of_interval[safe], found)
        if self.live_ids.size:
            at = np.searchsorted(self.live_ids, instrument_id)
            safe = np.minimum(at, self.live_ids.size - 1)
            hit = self.live_ids[safe] == instrument_id
            found = np.where(hit, self.live_symbols[safe], found)
        missing = found < 0
        if missing.any():
            # Unmapped instruments are named by their id: coded as symbols are, once each.
            unknown, which = np.unique(instrument_id[missing], return_inverse=True)
            found[missing] = np.array([self._symbol(str(i)) for i in unknown.tolist()], dtype=np.int64)[which]
        if len(self._values) != len(self.names):
            self._values = pa.array(self.names, pa.string())
        return pa.DictionaryArray.from_arrays(pa.array(found, pa.int32()), self._values)


class _Prefixed:
    """A reader that returns `head` first, then the rest of `stream`."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self._head = head
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(size)
        if 0 <= size < len(self._head):
            head, self._head = self._head[:size], self._head[size:]
            return head
        head, self._head = self._head, b""
        return head + self._stream.read(-1) if size < 0 else head


def _read_full(reader: Any, size: int) -> bytes:
    """Up to `size` bytes; fewer only at the end of the stream."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = reader.read(size - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _open(stream: IO[bytes], compressed: bool) -> Any:
    """A reader of the decompressed DBN bytes (zstd is recognised by its magic number too)."""
    head = _read_full(stream, 4)
    source = _Prefixed(head, stream)
    if head == _ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], source), read_size=1 << 20, read_across_frames=True, closefd=False
        )
    if compressed and head[:3] != b"DBN":
        raise DbnError("not a zstd-compressed DBN stream (no zstd frame header)")
    return source


def _read_metadata(reader: Any) -> tuple[Any, bytes]:
    prefix = _read_full(reader, _PREFIX_BYTES)
    if len(prefix) < _PREFIX_BYTES or prefix[:3] != b"DBN":
        if prefix[:4] and 0x50 <= prefix[0] <= 0x5F and prefix[1:4] == b"\x2a\x4d\x18":
            raise DbnError("legacy DBZ file: convert it to DBN with the dbn CLI first")
        raise DbnError("not a DBN stream (no DBN header)")
    length = int.from_bytes(prefix[4:8], "little")
    if length > _MAX_METADATA_BYTES:
        raise DbnError(f"DBN metadata length {length} is implausible")
    body = _read_full(reader, length)
    if len(body) < length:
        raise DbnError("truncated DBN metadata")
    try:
        meta = dbn.Metadata.decode(prefix + body)
    except Exception as exc:  # DBNError and whatever the binding raises on garbage
        raise DbnError(f"bad DBN metadata: {exc}") from None
    schema = _name(meta.schema)
    if schema and schema not in _ROW_SCHEMAS:
        raise DbnError(
            f"DBN schema {schema} holds no orders or trades "
            f"(tickq reads {', '.join(sorted(_ROW_SCHEMAS))})"
        )
    return meta, prefix


def _run_length(u8: np.ndarray, start: int, length: int, end: int) -> int:
    """How many records from `start` on share the record length and rtype of the first."""
    total = (end - start) // length
    size_code, rtype = u8[start], u8[start + 1]
    done, window = 1, 256
    while done < total:
        upto = min(total, done + window)
        at = start + length * np.arange(done, upto, dtype=np.int64)
        same = (u8[at] == size_code) & (u8[at + 1] == rtype)
        if not same.all():
            return done + int(np.argmin(same))
        done, window = upto, window * 2
    return total


class _Batcher:
    """Collects decoded record columns and cuts them into record batches of `batch_rows`."""

    def __init__(self, symbology: _Symbology, batch_rows: int) -> None:
        self.symbology = symbology
        self.batch_rows = batch_rows
        self.parts: list[np.ndarray] = []
        self.rows = 0

    def add(self, records: np.ndarray) -> None:
        self.parts.append(records)
        self.rows += records.size

    def take(self, final: bool) -> Iterator[pa.RecordBatch]:
        """Full batches (and, when `final`, the rest); keeps the remainder."""
        if not self.parts or (not final and self.rows < self.batch_rows):
            return
        columns = {
            name: np.concatenate([np.ascontiguousarray(p[name]) for p in self.parts])
            for name in _FIELDS
        }
        usable = self.rows if final else self.rows - self.rows % self.batch_rows
        for lo in range(0, usable, self.batch_rows):
            hi = min(usable, lo + self.batch_rows)
            yield self._batch({k: v[lo:hi] for k, v in columns.items()})
        rest = {k: v[usable:] for k, v in columns.items()}
        self.rows -= usable
        self.parts = []
        if self.rows:
            keep = np.empty(self.rows, dtype=[(k, rest[k].dtype) for k in _FIELDS])
            for k in _FIELDS:
                keep[k] = rest[k]
            self.parts = [keep]

    def _batch(self, col: dict[str, np.ndarray]) -> pa.RecordBatch:
        n = col["ts_event"].size
        ts_raw = col["ts_event"]
        ts = pa.array(ts_raw.view(np.int64), mask=ts_raw == _UNDEF_TS).view(TS_UTC)
        raw_price = col["price"]
        price = pa.array(raw_price / _PRICE_SCALE, mask=raw_price == _UNDEF_PRICE)
        size = pa.array(col["size"].astype(np.int64))
        is_bid, is_ask = col["side"] == _SIDE_BID, col["side"] == _SIDE_ASK
        side = pa.DictionaryArray.from_arrays(pa.array(is_ask.astype(np.int32), mask=~(is_bid | is_ask)), _SIDE_VALUES)
        recv = col["ts_recv"]
        index_ts = np.where(recv == _UNDEF_TS, ts_raw, recv)
        day = (index_ts // np.uint64(_NS_PER_DAY)).astype(np.int64)
        security = self.symbology.resolve(col["instrument_id"], day)
        venue = _venues(col["publisher_id"])
        participant = pa.nulls(n, pa.string())
        return pa.RecordBatch.from_arrays(
            [ts, security, price, size, side, participant, venue], schema=DBN_SCHEMA
        )


def _venues(publisher_id: np.ndarray) -> pa.DictionaryArray:
    """Each row's venue, coded: the batch's few publishers (16-bit ids, found without a sort)
    named once each; a publisher of no known venue gives null."""
    ids = publisher_id.astype(np.int64)
    publishers = np.flatnonzero(np.bincount(ids))
    names = [venue_of(int(p)) for p in publishers]
    known = [i for i, name in enumerate(names) if name is not None]
    code_of_publisher = np.full(publishers[-1] + 1 if publishers.size else 1, -1, dtype=np.int32)
    code_of_publisher[publishers[known]] = np.arange(len(known), dtype=np.int32)
    codes = code_of_publisher[ids]
    values = pa.array([names[i] for i in known], pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), values)


def _symbol_mappings(data: bytes, meta: Any) -> list[tuple[int, str]]:
    """(instrument_id, symbol) of a run of symbol-mapping records (rare: live data)."""
    decoder = dbn.DBNDecoder(
        has_metadata=False, ts_out=bool(meta.ts_out), input_version=meta.version
    )
    try:
        decoder.write(data)
        records = decoder.decode()
    except Exception as exc:
        raise DbnError(f"bad DBN symbol-mapping record: {exc}") from None
    out: list[tuple[int, str]] = []
    for record in cast(list[Any], records):
        symbol = getattr(record, "stype_out_symbol", "") or getattr(record, "stype_in_symbol", "")
        out.append((int(record.instrument_id), str(symbol)))
    return out


def dbn_batches(
    stream: IO[bytes], compressed: bool = False, batch_rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Record batches (`DBN_SCHEMA`, at most `batch_rows` rows) of a DBN stream.

    `stream` is a binary reader, seekable or not, of a ``.dbn`` file, or of a ``.dbn.zst``
    file when `compressed` (a zstd stream is also recognised by its magic number). Raises
    `DbnError` for bytes that are not DBN, truncated records and schemas without orders or
    trades. The stream is not closed.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    try:
        reader = _open(stream, compressed)
        meta, _ = _read_metadata(reader)
        batcher = _Batcher(_Symbology.from_metadata(meta), batch_rows)
        chunk_bytes = max(1 << 16, min(batch_rows, 1 << 20) * 64)
        buffer = b""
        while True:
            data = _read_full(reader, chunk_bytes)
            buffer = buffer + data if buffer else data
            used = yield from _decode(buffer, meta, batcher)
            buffer = buffer[used:]
            yield from batcher.take(final=False)
            if len(data) < chunk_bytes:
                break
        if buffer:
            raise DbnError(f"truncated DBN stream ({len(buffer)} bytes of a partial record)")
        yield from batcher.take(final=True)
    except zstandard.ZstdError as exc:
        raise DbnError(f"bad zstd data: {exc}") from None


def _decode(buffer: bytes, meta: Any, batcher: _Batcher) -> Generator[pa.RecordBatch, None, int]:
    """Hands the complete records of `buffer` to `batcher`; returns the bytes consumed."""
    u8 = np.frombuffer(buffer, dtype=np.uint8)
    end = len(buffer)
    at = 0
    while end - at >= 2:
        length = int(u8[at]) * 4
        if length < _HEADER_BYTES:
            raise DbnError(f"corrupt DBN record length {length} at record byte {at}")
        if at + length > end:
            break
        rtype = int(u8[at + 1])
        count = _run_length(u8, at, length, end)
        if rtype in _ROW_RECORDS:
            batcher.add(np.frombuffer(buffer, _record_dtype(rtype, length), count, at))
        elif rtype == _SYMBOL_MAPPING_RTYPE:
            # Rows already decoded keep the mapping they were read under.
            yield from batcher.take(final=True)
            for instrument_id, symbol in _symbol_mappings(buffer[at : at + count * length], meta):
                batcher.symbology.add_live(instrument_id, symbol)
        at += count * length
    return at


# ---------------------------------------------------------------------------------------
# Writing DBN: metadata by databento_dbn's encoder, records as numpy structured arrays.
# ---------------------------------------------------------------------------------------

DEFAULT_DATASET = "XNAS.ITCH"
DEFAULT_PUBLISHER_ID = 2  # XNAS.ITCH.XNAS: the reader's venue is ``XNAS``
_WRITE_SCHEMAS: dict[str, tuple[Any, int, Any]] = {
    # schema: (dbn.Schema, rtype, record class)
    "trades": (dbn.Schema.TRADES, 0x00, dbn.TradeMsg),
    "mbo": (dbn.Schema.MBO, 0xA0, dbn.MBOMsg),
    "mbp-1": (dbn.Schema.MBP_1, 0x01, dbn.MBP1Msg),
}
_DEFAULT_ACTION = {"trades": b"T", "mbo": b"A", "mbp-1": b"T"}
_SIDE_CODES = np.array([b"B", b"A", b"N"])  # tickq side code 0 (buy), 1 (sell), 2 (none)
Mappings = Mapping[str, Sequence[tuple[dt.date, dt.date, str]]]


def _write_schema(schema: str) -> tuple[Any, int, Any]:
    if schema not in _WRITE_SCHEMAS:
        raise ValueError(f"cannot write DBN schema {schema!r}; use one of {', '.join(_WRITE_SCHEMAS)}")
    return _WRITE_SCHEMAS[schema]


def _day_ns(day: dt.date) -> int:
    return (day.toordinal() - dt.date(1970, 1, 1).toordinal()) * _NS_PER_DAY


def encode_metadata(
    schema: str | None,
    mappings: Mappings | None = None,
    start_ns: int = 0,
    end_ns: int | None = None,
    ts_out: bool = False,
    dataset: str = DEFAULT_DATASET,
) -> bytes:
    """Encoded DBN metadata; `mappings` maps raw symbol -> [(start date, end date (exclusive),
    instrument id as text)] (stype_in raw_symbol, stype_out instrument_id)."""
    symbol_mappings = [
        SimpleNamespace(
            raw_symbol=raw,
            intervals=[SimpleNamespace(start_date=a, end_date=b, symbol=s) for a, b, s in spans],
        )
        for raw, spans in (mappings or {}).items()
    ]
    # The stubs type the enum members as str; the binding wants the enum members.
    stype_in: Any = dbn.SType.RAW_SYMBOL
    stype_out: Any = dbn.SType.INSTRUMENT_ID
    meta = dbn.Metadata(
        dataset=dataset,
        start=start_ns,
        stype_in=stype_in,
        stype_out=stype_out,
        schema=_write_schema(schema)[0] if schema else None,
        symbols=sorted(mappings or {}),
        mappings=symbol_mappings,
        end=end_ns,
        ts_out=ts_out,
    )
    return bytes(meta.encode())


def encode_records(schema: str, columns: Mapping[str, Any], ts_out: bool = False) -> bytes:
    """Records of `schema` from record-field arrays (databento_dbn names: ``ts_event``,
    ``instrument_id``, ``price`` (int64 1e-9 units), ``side`` (ASCII), ...), vectorised.

    Fields not given are 0, except ``ts_recv`` (= ``ts_event``), ``action`` (``T`` for trades
    and MBP-1, ``A`` for MBO), ``side`` (``N``) and ``ts_out`` (= ``ts_recv``).
    """
    _, rtype, record_class = _write_schema(schema)
    layout = list(record_class._dtypes)
    if ts_out:
        layout.append(("ts_out", "u8"))
    n = len(columns["ts_event"])
    records = np.zeros(n, dtype=np.dtype(layout))
    records["length"] = records.dtype.itemsize // 4
    records["rtype"] = rtype
    records["action"] = _DEFAULT_ACTION[schema]
    records["side"] = b"N"
    for name, values in columns.items():
        records[name] = values
    if "ts_recv" not in columns:
        records["ts_recv"] = records["ts_event"]
    if ts_out and "ts_out" not in columns:
        records["ts_out"] = records["ts_recv"]
    return records.tobytes()


def instrument_mappings(
    symbols: Sequence[str], start: dt.date, end: dt.date
) -> dict[str, list[tuple[dt.date, dt.date, str]]]:
    """Symbol mappings: ``symbols[i]`` is instrument id ``i + 1`` from `start` to `end` (exclusive)."""
    return {symbol: [(start, end, str(i + 1))] for i, symbol in enumerate(symbols)}


class DbnWriter:
    """Writes tickq rows to `sink` as a DBN stream (zstd DBN when `compressed`), chunk by chunk.

    The metadata maps instrument id ``i + 1`` to ``symbols[i]`` on the UTC dates `start` to
    `end` (exclusive): the reader names a record's security by its ``ts_recv`` (= ``ts``) date,
    so the range must cover every row's UTC date. `close` finishes the stream (not `sink`).
    """

    def __init__(
        self,
        sink: IO[bytes],
        symbols: Sequence[str],
        start: dt.date,
        end: dt.date,
        schema: str = "trades",
        compressed: bool = False,
        publisher_id: int = DEFAULT_PUBLISHER_ID,
        level: int = 3,
    ) -> None:
        _write_schema(schema)
        if end <= start:
            raise ValueError("end must be after start")
        self.schema = schema
        self.publisher_id = publisher_id
        self._zstd: Any = None
        self._sink: Any = sink
        if compressed:
            self._zstd = zstandard.ZstdCompressor(level=level).stream_writer(sink, closefd=False)
            self._sink = self._zstd
        self._order_id = 0
        mappings = instrument_mappings(symbols, start, end)
        self._sink.write(encode_metadata(schema, mappings, _day_ns(start), _day_ns(end)))

    def write(self, columns: Mapping[str, np.ndarray]) -> None:
        """Rows from tickq columns: ``ts`` (int64 UTC ns), ``security`` (int index into
        `symbols`), ``price`` (float; non-finite is written as undefined), ``size`` (int,
        0..2**32-1) and ``side`` (int: 0 buy (bid), 1 sell (ask), anything else none)."""
        if self._sink is None:
            raise ValueError("DbnWriter is closed")
        ts = np.asarray(columns["ts"], dtype=np.int64)
        n = ts.size
        price = np.asarray(columns["price"], dtype=np.float64)
        finite = np.isfinite(price)
        fixed = np.where(finite, np.rint(np.where(finite, price, 0.0) * _PRICE_SCALE), 0.0)
        side = np.asarray(columns["side"])
        fields: dict[str, Any] = {
            "publisher_id": self.publisher_id,
            "instrument_id": np.asarray(columns["security"], dtype=np.int64) + 1,
            "ts_event": ts.view(np.uint64),
            "price": np.where(finite, fixed.astype(np.int64), _UNDEF_PRICE),
            "size": np.asarray(columns["size"], dtype=np.int64),
            "side": _SIDE_CODES[np.where(side == 0, 0, np.where(side == 1, 1, 2))],
        }
        if self.schema == "mbo":
            fields["order_id"] = np.arange(self._order_id + 1, self._order_id + n + 1, dtype=np.uint64)
            self._order_id += n
        self._sink.write(encode_records(self.schema, fields))

    def close(self) -> None:
        """Finish the stream (idempotent); `sink` stays open."""
        if self._zstd is not None:
            self._zstd.close()
        self._zstd = self._sink = None


def encode_dbn(
    columns: Mapping[str, np.ndarray],
    symbols: Sequence[str],
    start: dt.date,
    end: dt.date,
    schema: str = "trades",
    compressed: bool = False,
    publisher_id: int = DEFAULT_PUBLISHER_ID,
) -> bytes:
    """A whole DBN file in memory (see `DbnWriter` for the columns and the mappings)."""
    out = io.BytesIO()
    writer = DbnWriter(out, symbols, start, end, schema, compressed, publisher_id)
    writer.write(columns)
    writer.close()
    return out.getvalue()
