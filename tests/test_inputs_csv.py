"""The CSV reader: Arrow converts clean columns itself, everything else is read as text.

The typed read must give exactly what reading every column as text and parsing it in
`normalise` gives, including after it falls back part-way through a file; errors stay one
clear line, and a missing required column is a permanent error.
"""

from __future__ import annotations

import gzip
import io
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from shared import inputs
from shared.errors import PermanentError
from shared.inputs import (
    ALL_COLUMNS,
    KEY_COLUMNS,
    TS_UTC,
    ByteCounter,
    csv_reader,
    month_files,
    normalisation,
    read_batches,
    trade_dates,
)
from shared.storage import open_storage
from tests.helpers import normalised_rows

MONTH = "2024-03"
HEADER = "ts,security,price,size,side,participant,venue"
TZ = "Australia/Sydney"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few dozen rows, so that every file here spans many of them."""
    monkeypatch.setattr(csv_reader, "CSV_BLOCK_BYTES", 2048)
    monkeypatch.setattr(csv_reader, "CSV_PROBE_BYTES", 512)


def clean_rows(n: int = 600) -> list[list[str]]:
    securities = ["BHP", "CBA", "WDS"]
    return [
        [
            f"2024-03-{4 + i % 3:02d}T{i % 24:02d}:{i % 60:02d}:{(7 * i) % 60:02d}.{i:09d}Z",
            securities[i % 3],
            f"{10 + i % 17}.{i % 100:02d}",
            str(1 + i % 500),
            "BS"[i % 2],
            f"P{i % 4}",
            "CP" if i % 5 else "TM",
        ]
        for i in range(n)
    ]


def write(root: Path, lines: list[str], gz: bool = False) -> Path:
    """`lines` as the month's CSV (or gzip CSV) file under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n" if lines else ""
    if gz:
        path = root / f"{MONTH}.csv.gz"
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path = root / f"{MONTH}.csv"
        path.write_text(text)
    return path


def as_lines(rows: list[list[str]], header: str = HEADER) -> list[str]:
    return [header] + [",".join(r) for r in rows]


def read(root: Path, security: Any = None, columns: tuple[str, ...] = ALL_COLUMNS) -> list[pa.RecordBatch]:
    storage = open_storage(str(root))
    return [
        batch
        for file in month_files(storage, MONTH)
        for batch in read_batches(storage, file, columns, security=security, batch_rows=50)
    ]


def normalised(batches: list[pa.RecordBatch]) -> list[dict[str, Any]]:
    """Every row as the worker sees it, with its verdict (NaN made comparable)."""
    return normalised_rows(batches, TZ)


def as_text(root: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> list[pa.RecordBatch]:
    """What the reader gives with every column read as text (no typed read at all)."""
    with monkeypatch.context() as m:
        m.setattr(csv_reader, "_CSV_TYPES", {})
        batches = read(root, **kwargs)
    assert all(pa.types.is_string(t) for b in batches for t in b.schema.types)
    return batches


def assert_same_as_text(root: Path, monkeypatch: pytest.MonkeyPatch, security: Any = None) -> list[pa.RecordBatch]:
    fast = read(root, security=security)
    text = as_text(root, monkeypatch, security=security)
    assert normalised(fast) == normalised(text)
    for columns in (KEY_COLUMNS, ("security",)):  # what discovery and ingest's first pass read
        keys = [x for b in read(root, security=security, columns=columns) for x in b.column("security").to_pylist()]
        assert keys == [r["security"] for r in normalised(text)]
    dates = [x for b in read(root, security=security, columns=KEY_COLUMNS) for x in trade_dates(b, TZ).to_pylist()]
    assert dates == [r["trade_date"] for r in normalised(text)]
    return fast


# ---------------------------------------------------------------------------------------
# Arrow's CSV converters against the text rules of `normalise`.
# ---------------------------------------------------------------------------------------

NUMBERS = [
    "1.5", " 1.5", "1.5 ", "\t7", "+1.5", ".5", "5.", "1e3", "1E3", "inf", "-inf", "nan", "NaN", "Infinity",
    "1_0", "0x10", "0X1A", "-0", "0", "-5", "+5", "007", "1e400", "1e-400", "99999999999999999999",
    "9223372036854775807", "9223372036854775808", "100.0", "1.0e2", " 5 ", "5\u00a0", '"5"', '" 5"', '""',
    "true", "1.", "-.5", "0.1e-2", "1d2", "\u0665", "1.5.5", "--5", "e5", ".", " ", "NULL", "N/A", "-", "1 2",
]
TIMES = [
    "2024-01-01T00:00:00Z", "2024-01-01T00:00:00", "2024-01-01 00:00:00", " 2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00Z ", "2024-01-01T00:00:00+10:00", "2024-01-01T00:00:00.123456789+1000",
    "2024-01-01T00:00:00.123456789", "2024-01-01", "1712534400000000000", "2024-01-01T00:00:00z",
    "2024-01-01T00:00:00+10", "2024-01-01T00:00:00.1234567891Z", "2024-01-01T24:00:00Z", "2024-02-30T00:00:00Z",
    "2024-01-01T00:00Z", "-1", "+5", "0x10", "2262-04-12T00:00:00Z", "2024-01-01T00:00:00-00:00", '"2024-01-01"',
]


def _one_value(text: str, kind: pa.DataType) -> Any:
    """`text` as the single field of a CSV column read as `kind`; "error" if it fails."""
    convert = csv_reader._csv_convert({"x": kind}, ["x"], include_missing=False)
    try:
        return pacsv.read_csv(io.BytesIO(f"x\n{text}\n".encode()), convert_options=convert).column("x")[0].as_py()
    except pa.ArrowInvalid:
        return "error"


@pytest.mark.parametrize(
    ("column", "values"), [("price", NUMBERS), ("size", NUMBERS), ("ts", TIMES)]
)
def test_csv_converters_take_a_subset_of_the_text_rules_with_the_same_values(column: str, values: list[str]) -> None:
    parse = {"price": inputs.normalise_price, "size": inputs.normalise_size, "ts": inputs.normalise_ts}[column]
    taken = 0
    for value in values:
        text = pa.array([_one_value(value, pa.string())], pa.string())
        expected = parse(text)[0].as_py()
        for kind in csv_reader._CSV_TYPES[column]:
            typed = _one_value(value, kind)
            if typed == "error":
                continue
            taken += 1
            got = parse(pa.array([typed], kind))[0].as_py()
            if isinstance(expected, float) and math.isnan(expected):
                assert isinstance(got, float) and math.isnan(got), value
            else:
                assert got == expected, (value, kind, got, expected)
    assert taken >= 5


# ---------------------------------------------------------------------------------------
# Whole files: the typed read, its fallback, and the text read give the same rows.
# ---------------------------------------------------------------------------------------


def test_clean_file_is_read_typed_and_equals_the_text_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, as_lines(clean_rows()))
    batches = assert_same_as_text(tmp_path, monkeypatch)
    assert len(batches) > 10
    assert {b.schema.field("ts").type for b in batches} == {TS_UTC}
    assert {b.schema.field("price").type for b in batches} == {pa.float64()}
    assert {b.schema.field("size").type for b in batches} == {pa.int64()}
    assert sum(b.num_rows for b in batches) == 600
    assert_same_as_text(tmp_path, monkeypatch, security="CBA")
    assert_same_as_text(tmp_path, monkeypatch, security=["BHP", "WDS"])


@pytest.mark.parametrize("gz", [False, True])
def test_integer_ns_after_iso_text_in_one_file_falls_back_without_losing_or_repeating_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool
) -> None:
    rows = clean_rows()
    for i in range(400, 600):
        rows[i][0] = str(1709510400000000000 + i)
    write(tmp_path, as_lines(rows), gz=gz)
    batches = assert_same_as_text(tmp_path, monkeypatch)
    # Typed until the first integer, text after it.
    assert batches[0].schema.field("ts").type == TS_UTC
    assert pa.types.is_string(batches[-1].schema.field("ts").type)
    got = normalised(batches)
    assert len(got) == 600 and all(r["valid"] for r in got)
    assert got[450]["ts"].value == 1709510400000000450
    assert_same_as_text(tmp_path, monkeypatch, security="BHP")


def test_integer_ns_first_then_iso_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = clean_rows()
    for i in range(0, 300):
        rows[i][0] = str(1709510400000000000 + i)
    rows[310][0] = "0x10"  # Arrow would take hexadecimal as an integer; tickq rejects it
    write(tmp_path, as_lines(rows))
    got = normalised(assert_same_as_text(tmp_path, monkeypatch))
    assert got[310]["ts"] is None and not got[310]["valid"]
    assert sum(r["valid"] for r in got) == 599


def test_naive_iso_text_is_utc_read_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = clean_rows()
    for row in rows:
        row[0] = row[0].rstrip("Z").replace("T", " ")
    rows[500][0] = "2024-03-05T10:00:00+10:00"  # an offset later on: the rest is read as text
    write(tmp_path, as_lines(rows))
    batches = assert_same_as_text(tmp_path, monkeypatch)
    assert batches[0].schema.field("ts").type == pa.timestamp("ns")
    got = normalised(batches)
    assert str(got[0]["ts"]) == "2024-03-04 00:00:00+00:00"
    assert str(got[500]["ts"]) == "2024-03-05 00:00:00+00:00"


def test_mixed_case_side_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spellings = ["B", "S", "buy", "Sell", "a", " s ", "x", "", "BUY", "SELL", "b", "A"]
    expected = ["B", "S", "B", "S", "S", "S", None, None, "B", "S", "B", "S"]
    rows = clean_rows()
    for i in range(300, 600):
        rows[i][4] = spellings[i % len(spellings)]
    write(tmp_path, as_lines(rows))
    got = normalised(assert_same_as_text(tmp_path, monkeypatch))
    assert [r["side"] for r in got[:4]] == ["B", "S", "B", "S"]
    assert [r["side"] for r in got[300:600]] == [expected[i % len(expected)] for i in range(300, 600)]


def test_extra_unknown_and_reordered_columns_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = ["venue,extra,size,security,ts,price,note"] + [
        f'{r[6]},{i},{r[3]},{r[1]},{r[0]},{r[2]},"a, quoted ""note"""' for i, r in enumerate(clean_rows())
    ]
    write(tmp_path, lines)
    batches = assert_same_as_text(tmp_path, monkeypatch)
    assert batches[0].schema.names == ["ts", "security", "price", "size", "venue"]
    assert normalised(batches)[0]["venue"] == "TM"


def test_bad_values_late_in_the_file_reject_only_their_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = clean_rows()
    rows[420][2] = "abc"  # price unparseable
    rows[421][3] = "1.5"  # size not an integer
    rows[422][3] = "100.0"  # an integer written as a float
    rows[423][2] = " 12.5 "  # blanks around a number
    rows[424][3] = ""  # null size
    rows[425][2] = "inf"
    rows[426][0] = "not a time"
    rows[427][1] = '""'  # an empty quoted security is text, not null
    for gz in (False, True):
        root = tmp_path / str(gz)
        write(root, as_lines(rows), gz=gz)
        got = normalised(assert_same_as_text(root, monkeypatch))
        assert len(got) == 600
        assert [r["valid"] for r in got[419:429]] == [True, False, False, True, True, False, False, False, False, True]
        assert got[422]["size"] == 100 and got[423]["price"] == 12.5
        assert got[427]["security"] == ""


def test_bytes_are_counted_across_a_fallback(tmp_path: Path) -> None:
    rows = clean_rows()
    rows[500][2] = "abc"  # the typed read stops here; the text read starts again
    path = write(tmp_path, as_lines(rows))
    storage = open_storage(str(tmp_path))
    (file,) = month_files(storage, MONTH)
    counter = ByteCounter()
    assert sum(b.num_rows for b in read_batches(storage, file, ALL_COLUMNS, counter=counter)) == 600
    # Both reads are counted: what a job really fetched.
    assert path.stat().st_size < counter.bytes <= 2 * path.stat().st_size


def test_header_only_file_yields_no_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "a", [HEADER])
    assert read(tmp_path / "a") == []
    write(tmp_path / "b", ["ts,security,price,size"], gz=True)
    assert read(tmp_path / "b") == [] == as_text(tmp_path / "b", monkeypatch)


def test_a_header_without_a_line_end_is_an_empty_file_as_before(tmp_path: Path) -> None:
    # Arrow's reader sees no header line in such a file; so it was before the typed read.
    for name, header in (("a", "ts,security,price,size"), ("b", "ts,security,size")):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{MONTH}.csv").write_text(header)
        with pytest.raises(PermanentError, match=r"2024-03\.csv is empty \(no header\)$"):
            read(tmp_path / name)


def test_gzip_of_many_members_split_mid_line_with_crlf_line_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ("\r\n".join(as_lines(clean_rows())) + "\r\n").encode()
    tmp_path.mkdir(exist_ok=True)
    # As bgzip writes: members of a fixed size, cut wherever that falls.
    members = [gzip.compress(data[i : i + 300]) for i in range(0, len(data), 300)]
    (tmp_path / f"{MONTH}.csv.gz").write_bytes(b"".join(members))
    batches = assert_same_as_text(tmp_path, monkeypatch)
    assert batches[0].schema.field("ts").type == TS_UTC
    assert len(normalised(batches)) == 600


def test_missing_optional_columns_are_left_out_and_normalised_as_null(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, as_lines([r[:4] for r in clean_rows()], header="ts,security,price,size"))
    batches = assert_same_as_text(tmp_path, monkeypatch)
    assert batches[0].schema.names == ["ts", "security", "price", "size"]
    got = normalised(batches)
    assert {(r["side"], r["participant"], r["venue"]) for r in got} == {(None, None, None)}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("rows", [0, 600])
def test_a_missing_required_column_is_a_permanent_error(tmp_path: Path, gz: bool, rows: int) -> None:
    lines = as_lines([[r[0], r[1], r[3]] for r in clean_rows(rows)], header="ts,security,size")
    write(tmp_path, lines, gz=gz)
    with pytest.raises(PermanentError, match=r"2024-03\.csv(\.gz)? lacks required column\(s\) price$"):
        read(tmp_path)
    with pytest.raises(PermanentError, match="lacks required column"):
        read(tmp_path, columns=("ts", "price"))
    assert sum(b.num_rows for b in read(tmp_path, columns=("security",))) == rows  # a column the file has


def test_empty_truncated_and_ragged_files_are_permanent_errors_of_one_line(tmp_path: Path) -> None:
    write(tmp_path / "empty", [])
    with pytest.raises(PermanentError, match=r"2024-03\.csv is empty \(no header\)$"):
        read(tmp_path / "empty")
    path = write(tmp_path / "trunc", as_lines(clean_rows()), gz=True)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(PermanentError, match=r"unreadable csv\.gz file .*2024-03\.csv\.gz: ") as info:
        read(tmp_path / "trunc")
    assert "\n" not in str(info.value)
    lines = as_lines(clean_rows())
    lines[500] = "a,b"  # past many typed blocks
    write(tmp_path / "ragged", lines)
    with pytest.raises(PermanentError, match=r"unreadable csv file .*Expected 7 columns, got 2") as info:
        read(tmp_path / "ragged")
    assert "\n" not in str(info.value)


def test_a_long_header_is_read_past_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    filler = ",".join(f"unused{i}" for i in range(200))  # longer than the probe's block
    lines = [f"{filler},{HEADER}"] + [",".join(["0"] * 200 + r) for r in clean_rows(50)]
    monkeypatch.setattr(csv_reader, "CSV_BLOCK_BYTES", 1 << 16)
    write(tmp_path, lines)
    assert len(normalised(assert_same_as_text(tmp_path, monkeypatch))) == 50
    write(tmp_path / "lacking", [f"{filler},ts,security,size", ",".join(["0"] * 200 + ["2024-03-04", "A", "1"])])
    with pytest.raises(PermanentError, match=r"lacks required column\(s\) price$"):
        read(tmp_path / "lacking")


# ---------------------------------------------------------------------------------------
# Text parsing shortcuts in `normalise`.
# ---------------------------------------------------------------------------------------


def test_integer_ns_text_takes_digits_only() -> None:
    text = pa.array(["16", "-1", "0x10", " 17 ", "+5", None, "9223372036854775808"], pa.string())
    assert normalisation._parse_ts_text(text).cast(pa.int64()).to_pylist() == [16, -1, None, 17, None, None, None]
    assert normalisation._parse_ts_text(pa.array(["16", "0X1A"])).cast(pa.int64()).to_pylist() == [16, None]


def test_side_spellings_map_to_b_and_s() -> None:
    values = pa.array(["B", "S", None, "b", "BUY", "sell", "A", " s ", "x", ""], pa.string())
    assert inputs.normalise_side(values).to_pylist() == ["B", "S", None, "B", "B", "S", "S", "S", None, None]
    assert inputs.normalise_side(pa.array(["B", None, "S"])).to_pylist() == ["B", None, "S"]
    assert inputs.normalise_side(pa.array([None, None], pa.string())).to_pylist() == [None, None]
