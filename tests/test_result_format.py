"""Batch result objects: columns (version 4, Arrow), or a header line naming the batch's jobs
then the jobs (version 3, JSON). Runs whose results were written as JSON lines or as one
document (version 2) aggregate the same as columns."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import aggregator.tables
from aggregator.tables import aggregate_run
from shared.errors import PermanentError
from shared.layout import (
    JobKey,
    RunLayout,
    batch_result_body,
    batch_result_header,
    batch_result_jobs,
    batch_result_table,
    batch_result_table_body,
    job_keys_csv,
)
from shared.messages import JobParams
from shared.storage import LocalStorage

MONTH = "2024-03"
KEYS = [JobKey(MONTH, security, f"2024-03-{day:02d}") for security in ("AAA", "BHP") for day in (4, 5, 6)]


def _entry(key: JobKey, records: int) -> dict[str, Any]:
    groups = {dim: {"keys": keys, "records": [records] * len(keys), "volume": [records * 10] * len(keys),
                    "notional": [records * 105.5] * len(keys)}
              for dim, keys in (("participant", ["P1", None]), ("venue", ["CP"]), ("hour", [10, 11]),
                                ("size_bucket", [0]))}
    day = {"records": 2 * records, "volume": 20 * records, "notional": 211.0 * records, "low": 10.0, "high": 11.0,
           "buy_volume": 10 * records, "sell_volume": 10 * records, "first_ts": 1709506800000000000,
           "last_ts": 1709528400000000000}
    counts = {"rows_read": 2 * records, "rows_accepted": 2 * records, "rows_rejected": 0, "rows_filtered": 0}
    return {"job_id": f"r:{key.month}:{key.security}:{key.date}", "security": key.security, "date": key.date,
            "counts": counts, "data": {"day": day, "groups": groups}}


def _header(finished_at: str) -> dict[str, Any]:
    return {"run_id": "r", "month": MONTH, "processor": "analytics", "worker": "test", "finished_at": finished_at}


def _columnar(header: dict[str, Any], entries: list[dict[str, Any]]) -> bytes:
    """What a worker of this version stores for `entries`: their columns."""
    from shared.processors.analytics import results_table

    return batch_result_table_body(header, [(e["job_id"], e["security"], e["date"]) for e in entries],
                                   [e["counts"] for e in entries], results_table([e["data"] for e in entries]))


def _uncompressed(body: bytes) -> bytes:
    """A columnar result object as earlier versions stored it: uncompressed, its header naming
    no jobs."""
    table = pa.ipc.open_stream(body).read_all()
    header = orjson.loads(table.schema.metadata[b"tickq.result"])
    del header["jobs"]
    table = table.replace_schema_metadata({b"tickq.result": orjson.dumps(header)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _stream(columns: dict[str, list[Any]], header: dict[str, Any]) -> bytes:
    """An Arrow stream with a tickq header whatever its columns."""
    table = pa.table(columns).replace_schema_metadata({b"tickq.result": orjson.dumps({"v": 4, **header})})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _run(root: Path, bodies: list[bytes], processor: str = "analytics", keys: list[JobKey] = KEYS) -> LocalStorage:
    storage, layout = LocalStorage(root), RunLayout("r")
    request = {"input": "/in", "output": str(root), "months": [MONTH], "processor": processor,
               "securities": None, "dates": None, "params": JobParams().as_json()}
    manifest = {"run_id": "r", "created_at": dt.datetime.now(dt.UTC).isoformat(), "request": request,
                "jobs": len(keys)}
    storage.write_bytes(layout.manifest, json.dumps(manifest).encode())
    storage.write_bytes(layout.job_keys, job_keys_csv(keys))
    for i, body in enumerate(bodies):
        storage.write_bytes(layout.batch_result(MONTH, "AAA", f"2024-03-0{i}"), body)
    for key in keys:
        storage.mark(layout.marker(key))
    return storage


def _tables(root: Path) -> dict[str, Any]:
    return {p.stem: pq.read_table(p).to_pylist() for p in sorted((root / "runs/r/aggregates").glob("*.parquet"))}


def test_header_names_the_jobs_and_the_second_line_holds_them() -> None:
    entries = [_entry(k, 3) for k in KEYS[:2]]
    body = batch_result_body(_header("2026-01-01T00:00:00+00:00"), entries)
    header, keys = batch_result_header(body)
    assert keys == [("AAA", "2024-03-04"), ("AAA", "2024-03-05")] and header["month"] == MONTH
    assert len(body.split(b"\n")[0]) < len(body) // 4  # the index reads a small part of each object
    assert batch_result_jobs(body)[1] == entries


def test_columnar_results_name_their_jobs_and_hold_the_header() -> None:
    entries = [_entry(k, 3) for k in KEYS[:2]]
    body = _columnar(_header("2026-01-01T00:00:00+00:00"), entries)
    header, keys = batch_result_header(body)
    assert keys == [("AAA", "2024-03-04"), ("AAA", "2024-03-05")]
    assert header["month"] == MONTH and header["v"] == 4 and header["worker"] == "test"
    assert header["jobs"] == [["AAA", "2024-03-04"], ["AAA", "2024-03-05"]]
    # Found without reading the columns: an object cut short after its schema still names them.
    assert batch_result_header(body[: len(body) // 2])[1] == keys
    assert batch_result_header(_uncompressed(body))[1] == keys  # an earlier object's, from its columns
    _, table = batch_result_table(body)
    assert table.column("participant_keys").to_pylist() == [["P1", None]] * 2
    assert table.column("rows_read").to_pylist() == [6, 6]


def test_json_and_one_document_results_aggregate_like_columns(tmp_path: Path) -> None:
    entries = [_entry(k, 1 + i) for i, k in enumerate(KEYS)]
    now = "2026-01-01T00:00:00+00:00"
    columns = [_columnar(_header(now), entries[:3]), _columnar(_header(now), entries[3:])]
    two_line = [batch_result_body(_header(now), entries[:3]), batch_result_body(_header(now), entries[3:])]
    one_document = [orjson.dumps({"v": 2, **_header(now), "jobs": entries[:3]}),
                    orjson.dumps({"v": 2, **_header(now), "jobs": entries[3:]})]
    mixed = [columns[0], one_document[1]]
    uncompressed = [_uncompressed(body) for body in columns]  # columns as earlier versions stored them
    for name, bodies in (("columns", columns), ("json", two_line), ("old", one_document), ("mixed", mixed),
                         ("uncompressed", uncompressed)):
        assert aggregate_run(_run(tmp_path / name, bodies), "r").summary["rows_read"] == sum(
            e["counts"]["rows_read"] for e in entries)
    expected = _tables(tmp_path / "columns")
    assert _tables(tmp_path / "json") == _tables(tmp_path / "old") == _tables(tmp_path / "mixed") == expected
    assert _tables(tmp_path / "uncompressed") == expected
    assert len(expected["security_daily"]) == len(KEYS)


def test_columnar_results_are_stored_compressed() -> None:
    keys = [JobKey(MONTH, f"S{s:03d}", f"2024-03-{day:02d}") for s in range(100) for day in (4, 5, 6)]
    body = _columnar(_header("2026-01-01T00:00:00+00:00"), [_entry(k, 1 + i % 7) for i, k in enumerate(keys)])
    plain = _uncompressed(body)
    assert len(body) < len(plain) / 2
    assert batch_result_table(body)[1].equals(batch_result_table(plain)[1])


@pytest.mark.parametrize("first_format, again_format", [(batch_result_body, batch_result_body),
                                                         (batch_result_body, _columnar), (_columnar, _columnar)])
def test_the_copy_finished_last_counts(tmp_path: Path, first_format: Any, again_format: Any) -> None:
    first = [_entry(k, 1) for k in KEYS]
    again = [_entry(KEYS[0], 100)]  # the first job ran again later (a replay, perhaps by a newer worker)
    storage = _run(tmp_path, [first_format(_header("2026-01-01T00:00:00+00:00"), first),
                              again_format(_header("2026-01-02T00:00:00+00:00"), again)])
    aggregate_run(storage, "r")
    daily = _tables(tmp_path)["security_daily"]
    assert daily[0]["records"] == 200 and [row["records"] for row in daily[1:]] == [2] * (len(KEYS) - 1)


@pytest.mark.parametrize("body, says", [
    (b"not json", "corrupt"),
    (orjson.dumps({"v": 9, "jobs": []}), "format 9"),
    (orjson.dumps({"v": 3, "month": MONTH, "jobs": [["AAA"]]}), "header is corrupt"),
    (orjson.dumps({"v": 3, "month": MONTH, "finished_at": "x", "jobs": [[k.security, k.date] for k in KEYS]})
     + b"\n{", "jobs are corrupt"),
    (_columnar(_header("2026-01-01T00:00:00+00:00"), [_entry(k, 1) for k in KEYS])[:-200], "columns are corrupt"),
    (_stream({"security": ["AAA"], "date": ["2024-03-04"]}, _header("x")), "corrupt .no job_id, rows_accepted"),
])
def test_a_bad_result_object_is_a_permanent_error_naming_it(tmp_path: Path, body: bytes, says: str) -> None:
    storage = _run(tmp_path, [body])
    with pytest.raises(PermanentError, match=rf"job results .*results/{MONTH}/AAA.*{says}"):
        aggregate_run(storage, "r")


def test_results_a_processor_does_not_read_are_a_permanent_error_naming_them(tmp_path: Path) -> None:
    # `extract` keeps a JSON result per job: column objects in its run are not its own.
    entries = [_entry(k, 1) for k in KEYS]
    storage = _run(tmp_path, [_columnar(_header("2026-01-01T00:00:00+00:00"), entries)], processor="extract")
    with pytest.raises(PermanentError, match=rf"job results .*results/{MONTH}/AAA.*holds columns, which processor "
                                             r"'extract' does not read"):
        aggregate_run(storage, "r")


def test_job_keys_round_trip_and_a_foreign_file_is_a_clear_error(tmp_path: Path) -> None:
    from shared.layout import read_job_keys

    storage, layout = LocalStorage(tmp_path), RunLayout("r")
    storage.write_bytes(layout.job_keys, job_keys_csv(KEYS))
    assert read_job_keys(storage, layout) == KEYS
    storage.write_bytes(layout.job_keys, b"a,b,c\n1,2,3\n")
    with pytest.raises(PermanentError, match="is not a job key file"):
        read_job_keys(storage, layout)


def test_each_result_object_is_read_once_and_the_tables_do_not_depend_on_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An object store charges (and waits) per GET: the index pass keeps the objects it read
    # for the results pass, within a memory budget, rather than reading each one twice.
    now = "2026-01-01T00:00:00+00:00"
    entries = [_entry(k, 1 + i) for i, k in enumerate(KEYS)]
    bodies = [_columnar(_header(now), entries[:2]), _columnar(_header(now), entries[2:4]),
              batch_result_body(_header(now), entries[4:])]
    reads: Counter[str] = Counter()
    read_bytes = LocalStorage.read_bytes

    def counting(self: LocalStorage, key: str) -> bytes:
        reads[key] += 1
        return read_bytes(self, key)

    monkeypatch.setattr(LocalStorage, "read_bytes", counting)
    aggregate_run(_run(tmp_path / "kept", bodies), "r")
    results = {key: n for key, n in reads.items() if f"/results/{MONTH}/" in key}
    assert len(results) == len(bodies) and set(results.values()) == {1}

    reads.clear()
    monkeypatch.setattr(aggregator.tables, "KEEP_BYTES", len(bodies[0]))  # room for the first only
    aggregate_run(_run(tmp_path / "tight", bodies), "r")
    assert sorted(n for key, n in reads.items() if f"/results/{MONTH}/" in key) == [1, 2, 2]
    assert _tables(tmp_path / "tight") == _tables(tmp_path / "kept")


def test_results_stored_a_job_an_object_aggregate_like_batches_holding_few_objects_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retried jobs, or jobs that came one at a time, leave an object each: a chunk of jobs
    puts their rows together as it goes instead of holding every object it took a row from."""
    keys = [JobKey(MONTH, security, f"2024-03-{day:02d}") for security in ("AAA", "BHP", "CBA")
            for day in range(4, 16)]
    entries = [_entry(k, 1 + i) for i, k in enumerate(keys)]
    now = "2026-01-01T00:00:00+00:00"
    aggregate_run(_run(tmp_path / "batches", [_columnar(_header(now), entries[i:i + 16])
                                              for i in range(0, len(entries), 16)], keys=keys), "r")
    held: list[int] = []
    chunk = aggregator.tables._ResultReader._chunk

    def counting(self: Any, placed: list[tuple[JobKey, pa.Table, int]]) -> pa.Table:
        held.append(len({id(table) for _, table, _ in placed}))
        return chunk(self, placed)

    monkeypatch.setattr(aggregator.tables._ResultReader, "_chunk", counting)
    monkeypatch.setattr(aggregator.tables, "LOOSE_TABLES", 4)
    aggregate_run(_run(tmp_path / "alone", [_columnar(_header(now), [e]) for e in entries], keys=keys), "r")

    assert _tables(tmp_path / "alone") == _tables(tmp_path / "batches")
    # One chunk: its rows put together five objects at a time (once more than four were apart),
    # then the last few objects'.
    blocks, rest = divmod(len(keys), 5)
    assert held == [blocks + rest] and blocks + rest < len(keys) // 4


def test_results_stored_by_date_aggregate_like_results_stored_by_security(tmp_path: Path) -> None:
    """Passes over parts of a month store objects of a few dates each: the aggregator, walking
    jobs security by security, takes its rows from several objects at once, out of their order."""
    entries = [_entry(k, 1 + i) for i, k in enumerate(KEYS)]
    now = "2026-01-01T00:00:00+00:00"
    by_security = [_columnar(_header(now), entries[:3]), _columnar(_header(now), entries[3:])]
    by_date = [_columnar(_header(now), [e for e in reversed(entries) if e["date"] == day])
               for day in ("2024-03-06", "2024-03-04", "2024-03-05")]
    aggregate_run(_run(tmp_path / "security", by_security), "r")
    aggregate_run(_run(tmp_path / "date", by_date), "r")
    expected = _tables(tmp_path / "security")
    assert _tables(tmp_path / "date") == expected
    assert [row["records"] for row in expected["security_daily"]] == [2 * (1 + i) for i in range(len(KEYS))]
