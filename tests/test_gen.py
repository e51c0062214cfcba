"""Tests of the synthetic data generator (`tickq.gen`) and of the reference computation."""

from __future__ import annotations

import gzip
import re
from datetime import date
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from tests.helpers import decoded
from tickq.gen import SCHEMA, generate, security_codes

try:
    from tests.reference import (
        TABLES,
        accepted_rows,
        assert_tables_equal,
        reference_counts,
        reference_tables,
    )
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from reference import (  # type: ignore[no-redef]
        TABLES,
        accepted_rows,
        assert_tables_equal,
        reference_counts,
        reference_tables,
    )

SYD = "Australia/Sydney"
ISO_NS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$")


def _read_csv(path: str | Path) -> pa.Table:
    return pa_csv.read_csv(
        path,
        convert_options=pa_csv.ConvertOptions(
            strings_can_be_null=True, column_types={"ts": pa.timestamp("ns", tz="UTC")}
        ),
    )


def _read_all(files: list[str]) -> pa.Table:
    tables = [pq.read_table(f) if f.endswith(".parquet") else _read_csv(f) for f in files]
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------- gen


def test_security_codes() -> None:
    codes = security_codes(200)
    assert len(set(codes)) == 200
    assert "BRK.B" in security_codes(10)
    assert "BRK.B" not in security_codes(9)
    assert all(re.fullmatch(r"[A-Z]{3}", c) for c in codes if c != "BRK.B")
    assert security_codes(5) == codes[:5]
    assert len(set(security_codes(20_000))) == 20_000


def test_parquet_layout_schema_and_realism(tmp_path: Path) -> None:
    out = tmp_path / "data"
    summary = generate(
        str(out), ["2024-01", "2024-02"], securities=12, rows=20_000, files_per_month=2
    )
    assert summary["rows_per_month"] == {"2024-01": 20_000, "2024-02": 20_000}
    assert summary["rows"] == 40_000
    expected = [out / m / f"part-{i:04d}.parquet" for m in ("2024-01", "2024-02") for i in range(2)]
    assert summary["files"] == [str(p) for p in expected]
    assert sorted(p for p in out.rglob("*") if p.is_file()) == expected
    assert summary["securities"] == security_codes(12)
    assert "BRK.B" in summary["securities"]
    assert summary["trade_dates"][0] == "2024-01-01"
    assert len(summary["trade_dates"]) == 23 + 21

    for path in expected:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow == SCHEMA
        assert pf.schema_arrow.field("security").type == pa.string()  # not dictionary
        meta = pf.metadata.row_group(0).column(1)
        assert meta.path_in_schema == "security" and not meta.has_dictionary_page
        ts = pf.read(columns=["ts"]).column("ts").cast(pa.int64()).to_numpy()
        assert (np.diff(ts) >= 0).all(), "rows are sorted by ts within a file"

    df = pq.read_table(out / "2024-01").to_pandas()
    assert len(df) == 20_000
    local = df["ts"].dt.tz_convert(SYD)
    minutes = local.dt.hour * 60 + local.dt.minute
    assert minutes.between(10 * 60, 16 * 60 - 1).all()
    assert (local.dt.day_of_week < 5).all() and (local.dt.month == 1).all()
    assert local.dt.date.nunique() == 23
    hourly = local.dt.hour.value_counts()
    assert hourly[10] > 1.5 * hourly[12] and hourly[15] > 1.5 * hourly[12]  # U-shaped
    assert (df["size"] >= 1).all() and df["size"].max() > 50 * df["size"].median()
    assert set(df["side"]) == {"B", "S"}
    assert 0.08 <= (df["venue"] == "CP").mean() <= 0.17
    assert 0 < df["venue"].isna().sum() < 0.02 * len(df)
    assert 0.01 <= df["participant"].isna().mean() <= 0.03
    assert df["participant"].dropna().str.fullmatch(r"P(0[1-9]|1[0-5])").all()
    shares = df["participant"].value_counts(normalize=True)
    assert shares.iloc[0] > 4 * shares.iloc[-1]
    per_sec = df["security"].value_counts()
    assert per_sec.iloc[0] > 5 * per_sec.iloc[-1], "some securities are much busier"
    levels = df.groupby("security")["price"].median()
    assert levels.max() / levels.min() > 10
    assert (df["price"] > 0).all() and np.isfinite(df["price"]).all()


@pytest.mark.parametrize("fmt", ["csv", "csv.gz"])
def test_csv_formats_match_parquet(tmp_path: Path, fmt: str) -> None:
    pq_sum = generate(str(tmp_path / "pq"), ["2024-03"], rows=5_000, seed=3)
    csv_sum = generate(str(tmp_path / "csv"), ["2024-03"], rows=5_000, seed=3, fmt=fmt)
    assert csv_sum["files"] == [str(tmp_path / "csv" / f"2024-03.{fmt}")]
    opener: Any = gzip.open if fmt == "csv.gz" else open
    with opener(csv_sum["files"][0], "rt") as f:
        header = f.readline().strip()
        first = f.readline().strip().split(",")
    assert header.replace('"', "").split(",") == SCHEMA.names
    assert ISO_NS_Z.match(first[0]), first[0]
    assert _read_all(csv_sum["files"]).equals(_read_all(pq_sum["files"]))


def _read_month(out: Path, month: str) -> pa.Table:
    """A month as the worker reads it: `month_files` + `read_batches` + `normalise`."""
    from shared.inputs import ALL_COLUMNS, month_files, normalise, read_batches
    from shared.storage import open_storage

    storage = open_storage(str(out))
    tables = []
    for file in month_files(storage, month):
        for batch in read_batches(storage, file, ALL_COLUMNS, batch_rows=1_000):
            table, valid = normalise(batch, SYD)
            assert pc.all(valid).as_py()
            tables.append(decoded(table))
    return pa.concat_tables(tables)


@pytest.mark.parametrize(("fmt", "files"), [("dbn", 1), ("dbn.zst", 1), ("dbn.zst", 2)])
def test_dbn_formats_match_parquet(tmp_path: Path, fmt: str, files: int) -> None:
    """DBN carries ts, security, price (to 1e-9), size and side of the same rows as Parquet."""
    month = "2024-01"  # the first session (1 Jan, 10:00 Sydney) is on 31 Dec in UTC
    generate(str(tmp_path / "pq"), [month], rows=6_000, securities=12, seed=5)
    dbn_sum = generate(str(tmp_path / "dbn"), [month], rows=6_000, securities=12, seed=5, fmt=fmt,
                       files_per_month=files)  # fmt: skip
    if files == 1:
        assert dbn_sum["files"] == [str(tmp_path / "dbn" / f"{month}.{fmt}")]
    else:
        assert dbn_sum["files"] == [str(tmp_path / "dbn" / month / f"part-{i:04d}.{fmt}") for i in range(files)]
    if fmt == "dbn.zst":
        assert Path(dbn_sum["files"][0]).read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    want = _read_month(tmp_path / "pq", month)
    got = _read_month(tmp_path / "dbn", month)
    assert got.num_rows == want.num_rows == 6_000
    for name in ("ts", "security", "size", "side", "trade_date"):
        assert got.column(name).equals(want.column(name)), name
    np.testing.assert_allclose(got.column("price").to_numpy(), want.column("price").to_numpy(), rtol=1e-9, atol=0)
    assert got.column("participant").null_count == got.num_rows
    assert set(got.column("venue").to_pylist()) == {"XNAS"}
    # Same seed, same bytes.
    again = generate(str(tmp_path / "again"), [month], rows=6_000, securities=12, seed=5, fmt=fmt,
                     files_per_month=files)  # fmt: skip
    assert [Path(f).read_bytes() for f in again["files"]] == [Path(f).read_bytes() for f in dbn_sum["files"]]


def test_deterministic_and_independent_of_parts(tmp_path: Path) -> None:
    a = generate(str(tmp_path / "a"), ["2024-05"], rows=8_000, seed=11)
    b = generate(str(tmp_path / "b"), ["2024-05"], rows=8_000, seed=11)
    c = generate(str(tmp_path / "c"), ["2024-05"], rows=8_000, seed=12)
    d = generate(str(tmp_path / "d"), ["2024-05"], rows=8_000, seed=11, files_per_month=3)
    assert Path(a["files"][0]).read_bytes() == Path(b["files"][0]).read_bytes()
    assert not _read_all(a["files"]).equals(_read_all(c["files"]))
    assert len(d["files"]) == 3
    parts = [pq.read_metadata(f).num_rows for f in d["files"]]
    assert sum(parts) == 8_000 and min(parts) > 2_000
    assert _read_all(d["files"]).equals(_read_all(a["files"]))
    # A month does not depend on which other months are generated with it.
    e = generate(str(tmp_path / "e"), ["2024-04", "2024-05"], rows=8_000, seed=11)
    assert _read_all(e["files"][1:]).equals(_read_all(a["files"]))


def test_stale_files_are_replaced(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generate(str(out), ["2024-01"], rows=1_000, fmt="csv")
    generate(str(out), ["2024-01"], rows=1_000, files_per_month=3)
    summary = generate(str(out), ["2024-01"], rows=1_000)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "2024-01/part-0000.parquet"
    ]
    assert len(summary["removed"]) == 2


def test_tiny_and_empty_months(tmp_path: Path) -> None:
    s = generate(str(tmp_path / "t"), ["2024-02"], rows=3, files_per_month=2)
    assert sum(pq.read_metadata(f).num_rows for f in s["files"]) == 3
    s = generate(str(tmp_path / "z"), ["2024-02"], rows=0, fmt="csv.gz")
    assert _read_all(s["files"]).num_rows == 0


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        generate(str(tmp_path), ["2024-13"])
    with pytest.raises(ValueError, match="format"):
        generate(str(tmp_path), ["2024-01"], fmt="json")
    with pytest.raises(ValueError, match="time zone"):
        generate(str(tmp_path), ["2024-01"], market_tz="Mars/Olympus")


def test_gen_to_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server")
    import boto3

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="gen")
        summary = generate(
            "s3://gen/raw", ["2024-01"], rows=2_000, endpoint_url=endpoint, fmt="csv.gz"
        )
        assert summary["files"] == ["s3://gen/raw/2024-01.csv.gz"]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="gen")["Contents"]]
        assert keys == ["raw/2024-01.csv.gz"]
        local = tmp_path / "2024-01.csv.gz"
        local.write_bytes(s3.get_object(Bucket="gen", Key=keys[0])["Body"].read())
        assert _read_csv(local).num_rows == 2_000
    finally:
        server.stop()


# --------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("gen") / "raw"
    summary = generate(str(out), ["2024-03", "2024-04"], securities=15, rows=15_000, seed=5)
    return out, summary


def test_reference_is_self_consistent(generated: tuple[Path, dict[str, Any]]) -> None:
    out, summary = generated
    months = summary["months"]
    t = reference_tables(str(out), months, market_tz=SYD)
    counts = reference_counts(str(out), months, market_tz=SYD)
    assert counts["rows_read"] == counts["rows_accepted"] == 30_000
    assert counts["rows_rejected"] == counts["rows_filtered"] == 0
    for name, (keys, values) in TABLES.items():
        assert list(t[name].columns) == keys + values, name
        assert int(t[name]["records"].sum()) == 30_000, name
        assert t[name]["records"].dtype == np.int64
    total_volume = int(t["security_daily"]["volume"].sum())
    total_notional = float(t["security_daily"]["notional"].sum())
    for name in TABLES:
        assert int(t[name]["volume"].sum()) == total_volume
        assert float(t[name]["notional"].sum()) == pytest.approx(total_notional, rel=1e-12)
    for name in ("by_participant", "by_venue"):
        assert float(t[name]["notional_share"].sum()) == pytest.approx(1.0, rel=1e-12)
        assert t[name].iloc[-1, 0] is None, "the null group sorts last"
    sd, bs = t["security_daily"], t["by_security"]
    per_sec = sd.groupby("security")["records"].sum()
    assert per_sec.to_dict() == dict(zip(bs["security"], bs["records"], strict=True))
    assert bs["days"].tolist() == sd.groupby("security").size().tolist()
    assert t["by_date"]["securities"].max() == 15
    assert set(t["by_hour"]["hour"]) == set(range(10, 16))
    assert [d.isoformat() for d in t["timeseries_daily"]["trade_date"]] == summary["trade_dates"]
    buy_sell = sd["buy_volume"] + sd["sell_volume"]
    assert (buy_sell == sd["volume"]).all()
    assert (sd["low"] <= sd["vwap"]).all() and (sd["vwap"] <= sd["high"]).all()
    assert (sd["first_ts"] <= sd["last_ts"]).all()
    assert str(sd["first_ts"].dtype) == "datetime64[ns, UTC]"
    assert isinstance(sd["trade_date"].iloc[0], date)
    assert t["by_size_bucket"]["size_bucket"].tolist() == sorted(t["by_size_bucket"]["size_bucket"])
    # Filters: accepted + filtered = read; tables only hold accepted rows.
    kw: dict[str, Any] = {
        "market_tz": SYD,
        "securities": summary["securities"][:4],
        "session": "10:00-12:30",
        "venues": ["CP"],
        "min_size": 100,
    }
    fc = reference_counts(str(out), months, **kw)
    ft = reference_tables(str(out), months, **kw)
    assert 0 < fc["rows_accepted"] < 30_000
    assert fc["rows_accepted"] + fc["rows_filtered"] == 30_000
    assert int(ft["by_security"]["records"].sum()) == fc["rows_accepted"]
    assert set(ft["by_venue"]["venue"]) == {"CP"}
    assert set(ft["by_hour"]["hour"]) <= {10, 11, 12}
    assert len(accepted_rows(str(out), months, **kw)) == fc["rows_accepted"]


def test_reference_same_for_every_format(
    tmp_path: Path, generated: tuple[Path, dict[str, Any]]
) -> None:
    out, summary = generated
    months = summary["months"]
    expected = reference_tables(str(out), months, market_tz=SYD)
    generate(str(tmp_path / "gz"), months, securities=15, rows=15_000, seed=5, fmt="csv.gz")
    assert_tables_equal(reference_tables(str(tmp_path / "gz"), months, market_tz=SYD), expected)


# ------------------------------------------------------------ reference on hand-made data

# Sydney leaves daylight saving on 2024-04-07 at 03:00 AEDT (UTC+11 -> UTC+10).
HAND_CSV = """\
ts,security,price,size,side,participant,venue,note
2024-04-06T13:30:00Z,BHP,10,100,B,P01,CP,r1 00:30 AEDT on 04-07
2024-04-06T15:30:00Z,BHP,11,200,buy,P02,TM,r2 02:30 AEDT
2024-04-06T23:30:00Z,BHP,12,300,a,,TM,r3 09:30 AEST
2024-04-07T13:30:00Z,BHP,9.5,1000,Sell,P01,CP,r4 23:30 AEST on 04-07
2024-04-07T14:30:00Z,CBA,100,500,X,P02,,r5 00:30 AEST on 04-08
1712530800000000000,BHP,101,99,s,P03,CP,r6 integer ns = 2024-04-07T23:00Z
2024-04-08T10:15:00+10:00,CBA,102,10000,B,P01,TM,r7 offset
2024-04-07T00:00:00Z,BHP,0,100,B,P01,CP,rejected: price 0
2024-04-07T00:00:00Z,BHP,10,-5,B,P01,CP,rejected: size <= 0
2024-04-07T00:00:00Z,,10,100,B,P01,CP,rejected: empty security
2024-04-07T00:00:00Z,BHP,inf,100,B,P01,CP,rejected: price not finite
2024-04-07T00:00:00Z,BHP,10,1.5,B,P01,CP,rejected: size not an integer
,BHP,10,100,B,P01,CP,rejected: no ts
"""


@pytest.fixture()
def hand(tmp_path: Path) -> str:
    root = tmp_path / "input"
    (root / "2024-04" / "sub").mkdir(parents=True)
    (root / "2024-04.csv").write_text(HAND_CSV)
    # Naive microsecond timestamps (= UTC) and a trade_date column that overrides the ts date.
    pq.write_table(
        pa.table(
            {
                "ts": pa.array([pd.Timestamp("2024-04-08 01:00:00")], pa.timestamp("us")),
                "security": ["BRK.B"],
                "price": [200.5],
                "size": pa.array([10], pa.int32()),
                "side": ["SELL"],
                "participant": ["P03"],
                "venue": ["CP"],
                "trade_date": pa.array([date(2024, 4, 9)], pa.date32()),
            }
        ),
        root / "2024-04" / "a.parquet",
    )
    # Millisecond timestamps in another zone (the instant is 2024-04-08T02:00Z), no side.
    ny = pd.Timestamp("2024-04-08T02:00:00Z").tz_convert("America/New_York")
    pq.write_table(
        pa.table(
            {
                "ts": pa.array([ny], pa.timestamp("ms", tz="America/New_York")),
                "security": pa.array(["CBA"]).dictionary_encode(),
                "price": [100.0],
                "size": [100],
                "side": pa.array([None], pa.string()),
                "participant": pa.array([None], pa.string()),
                "venue": ["TM"],
            }
        ),
        root / "2024-04" / "sub" / "b.parquet",
    )
    (root / "2024-04" / ".tickq-tmp123").write_text("ignored")
    return str(root)


def _ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text).tz_convert("UTC")


def _frame(columns: list[str], rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    return pd.DataFrame([dict(zip(columns, r, strict=True)) for r in rows], columns=columns)


D7, D8, D9 = date(2024, 4, 7), date(2024, 4, 8), date(2024, 4, 9)
A_COLS = ["records", "volume", "notional", "vwap", "avg_size", "low", "high"]
A_COLS += ["buy_volume", "sell_volume", "first_ts", "last_ts"]
T_R1, T_R4, T_R5 = _ts("2024-04-06T13:30Z"), _ts("2024-04-07T13:30Z"), _ts("2024-04-07T14:30Z")
T_R6, T_P1, T_P2 = _ts("2024-04-07T23:00Z"), _ts("2024-04-08T01:00Z"), _ts("2024-04-08T02:00Z")
BHP_D7 = (4, 1600, 16300.0, 10.1875, 400.0, 9.5, 12.0, 300, 1300, T_R1, T_R4)
BHP_D8 = (1, 99, 9999.0, 101.0, 99.0, 101.0, 101.0, 0, 99, T_R6, T_R6)
BRK_D9 = (1, 10, 2005.0, 200.5, 10.0, 200.5, 200.5, 0, 10, T_P1, T_P1)
CBA_D8 = (3, 10600, 1080000.0, 1080000 / 10600, 10600 / 3, 100.0, 102.0, 10000, 0, T_R5, T_P2)
TOTAL = 1108304.0


def _hand_expected() -> dict[str, pd.DataFrame]:
    k = TABLES
    return {
        "security_daily": _frame(
            ["security", "trade_date", *A_COLS],
            [("BHP", D7, *BHP_D7), ("BHP", D8, *BHP_D8), ("BRK.B", D9, *BRK_D9),
             ("CBA", D8, *CBA_D8)],
        ),
        "by_security": _frame(
            ["security", *A_COLS, "days"],
            [("BHP", 5, 1699, 26299.0, 26299 / 1699, 339.8, 9.5, 101.0, 300, 1399, T_R1, T_R6, 2),
             ("BRK.B", *BRK_D9, 1), ("CBA", *CBA_D8, 1)],
        ),
        "by_date": _frame(
            ["trade_date", *A_COLS, "securities"],
            [(D7, *BHP_D7, 1),
             (D8, 4, 10699, 1089999.0, 1089999 / 10699, 2674.75, 100.0, 102.0, 10000, 99, T_R5,
              T_P2, 2),
             (D9, *BRK_D9, 1)],
        ),
        "by_participant": _frame(
            k["by_participant"][0] + k["by_participant"][1],
            [("P01", 3, 11100, 1030500.0, 1030500 / 11100, 1030500 / TOTAL),
             ("P02", 2, 700, 52200.0, 52200 / 700, 52200 / TOTAL),
             ("P03", 2, 109, 12004.0, 12004 / 109, 12004 / TOTAL),
             (None, 2, 400, 13600.0, 34.0, 13600 / TOTAL)],
        ),
        "by_hour": _frame(
            ["hour", "records", "volume", "notional", "vwap"],
            [(0, 2, 600, 51000.0, 85.0), (2, 1, 200, 2200.0, 11.0),
             (9, 2, 399, 13599.0, 13599 / 399), (10, 1, 10000, 1020000.0, 102.0),
             (11, 1, 10, 2005.0, 200.5), (12, 1, 100, 10000.0, 100.0), (23, 1, 1000, 9500.0, 9.5)],
        ),
        "by_size_bucket": _frame(
            k["by_size_bucket"][0] + k["by_size_bucket"][1],
            [(0, np.nan, 10000.0, 6, 1709, 28304.0), (1, 10000.0, 50000.0, 1, 100, 10000.0),
             (2, 50000.0, 200000.0, 1, 500, 50000.0), (5, 1000000.0, np.nan, 1, 10000, 1020000.0)],
        ),
        "by_venue": _frame(
            ["venue", "records", "volume", "notional", "notional_share"],
            [("CP", 4, 1209, 22504.0, 22504 / TOTAL), ("TM", 4, 10600, 1035800.0, 1035800 / TOTAL),
             (None, 1, 500, 50000.0, 50000 / TOTAL)],
        ),
        "timeseries_hourly": _frame(
            ["trade_date", "hour", "records", "volume", "notional", "vwap"],
            [(D7, 0, 1, 100, 1000.0, 10.0), (D7, 2, 1, 200, 2200.0, 11.0),
             (D7, 9, 1, 300, 3600.0, 12.0), (D7, 23, 1, 1000, 9500.0, 9.5),
             (D8, 0, 1, 500, 50000.0, 100.0), (D8, 9, 1, 99, 9999.0, 101.0),
             (D8, 10, 1, 10000, 1020000.0, 102.0), (D8, 12, 1, 100, 10000.0, 100.0),
             (D9, 11, 1, 10, 2005.0, 200.5)],
        ),
        "timeseries_daily": _frame(
            ["trade_date", "records", "volume", "notional", "vwap"],
            [(D7, 4, 1600, 16300.0, 10.1875), (D8, 4, 10699, 1089999.0, 1089999 / 10699),
             (D9, 1, 10, 2005.0, 200.5)],
        ),
    }  # fmt: skip


def test_reference_on_hand_made_input(hand: str) -> None:
    t = reference_tables(hand, ["2024-04"], market_tz=SYD)
    expected = _hand_expected()
    assert set(t) == set(expected)
    # Spot checks that do not rely on assert_tables_equal.
    sd = t["security_daily"]
    assert list(zip(sd["security"], sd["trade_date"], strict=True)) == [
        ("BHP", D7), ("BHP", D8), ("BRK.B", D9), ("CBA", D8)
    ]  # fmt: skip
    assert sd["records"].tolist() == [4, 1, 1, 3]
    assert sd["buy_volume"].tolist() == [300, 0, 0, 10000]
    assert sd["sell_volume"].tolist() == [1300, 99, 10, 0]
    assert sd["first_ts"].tolist()[0] == T_R1 and sd["last_ts"].tolist()[3] == T_P2
    assert t["by_hour"]["hour"].tolist() == [0, 2, 9, 10, 11, 12, 23]
    assert t["by_participant"]["participant"].tolist() == ["P01", "P02", "P03", None]
    assert t["by_venue"]["venue"].tolist() == ["CP", "TM", None]
    assert t["by_size_bucket"]["size_bucket"].tolist() == [0, 1, 2, 5]
    assert float(t["by_venue"]["notional"].sum()) == TOTAL
    assert_tables_equal(t, expected)
    assert reference_counts(hand, ["2024-04"], market_tz=SYD) == {
        "rows_read": 15,
        "rows_accepted": 9,
        "rows_rejected": 6,
        "rows_filtered": 0,
        "rows_read_in_scope": 13,  # the rows without a security or a ts belong to no job
        "rows_rejected_in_scope": 4,
    }


def test_reference_in_utc(hand: str) -> None:
    t = reference_tables(hand, ["2024-04"])
    daily = t["timeseries_daily"]
    assert daily["trade_date"].tolist() == [date(2024, 4, 6), D7, D8, D9]
    assert daily["records"].tolist() == [3, 3, 2, 1]
    assert t["by_hour"]["hour"].tolist() == [0, 1, 2, 13, 14, 15, 23]
    assert t["by_hour"]["records"].tolist() == [1, 1, 1, 2, 1, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "records", "by_security"),
    [
        ({"session": "10:00-16:00"}, 3, {"BRK.B": 1, "CBA": 2}),  # r3 is 09:30 wall clock
        ({"session": "23:00-01:00"}, 3, {"BHP": 2, "CBA": 1}),
        ({"session": "00:30-02:30"}, 2, {"BHP": 1, "CBA": 1}),  # end exclusive
        ({"participants": "P01,P02", "venues": ["CP", "TM"]}, 4, {"BHP": 3, "CBA": 1}),
        ({"participants": ["P03"]}, 2, {"BHP": 1, "BRK.B": 1}),
        ({"min_size": 100, "max_size": 1000}, 6, {"BHP": 4, "CBA": 2}),
        ({"dates": ["2024-04-08"]}, 4, {"BHP": 1, "CBA": 3}),
        ({"dates": "2024-04-08..2024-04-09"}, 5, {"BHP": 1, "BRK.B": 1, "CBA": 3}),
        ({"securities": "CBA"}, 3, {"CBA": 3}),
        ({"securities": ["XYZ"]}, 0, {}),
    ],
)
def test_reference_filters(
    hand: str, kwargs: dict[str, Any], records: int, by_security: dict[str, int]
) -> None:
    t = reference_tables(hand, ["2024-04"], market_tz=SYD, **kwargs)
    bs = t["by_security"]
    assert dict(zip(bs["security"], bs["records"].tolist(), strict=True)) == by_security
    for name, (keys, values) in TABLES.items():
        assert list(t[name].columns) == keys + values
        assert int(t[name]["records"].sum()) == records
    c = reference_counts(hand, ["2024-04"], market_tz=SYD, **kwargs)
    assert (c["rows_accepted"], c["rows_rejected"], c["rows_filtered"]) == (records, 6, 9 - records)


def test_reference_scope_counts(hand: str) -> None:
    c = reference_counts(hand, ["2024-04"], market_tz=SYD, securities="BHP")
    assert (c["rows_read_in_scope"], c["rows_rejected_in_scope"]) == (9, 4)
    c = reference_counts(hand, ["2024-04"], market_tz=SYD, securities="CBA")
    assert (c["rows_read_in_scope"], c["rows_rejected_in_scope"]) == (3, 0)


def test_reference_custom_buckets(hand: str) -> None:
    t = reference_tables(hand, ["2024-04"], market_tz=SYD, size_buckets="5000")
    b = t["by_size_bucket"]
    assert b["size_bucket"].tolist() == [0, 1]
    assert b["bucket_lower"].isna().tolist() == [True, False]
    assert b["bucket_upper"].isna().tolist() == [False, True]
    assert b["bucket_upper"][0] == b["bucket_lower"][1] == 5000.0
    assert b["records"].tolist() == [4, 5]
    assert b["volume"].tolist() == [610, 11699]
    assert b["notional"].tolist() == [8805.0, 1099499.0]


def test_reference_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        reference_tables(str(tmp_path), ["2024-01"])
    (tmp_path / "2024-01.csv").write_text("ts,security,price\n2024-01-02T00:00:00Z,A,1\n")
    with pytest.raises(ValueError, match="size"):
        reference_tables(str(tmp_path), ["2024-01"])


def test_assert_tables_equal(hand: str) -> None:
    expected = reference_tables(hand, ["2024-04"], market_tz=SYD)

    def changed(name: str, fn: Any) -> dict[str, pd.DataFrame]:
        tables = {k: v.copy() for k, v in expected.items()}
        tables[name] = fn(tables[name].copy())
        return tables

    def fails(actual: dict[str, pd.DataFrame], pattern: str) -> None:
        with pytest.raises(AssertionError, match=pattern):
            assert_tables_equal(actual, expected)

    assert_tables_equal(expected, expected)

    def within_tolerance(f: pd.DataFrame) -> pd.DataFrame:
        return f.assign(notional=f["notional"] * (1 + 1e-12))

    assert_tables_equal(changed("by_security", within_tolerance), expected)

    def as_text(f: pd.DataFrame) -> pd.DataFrame:  # as read back from CSV
        return f.assign(
            trade_date=[d.isoformat() for d in f["trade_date"]],
            first_ts=[t.isoformat() for t in f["first_ts"]],
            last_ts=[t.tz_localize(None) for t in f["last_ts"]],  # naive = UTC
            security=pd.array(f["security"].tolist(), dtype="string"),
        )

    assert_tables_equal(changed("security_daily", as_text), expected)
    fails(
        changed("by_security", lambda f: f.assign(notional=f["notional"] * (1 + 1e-8))),
        r"by_security \{'security': 'BHP'\} notional",
    )
    fails(changed("by_hour", lambda f: f.assign(volume=f["volume"] + 1)), "by_hour.*volume")
    fails(
        changed("by_hour", lambda f: f.assign(volume=f["volume"].astype(float))),
        "integers must be exact",
    )
    fails(changed("by_venue", lambda f: f.iloc[::-1].reset_index(drop=True)), "not in key order")
    fails(changed("by_venue", lambda f: f.iloc[:-1]), r"missing keys \[\(None,\)\]")
    fails(
        changed("by_participant", lambda f: f.assign(participant=["P01", "P02", "P03", "P04"])),
        "unexpected keys",
    )
    fails(changed("by_date", lambda f: f.drop(columns=["securities"])), "columns differ")
    fails(
        changed("by_size_bucket", lambda f: f.assign(bucket_lower=f["bucket_lower"].fillna(0))),
        r"by_size_bucket: unexpected keys \[\(0, 0.0, 10000.0\)\]",
    )
    fails(
        changed("timeseries_daily", lambda f: f.assign(vwap=[None, 1.0, 2.0])),
        r"vwap: actual None",
    )
    fails({k: v for k, v in expected.items() if k != "by_hour"}, "by_hour: table missing")
    sd = changed(
        "security_daily",
        lambda f: f.assign(first_ts=f["first_ts"] + pd.Timedelta(1, "ns")),
    )
    fails(sd, "first_ts")


def test_reference_sydney_wall_clock_hours(tmp_path: Path) -> None:
    """Every hour of the DST change day maps to its wall-clock hour (02 occurs twice)."""
    root = tmp_path / "in"
    root.mkdir()
    start = pd.Timestamp("2024-04-06T13:00Z")
    stamps = [start + pd.Timedelta(hours=h) for h in range(25)]
    lines = ["ts,security,price,size"] + [f"{s.isoformat()},AAA,1.0,1" for s in stamps]
    (root / "2024-04.csv").write_text("\n".join(lines) + "\n")
    t = reference_tables(str(root), ["2024-04"], market_tz=SYD)
    hourly = t["timeseries_hourly"]
    zone = ZoneInfo(SYD)
    want: dict[tuple[date, int], int] = {}
    for s in stamps:
        local = s.to_pydatetime().astimezone(zone)
        want[(local.date(), local.hour)] = want.get((local.date(), local.hour), 0) + 1
    got = {
        (d, h): r
        for d, h, r in zip(hourly["trade_date"], hourly["hour"], hourly["records"], strict=True)
    }
    assert got == want
    assert got[(D7, 2)] == 2 and (D7, 0) in got and (D8, 0) not in got
