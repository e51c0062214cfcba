"""Reading monthly input: discovery of a month's files, streaming reads, normalisation.

A month M's input is every file under ``<input>/M/`` (recursively) plus any ``<input>/M.<ext>``
(`files`). Files are streamed in bounded record batches (`reading`): Parquet row groups whose
statistics exclude the wanted security (or time range) are never fetched (`parquet_reader`),
nor CSV slices whose recorded ranges do (`csv_reader`). Normalisation turns whatever a file
holds into one schema (`NORMALISED_SCHEMA`), derives ``trade_date`` and ``hour`` in the market
time zone, and marks rows the contract rejects (`normalisation`). Everything is vectorised with
pyarrow compute; no per-row Python on the normal path.
"""

from shared.inputs.csv_reader import csv_slices
from shared.inputs.files import (
    ALL_COLUMNS,
    DEFAULT_BATCH_ROWS,
    KEY_COLUMNS,
    LABEL,
    LABEL_COLUMNS,
    NORMALISED_SCHEMA,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    TS_UTC,
    DayWindow,
    FileSlice,
    InputFile,
    KeyBatch,
    month_files,
    sliced_files_json,
    whole_file_slice,
    with_stored_slices,
)
from shared.inputs.normalisation import (
    job_dates,
    label_codes,
    label_mask,
    normalise,
    normalise_price,
    normalise_side,
    normalise_size,
    normalise_text,
    normalise_trade_date,
    normalise_ts,
    shared_trade_date,
    trade_dates,
)
from shared.inputs.parquet_reader import ParquetCache
from shared.inputs.reading import SliceSeen, key_streams, pass_share, read_batches, read_units
from shared.inputs.streams import ByteCounter

__all__ = [
    "ALL_COLUMNS",
    "DEFAULT_BATCH_ROWS",
    "KEY_COLUMNS",
    "LABEL",
    "LABEL_COLUMNS",
    "NORMALISED_SCHEMA",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "TS_UTC",
    "ByteCounter",
    "DayWindow",
    "FileSlice",
    "InputFile",
    "KeyBatch",
    "ParquetCache",
    "SliceSeen",
    "csv_slices",
    "job_dates",
    "key_streams",
    "label_codes",
    "label_mask",
    "month_files",
    "normalise",
    "normalise_price",
    "normalise_side",
    "normalise_size",
    "normalise_text",
    "normalise_trade_date",
    "normalise_ts",
    "pass_share",
    "read_batches",
    "read_units",
    "shared_trade_date",
    "sliced_files_json",
    "trade_dates",
    "whole_file_slice",
    "with_stored_slices",
]
