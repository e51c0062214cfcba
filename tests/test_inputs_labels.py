"""Text columns become labels: each distinct value normalised once, rows mapped by index."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shared.inputs import ALL_COLUMNS, LABEL, month_files, normalise, read_batches
from shared.storage import open_storage

MONTH = "2024-03"
TS = pa.timestamp("ns", tz="UTC")


def test_dictionary_columns_from_parquet_are_normalised_once_per_value(tmp_path: Path) -> None:
    # A file written from pandas categoricals: dictionary columns with spellings to normalise,
    # two of which mean the same side, and one that is no side at all.
    (tmp_path / MONTH).mkdir()
    sides = pa.array(["buy", " S ", "B", "x", None, "SELL"]).dictionary_encode()
    table = pa.table({
        "ts": pa.array([1_709_251_200_000_000_000 + i for i in range(6)], pa.int64()).cast(TS),
        "security": pa.array(["BHP", "BHP", "", "CBA", "CBA", "BHP"]).dictionary_encode(),
        "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "size": [1, 2, 3, 4, 5, 6],
        "side": sides,
        "participant": pa.array([7, 7, 8, None, 8, 9], pa.int64()),
    })
    pq.write_table(table, tmp_path / MONTH / "a.parquet")
    storage = open_storage(str(tmp_path))
    [file] = month_files(storage, MONTH)

    batches = list(read_batches(storage, file, ALL_COLUMNS, security=["BHP"]))
    assert sum(b.num_rows for b in batches) == 3  # row-filtered through the dictionary
    [whole] = pa.Table.from_batches(list(read_batches(storage, file, ALL_COLUMNS))).combine_chunks().to_batches()
    rows, valid = normalise(whole, "UTC")

    assert rows.schema.field("side").type == LABEL and rows.schema.field("participant").type == LABEL
    assert rows.column("side").to_pylist() == ["B", "S", "B", None, None, "S"]
    side = rows.column("side").chunk(0)
    assert sorted(side.dictionary.to_pylist()) == ["B", "S"]  # distinct, no null value
    assert rows.column("participant").to_pylist() == ["7", "7", "8", None, "8", "9"]
    assert rows.column("security").to_pylist() == ["BHP", "BHP", "", "CBA", "CBA", "BHP"]
    assert valid.to_pylist() == [True, True, False, True, True, True]  # the empty security is rejected
