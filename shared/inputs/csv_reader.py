"""CSV input (plain or gzip): Arrow's reader converts the columns where their text allows, else
they are read as text for `normalise`; a large file is cut into slices of whole lines that
reads can take or skip on their own."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from shared.errors import PermanentError
from shared.inputs.files import (
    LABEL,
    LABEL_COLUMNS,
    REQUIRED_COLUMNS,
    TS_UTC,
    FileSlice,
    InputFile,
    Span,
    missing_columns,
    unreadable,
)
from shared.inputs.normalisation import filter_securities
from shared.inputs.streams import Borrowed, ByteCounter, counted_stream
from shared.storage import Storage

# Arrow's streaming CSV reader reads up to 32 blocks ahead of the batch handed out: 1 MB blocks
# bound that to about 32 MB per file being read. Its batches are joined again into batches of
# `batch_rows` (`_Coalescer`), the size the rest of a pass is quick with.
CSV_BLOCK_BYTES = 1 << 20
# An uncompressed CSV file of at least two of these is cut into slices of whole lines about
# this long (`csv_slices`): discovery reads them side by side, and records what each holds,
# so that a worker's pass over some dates reads only their slices (as Parquet row groups).
CSV_SLICE_BYTES = 16 << 20
# How far past a cut discovery looks for the end of a line before it gives up on that cut.
CSV_LINE_SEARCH_BYTES = 1 << 20


# Columns that Arrow's CSV reader can convert itself when their text is clean, in the order
# tried. Arrow's CSV converters take a subset of the text `normalise` takes, with the same
# values (tests/test_inputs_csv.py checks this), and fail the whole block on anything else;
# the read then goes on as text, so a bad value still rejects only its own row.
_CSV_TYPES: dict[str, tuple[pa.DataType, ...]] = {
    "ts": (TS_UTC, pa.timestamp("ns")),
    "price": (pa.float64(),),
    "size": (pa.int64(),),
}
# What the header probe parses: enough for the header and a sample of rows.
CSV_PROBE_BYTES = 64 << 10


@dataclass(frozen=True)
class _CsvHeader:
    """A CSV file's column names and its first rows (the wanted columns as text)."""

    names: list[str]
    sample: pa.Table


class _CsvFallback(Exception):
    """The typed read stopped at something only the text read handles, after `rows` rows."""

    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        self.rows = rows


def _csv_source(stream: IO[bytes], file: InputFile, span: Span | None = None) -> Any:
    """What Arrow reads `stream` through (up to the end of `span`, when given); closing it
    leaves `stream` to its owner."""
    source = pa.PythonFile(Borrowed(stream, span[1] if span is not None else None), mode="r")
    return pa.CompressedInputStream(source, "gzip") if file.format == "csv.gz" else source


def _csv_convert(
    types: dict[str, pa.DataType], include: list[str], include_missing: bool
) -> pacsv.ConvertOptions:
    # An empty field is null in every column; a quoted empty string is text, not null.
    return pacsv.ConvertOptions(
        column_types=types,
        include_columns=include,
        include_missing_columns=include_missing,
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=False,
    )


def _open_csv(source: Any, convert: pacsv.ConvertOptions, block_bytes: int, names: list[str] | None = None) -> Any:
    # Conversion on the calling thread (Arrow's IO thread still reads ahead): workers already
    # run a job per core, and conversion threads cost CPU in hand-offs without shortening a
    # streamed read of one file. A slice of a file has no header: its `names` are given.
    return pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(block_size=block_bytes, use_threads=False, column_names=names),
        convert_options=convert,
    )


def _csv_header(stream: IO[bytes], file: InputFile, columns: tuple[str, ...]) -> _CsvHeader | None:
    """The header and first rows of a CSV file, from its first bytes; the stream is rewound.

    None when they cannot be parsed (an empty or corrupt file): the text read then meets
    the same trouble and reports it. A header longer than the probe gets a second try
    with the block size of the real read.
    """
    as_text = _csv_convert({c: pa.string() for c in columns}, [], include_missing=False)
    for size in (CSV_PROBE_BYTES, CSV_BLOCK_BYTES):
        text = _csv_prefix(stream, file, size)
        if text is None:
            continue
        try:
            # Parsed from memory: a reader on the stream itself would read ahead from it
            # in the background, racing the real read.
            sample = pacsv.read_csv(
                pa.BufferReader(text),
                read_options=pacsv.ReadOptions(block_size=size, use_threads=False),
                convert_options=as_text,
            )
        except (pa.ArrowException, OSError, EOFError):
            return None
        return _CsvHeader(sample.schema.names, sample)
    return None


def _csv_prefix(stream: IO[bytes], file: InputFile, size: int) -> bytes | None:
    """The file's first `size` bytes of text, cut after the last whole line in them; the
    stream is rewound. None when they hold no whole line or do not decompress."""
    start = stream.tell()
    try:
        raw = stream.read(size)
    finally:
        stream.seek(start)
    whole = len(raw) < size
    if file.format == "csv.gz":
        text = b""
        try:
            while raw and len(text) < size:  # member after member (bgzip writes many)
                member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                text += member.decompress(raw, size - len(text))
                if not member.eof:
                    break
                raw = member.unused_data
        except zlib.error:
            return None
        whole = whole and not raw
        raw = text[:size]
    if whole:
        return raw
    end = max(raw.rfind(b"\n"), raw.rfind(b"\r"))
    return raw[: end + 1] if end >= 0 else None


def csv_slices(storage: Storage, file: InputFile) -> list[FileSlice]:
    """Where to cut an uncompressed CSV file into slices of whole lines of about
    `CSV_SLICE_BYTES`, the first starting after the header (nothing counted yet); none for a
    file smaller than two slices, another format, or lines too long to find an end of.

    Lines end at a line feed, a carriage return, or both, as for Arrow's reader, which does
    not take line breaks inside quoted values either (its `newlines_in_values` is off).
    """
    slice_bytes = CSV_SLICE_BYTES
    if file.format != "csv" or file.size < 2 * slice_bytes:
        return []
    try:
        with storage.open_read(file.key) as stream:
            header_end = _line_end(stream, 0)
            stream.seek(0)
            if header_end is None or not stream.read(header_end).strip():
                return []  # the header is not the first line: the file is read whole
            cuts = [header_end]
            for target in range(slice_bytes, file.size, slice_bytes):
                cut = _line_end(stream, target - 1) if target > cuts[-1] else None
                if cut is not None and cut < file.size:
                    cuts.append(cut)
    except OSError as exc:
        raise unreadable(file, storage, exc) from None
    if len(cuts) < 2:
        return []
    return [FileSlice(start, end) for start, end in itertools.pairwise([*cuts, file.size])]


def _line_end(stream: IO[bytes], at: int) -> int | None:
    """The offset just past the first line break at or after offset `at` (CR LF counts as
    one), or None when none is within `CSV_LINE_SEARCH_BYTES` or before the end."""
    stream.seek(at)
    offset = at
    while offset - at < CSV_LINE_SEARCH_BYTES:
        chunk = stream.read(64 << 10)
        if not chunk:
            return None
        breaks = [i for i in (chunk.find(b"\n"), chunk.find(b"\r")) if i >= 0]
        if breaks:
            i = min(breaks)
            end = offset + i + 1
            if chunk[i:i + 1] == b"\r":
                after = chunk[i + 1:i + 2]
                if not after:
                    stream.seek(end)
                    after = stream.read(1)
                end += after == b"\n"
            return end
        offset += len(chunk)
    return None


def _seek_span(stream: IO[bytes], file: InputFile, storage: Storage, span: Span) -> None:
    """Position `stream` at the start of `span`, checking that lines start and end there (the
    file's end ends a line)."""
    for edge in (span[0], span[1]) if span[1] < file.size else (span[0],):
        stream.seek(edge - 1)
        if stream.read(1) not in (b"\n", b"\r"):
            raise _changed(file, storage)
    stream.seek(span[0])


def _changed(file: InputFile, storage: Storage) -> PermanentError:
    return PermanentError(
        f"{storage.describe(file.key)} changed since the run found its jobs (its slices no longer fall on "
        "line ends): run `tickq produce` again for the new input"
    )


def _csv_types(header: _CsvHeader, present: list[str]) -> dict[str, pa.DataType]:
    """The type to read each present column as: typed where the sample rows convert."""
    types: dict[str, pa.DataType] = {}
    for name in present:
        # Text columns come as labels straight from the reader (normalise encodes them anyway).
        types[name] = LABEL if name in LABEL_COLUMNS else pa.string()
        for kind in _CSV_TYPES.get(name, ()):
            if header.sample.num_rows == 0 or _converts(header.sample.column(name), kind):
                types[name] = kind
                break
    return types


def _converts(text: pa.ChunkedArray, kind: pa.DataType) -> bool:
    """Whether the CSV reader should take `text` as `kind` (a guess: a wrong one costs a
    second read of the file's start, never a different result)."""
    if not pa.types.is_timestamp(kind):
        text = pc.utf8_trim_whitespace(text)  # as the CSV number converters do
    try:
        pc.cast(text, kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def csv_batches(
    storage: Storage,
    file: InputFile,
    columns: tuple[str, ...],
    wanted: tuple[str, ...] | None,
    batch_rows: int,
    counter: ByteCounter | None,
    span: Span | None = None,
) -> Iterator[pa.RecordBatch]:
    """CSV, converted by Arrow's reader where the text allows, else as text; with a `span`
    (whole lines of the file, `FileSlice`), only the rows in it.

    The header comes first, from a probe of the file's start: a missing required column
    is a permanent error, columns the file lacks are left out. The typed read is the fast
    path; at the first value it cannot convert (or any other trouble) the file is read
    again as text from the row the typed read had reached, so every row comes out once,
    malformed values reject only their rows, and errors are the text read's, as before.
    """
    names: list[str] | None = None
    with counted_stream(storage, file, counter, span) as stream:
        header = _csv_header(stream, file, columns)
        present: list[str] | None = None
        types: dict[str, pa.DataType] = {}
        # A header with repeated names is left to the text read, which reads it as it always did.
        if header is not None and len(set(header.names)) == len(header.names):
            missing = [c for c in REQUIRED_COLUMNS if c in columns and c not in header.names]
            if missing:
                raise missing_columns(file, storage, missing)
            present = [c for c in columns if c in header.names]
            types = _csv_types(header, present)
        if span is not None:
            if header is None or present is None:  # discovery cut it with a header it could read
                raise _changed(file, storage)
            names = header.names
            _seek_span(stream, file, storage, span)
        if present is None or all(t in (pa.string(), LABEL) for t in types.values()):
            yield from _csv_text(storage, file, stream, columns, present, wanted, batch_rows, 0, span, names)
            return
        try:
            yield from _csv_typed(stream, file, types, wanted, batch_rows, span, names)
            return
        except _CsvFallback as fallback:
            done = fallback.rows
    with counted_stream(storage, file, counter, span) as stream:
        if span is not None:
            _seek_span(stream, file, storage, span)
        yield from _csv_text(storage, file, stream, columns, present, wanted, batch_rows, done, span, names)


def _csv_typed(
    stream: IO[bytes],
    file: InputFile,
    types: dict[str, pa.DataType],
    wanted: tuple[str, ...] | None,
    batch_rows: int,
    span: Span | None = None,
    names: list[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The columns of `types`, converted by the reader; `_CsvFallback` when it cannot go on."""
    rows = 0
    joined = _Coalescer(batch_rows)
    try:
        convert = _csv_convert(types, list(types), include_missing=False)
        reader = _open_csv(_csv_source(stream, file, span), convert, CSV_BLOCK_BYTES, names)
        for batch in reader:
            rows += batch.num_rows
            yield from joined.add(filter_securities(batch, wanted))
    except (pa.ArrowException, OSError, EOFError):
        # Every row counted is handed out before the fallback, which goes on after them: it
        # repeats no row and loses none.
        yield from joined.flush()
        raise _CsvFallback(rows) from None
    yield from joined.flush()


class _Coalescer:
    """Joins small record batches into batches of up to `batch_rows` rows."""

    def __init__(self, batch_rows: int) -> None:
        self._batch_rows = batch_rows
        self._parts: list[pa.RecordBatch] = []
        self._rows = 0

    def add(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        """Take `batch`; hand out full batches."""
        if batch.num_rows:
            self._parts.append(batch)
            self._rows += batch.num_rows
        if self._rows >= self._batch_rows:
            yield from self.flush()

    def flush(self) -> Iterator[pa.RecordBatch]:
        """Hand out every row taken."""
        parts, self._parts, self._rows = self._parts, [], 0
        if len(parts) == 1:
            whole = parts[0]
        elif parts:  # differing dictionaries of label columns are unified
            whole = pa.Table.from_batches(parts).combine_chunks().to_batches()[0]
        else:
            return
        for offset in range(0, whole.num_rows, self._batch_rows):
            yield whole.slice(offset, self._batch_rows)


def _csv_text(
    storage: Storage,
    file: InputFile,
    stream: IO[bytes],
    columns: tuple[str, ...],
    present: list[str] | None,
    wanted: tuple[str, ...] | None,
    batch_rows: int,
    skip: int,
    span: Span | None = None,
    names: list[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The `present` columns as text, from data row `skip` on (rows before it were yielded),
    of the whole file or of its `span` (whose column `names` are given).

    `present` None (header unknown): every wanted column, a lacking one as nulls. Text is
    parsed by `normalise`, so a malformed value rejects its row instead of failing the file.
    """
    include = list(columns) if present is None else present
    convert = _csv_convert({c: pa.string() for c in include}, include, include_missing=present is None)
    try:
        reader = _open_csv(_csv_source(stream, file, span), convert, CSV_BLOCK_BYTES, names)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc) and span is not None:
            return  # a slice of blank lines
        if "Empty CSV file" in str(exc):
            raise PermanentError(f"{storage.describe(file.key)} is empty (no header)") from None
        raise unreadable(file, storage, exc) from None
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise unreadable(file, storage, exc) from None
    joined = _Coalescer(batch_rows)
    try:
        for batch in reader:
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch, skip = batch.slice(skip), 0
            yield from joined.add(filter_securities(batch, wanted))
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise unreadable(file, storage, exc) from None
    yield from joined.flush()
    if skip:
        raise PermanentError(f"{storage.describe(file.key)} changed while being read")
