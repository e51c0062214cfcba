"""Normalisation: whatever a file holds in one schema (`NORMALISED_SCHEMA`), trade_date and
hour derived in the market time zone, rejected rows marked; text columns as labels
(dictionary-encoded), each distinct value handled once per batch. Also the label helpers the
readers and workers share: the rows of the wanted securities, label codes and masks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.errors import PermanentError
from shared.inputs.files import NORMALISED_SCHEMA, TS_UTC
from shared.markettime import local_time, shared_day


def wanted_securities(security: str | Collection[str] | None) -> tuple[str, ...] | None:
    """The wanted securities, sorted (None: all of them)."""
    if security is None:
        return None
    return (security,) if isinstance(security, str) else tuple(sorted(set(security)))


@functools.lru_cache(maxsize=4)
def _value_set(wanted: tuple[str, ...]) -> pa.Array:
    """`wanted` as an array, made once per read (a few hundred strings take most of a
    millisecond, once per batch otherwise)."""
    return pa.array(wanted, pa.string())


def filter_securities(batch: pa.RecordBatch, wanted: tuple[str, ...] | None) -> pa.RecordBatch:
    """The rows of `batch` of the `wanted` securities (sorted; None: every row)."""
    if wanted is None or batch.num_rows == 0:
        return batch
    column = batch.column("security")

    def wanted_ones(values: pa.Array) -> pa.Array:
        text = values if pa.types.is_string(values.type) else values.cast(pa.string())
        return pc.equal(text, wanted[0]) if len(wanted) == 1 else pc.is_in(text, value_set=_value_set(wanted))

    if pa.types.is_dictionary(column.type):
        per_value = wanted_ones(column.dictionary)
        if column.null_count == 0 and pc.all(per_value).as_py():
            # Every value is wanted (a pass over a whole month in time order): no row to drop,
            # and no per-row mask to build.
            return batch
        match = label_mask(column, lambda _dictionary: per_value)
    else:
        match = pc.fill_null(wanted_ones(column), False).to_numpy(zero_copy_only=False)
    return batch if match.all() else batch.filter(pa.array(match))


_ISO_WITH_OFFSET = r"(Z|z|[+-]\d\d(:?\d\d)?)$"
_INTEGER_TEXT = r"^\s*[+-]?\d+\s*$"


def _cast_or_null(values: pa.Array, target: pa.DataType) -> pa.Array:
    """Cast `values`; elements that cannot be cast become null (the row is rejected later)."""
    try:
        return pc.cast(values, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Rare path (malformed input): cast element by element and keep what parses.
    out = []
    for value in values:
        try:
            out.append(pc.cast(pa.array([value.as_py()], values.type), target)[0].as_py())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError):
            out.append(None)
    return pa.array(out, target)


def _cast_clean(text: pa.Array, target: pa.DataType) -> pa.Array | None:
    """`text` cast to `target` when every value parses as it stands, else None.

    Arrow's parsers reject surrounding whitespace, so where this succeeds, trimming first
    would have given the same values: clean text (the usual case) skips the trim.
    """
    try:
        return pc.cast(text, target)
    except pa.ArrowInvalid:
        return None


def _parse_ts_text(values: pa.Array) -> pa.Array:
    """ISO-8601 text (with or without offset; naive = UTC) or integer nanoseconds."""
    clean = _cast_clean(values, TS_UTC)
    if clean is not None:
        return clean
    values = pc.utf8_trim_whitespace(values)
    try:
        return pc.cast(values, TS_UTC)
    except pa.ArrowInvalid:
        pass
    try:
        return pc.cast(pc.cast(values, pa.timestamp("ns")), TS_UTC)
    except pa.ArrowInvalid:
        pass
    # All integers: Arrow's integer parser takes [-]digits, which the rule below takes with
    # the same value, and hexadecimal, which the rule below rejects (hence the "x" check).
    if not pc.any(pc.match_substring(values, "x", ignore_case=True)).as_py():
        try:
            return pc.cast(values, pa.int64()).view(TS_UTC)
        except pa.ArrowInvalid:
            pass
    is_int = pc.fill_null(pc.match_substring_regex(values, _INTEGER_TEXT), False)
    has_offset = pc.fill_null(pc.match_substring_regex(values, _ISO_WITH_OFFSET), False)
    null_text = pa.nulls(len(values), pa.string())
    as_int = _cast_or_null(pc.if_else(is_int, values, null_text), pa.int64()).view(TS_UTC)
    plain = pc.and_(pc.invert(is_int), pc.invert(has_offset))
    with_offset = _cast_or_null(pc.if_else(has_offset, values, null_text), TS_UTC)
    naive = _cast_or_null(pc.if_else(plain, values, null_text), pa.timestamp("ns")).cast(TS_UTC)
    return pc.if_else(is_int, as_int, pc.if_else(has_offset, with_offset, naive))


def normalise_ts(values: pa.Array) -> pa.Array:
    """A ts column as UTC nanosecond instants: timestamps (naive ones are UTC), integers
    (nanoseconds since the epoch), ISO 8601 text or dates; unparsable text becomes null, other
    types are a `PermanentError`."""
    kind = values.type
    if pa.types.is_timestamp(kind):
        # Naive timestamps are UTC by contract; aware ones are stored as UTC instants.
        try:
            return pc.cast(values, pa.timestamp("ns", tz=kind.tz or "UTC")).cast(TS_UTC)
        except pa.ArrowInvalid:
            raise PermanentError(
                f"column ts has instants outside the years 1677-2262 (type {kind}), which tickq cannot represent"
            ) from None
    if pa.types.is_integer(kind):
        return pc.cast(values, pa.int64()).view(TS_UTC)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _parse_ts_text(values.cast(pa.string()))
    if pa.types.is_dictionary(kind):
        return normalise_ts(values.dictionary_decode())
    if pa.types.is_date(kind):
        return pc.cast(pc.cast(values, pa.timestamp("ns")), TS_UTC)
    raise PermanentError(f"column ts has unsupported type {kind}")


def normalise_text(values: pa.Array) -> pa.Array:
    """A text column as plain strings (values of other types as their text; null stays null)."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_null(values.type):
        return pa.nulls(len(values), pa.string())
    return _cast_or_null(values, pa.string())


def normalise_price(values: pa.Array) -> pa.Array:
    """A price column as float64; text that is not a number becomes null."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
        clean = _cast_clean(values, pa.float64())
        if clean is not None:
            return clean
        values = pc.utf8_trim_whitespace(values)
    return _cast_or_null(values, pa.float64())


def normalise_size(values: pa.Array) -> pa.Array:
    """A size column as int64: integral floats and their text convert, anything else is null."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    kind = values.type
    if pa.types.is_integer(kind):
        return _cast_or_null(values, pa.int64())
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        as_float = pc.cast(values, pa.float64())
        integral = pc.and_(pc.equal(pc.floor(as_float), as_float), pc.less(pc.abs(as_float), 2.0**62))
        kept = pc.if_else(pc.fill_null(integral, False), as_float, pa.scalar(None, pa.float64()))
        return pc.cast(kept, pa.int64(), safe=False)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = values.cast(pa.string())
        clean = _cast_clean(text, pa.int64())
        if clean is not None:
            return clean
        text = pc.utf8_trim_whitespace(text)
        try:
            return pc.cast(text, pa.int64())
        except pa.ArrowInvalid:
            # "100.0" is an integer size written as a float; "1.5" and "abc" are not sizes.
            return normalise_size(_cast_or_null(text, pa.float64()))
    return pa.nulls(len(values), pa.int64())


_BUY = pa.array(["B", "BUY"])
_SELL = pa.array(["S", "SELL", "A"])


_CANONICAL_SIDES = pa.array(["B", "S", None], pa.string())


def normalise_side(values: pa.Array) -> pa.Array:
    """A side column as B, S or null, from any case of B/BUY and S/SELL/A."""
    text = normalise_text(values)
    # Many feeds write B and S already, which map to themselves: nothing to do.
    if pc.all(pc.is_in(text, value_set=_CANONICAL_SIDES)).as_py() is not False:
        return text
    # Otherwise a side column still holds a handful of spellings: map each distinct one
    # once and look every row up, rather than upper-casing and matching every row.
    encoded = pc.dictionary_encode(text)
    return pc.take(_side_of(encoded.dictionary), encoded.indices)


def _side_of(values: pa.Array) -> pa.Array:
    """B or S for each spelling of a side (any case, surrounding blanks), else null."""
    text = pc.utf8_upper(pc.utf8_trim_whitespace(values))
    null = pa.scalar(None, pa.string())
    return pc.if_else(
        pc.is_in(text, value_set=_BUY),
        pa.scalar("B"),
        pc.if_else(pc.is_in(text, value_set=_SELL), pa.scalar("S"), null),
    )


def normalise_trade_date(values: pa.Array) -> pa.Array:
    """A trade_date column as date32 (dates, timestamps, ISO text); anything else is null."""
    kind = values.type
    if pa.types.is_dictionary(kind):
        return normalise_trade_date(values.dictionary_decode())
    if pa.types.is_date32(kind):
        return values
    if pa.types.is_date(kind) or pa.types.is_timestamp(kind):
        return pc.cast(values, pa.date32())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = pc.utf8_trim_whitespace(values.cast(pa.string()))
        return _cast_or_null(text, pa.date32())
    return pa.nulls(len(values), pa.date32())


def job_dates(ts: pa.Array, given: pa.Array | None, market_tz: str) -> pa.Array:
    """Each row's trade date as a job sees it: the row's own `given` trade date where it has
    one, else the market date of its UTC `ts` in `market_tz` (null: the row is of no day)."""
    return _job_date(given, local_time(ts, market_tz).trade_date)


def _job_date(given: pa.Array | None, derived: pa.Array) -> pa.Array:
    return derived if given is None else pc.coalesce(normalise_trade_date(given), derived)


def column_of(batch: pa.RecordBatch, name: str) -> pa.Array | None:
    """The column `name` of `batch`, or None when it has none."""
    index = batch.schema.get_field_index(name)
    return batch.column(index) if index >= 0 else None


def normalise(batch: pa.RecordBatch, market_tz: str) -> tuple[pa.Table, pa.Array]:
    """`batch` in `NORMALISED_SCHEMA` and a boolean mask of the rows the contract accepts.

    A row is rejected when a required value is null or unparseable, its security is empty,
    its price is not finite or <= 0, or its size is not an integer > 0.
    """
    n = batch.num_rows
    ts = normalise_ts(batch.column("ts"))
    security = _labels(batch.column("security"), normalise_text)
    price = normalise_price(batch.column("price"))
    size = normalise_size(batch.column("size"))
    side, participant, venue = (
        _labels(raw, normalise_side if name == "side" else normalise_text) if raw is not None else _no_labels(n)
        for name, raw in (("side", column_of(batch, "side")), ("participant", column_of(batch, "participant")),
                          ("venue", column_of(batch, "venue")))
    )
    local = local_time(ts, market_tz)
    trade_date = _job_date(column_of(batch, "trade_date"), local.trade_date)
    named = label_mask(security, lambda values: pc.greater(pc.utf8_length(values), 0))
    valid = pc.and_(
        pc.and_(pc.is_valid(ts), pa.array(named)),
        pc.and_(
            pc.and_(pc.is_finite(price), pc.greater(price, 0.0)),
            pc.greater(size, 0),
        ),
    )
    table = pa.Table.from_arrays(
        [ts, security, price, size, side, participant, venue, trade_date, local.hour, local.minute_of_day],
        schema=NORMALISED_SCHEMA,
    )
    return table, pc.fill_null(valid, False)


def _labels(values: pa.Array, normalise_values: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """A text column as labels (`LABEL`): each distinct value normalised once.

    The dictionary holds distinct, non-null values; a value that normalises to null makes
    its rows null.
    """
    if pa.types.is_null(values.type):
        return _no_labels(len(values))
    encoded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
    normalised = normalise_values(encoded.dictionary)
    clean = normalised.null_count == 0 and normalised.equals(encoded.dictionary)
    if clean and pc.count_distinct(normalised).as_py() == len(normalised):  # already distinct and normalised
        return pa.DictionaryArray.from_arrays(encoded.indices.cast(pa.int32()), normalised)
    distinct = pc.dictionary_encode(normalised)
    indices = pc.take(distinct.indices, encoded.indices)
    return pa.DictionaryArray.from_arrays(indices.cast(pa.int32()), distinct.dictionary.cast(pa.string()))


def _no_labels(n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.nulls(n, pa.int32()), pa.array([], pa.string()))


def label_codes(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Each row's index into a dictionary column's values (-1 for null), and the values.

    `lookup[codes]` then maps every row through a per-value `lookup` array with one extra,
    last, entry for null.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.unify_dictionaries().combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    indices = column.indices
    codes = (indices.fill_null(-1) if indices.null_count else indices).to_numpy().astype(np.int64, copy=False)
    return codes, column.dictionary


def label_mask(column: pa.Array | pa.ChunkedArray, predicate: Callable[[pa.Array], pa.Array]) -> np.ndarray:
    """`predicate` of each row's label, evaluated once per distinct value (null rows: False)."""
    codes, values = label_codes(column)
    per_value = pc.fill_null(predicate(values), False).to_numpy(zero_copy_only=False)
    mask: np.ndarray = np.append(per_value, False)[codes]
    return mask


def shared_trade_date(batch: pa.RecordBatch, market_tz: str) -> int | None:
    """The trade date (days since 1970-01-01) of every row of `batch`, when they all have the
    same one from their ts (no ``trade_date`` column, no null ts); else None.

    A month in time order has one date per batch, nearly always: this costs a min and a max
    where `trade_dates` converts every row.
    """
    if batch.num_rows == 0 or column_of(batch, "trade_date") is not None:
        return None
    ts = normalise_ts(batch.column("ts"))
    if ts.null_count:
        return None
    return shared_day(ts.cast(pa.int64()).to_numpy(), market_tz)


def trade_dates(batch: pa.RecordBatch, market_tz: str) -> pa.Array:
    """Each row's trade date: the file's ``trade_date`` where given, else ts in market time.

    Used by discovery, which reads only the key columns.
    """
    ts = normalise_ts(batch.column("ts"))
    derived = local_time(ts, market_tz).trade_date
    given = column_of(batch, "trade_date")
    return pc.coalesce(normalise_trade_date(given), derived) if given is not None else derived
