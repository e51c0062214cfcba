"""A month without an index is read about once per worker, not once per batch: the first
batch's pass computes the month's other expected jobs ahead, and their messages are served
from those results, stored exactly as they would have been computed then."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shared.inputs import month_files, pass_share
from shared.layout import JobKey, RunLayout, job_keys_csv
from shared.messages import JobMessage, JobParams
from shared.storage import LocalStorage, open_storage
from tests.helpers import discovered_keys, run_in_batches, stored_results
from tickq.gen import generate
from tickq.ingest import ingest
from worker.ahead import ResultsAhead
from worker.job import AHEAD_FROM_SHARE, JobOutcome, MonthListings, execute_batch

MONTH = "2024-03"
TZ = "Australia/Sydney"
BATCH = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ahead")
    generate(str(root / "raw"), [MONTH], securities=12, rows=60_000)
    # Raw Parquet in no order (no statistics can exclude a row group) and in more row groups
    # than a reader keeps between passes.
    for part in (root / "raw" / MONTH).glob("*.parquet"):
        table = pq.read_table(part)
        shuffled = table.take(np.random.default_rng(3).permutation(table.num_rows))
        pq.write_table(shuffled, part, row_group_size=4_096)
    generate(str(root / "csv"), [MONTH], securities=12, rows=60_000, fmt="csv")
    ingest(str(root / "raw"), str(root / "laid"), [MONTH], row_group_rows=8_192)
    return root


def _keys(source: str) -> list[JobKey]:
    return discovered_keys(source, MONTH, TZ)


def _run(source: str, output: str, keys: list[JobKey], listings: MonthListings, with_key_file: bool = True,
         run_id: str = "r1", params: JobParams | None = None) -> list[JobOutcome]:
    """Every job of `keys` in batches of `BATCH`, in key order; the outcomes, in key order."""
    layout = RunLayout(run_id)
    if with_key_file:
        open_storage(output).write_bytes(layout.month_job_keys(MONTH), job_keys_csv(keys))
    jobs = [JobMessage.build(run_id=run_id, month=MONTH, security=k.security, date=k.date, input=source,
                             output=output, processor="analytics", params=params or JobParams(market_tz=TZ))
            for k in keys]
    return run_in_batches(jobs, BATCH, listings)


def _month_bytes(source: Path) -> int:
    return sum(f.size for f in month_files(open_storage(str(source)), MONTH))


@pytest.mark.parametrize("fmt", ["raw", "csv"])
def test_a_month_without_an_index_is_read_once_and_every_job_stores_what_a_pass_of_its_own_gives(
    data: Path, tmp_path: Path, fmt: str
) -> None:
    source = str(data / fmt)
    keys = _keys(source)
    assert len(keys) > 10 * BATCH
    ahead: ResultsAhead[JobOutcome] = ResultsAhead()
    served = _run(source, str(tmp_path / "ahead"), keys, MonthListings(ahead=ahead))
    alone = _run(source, str(tmp_path / "alone"), keys, MonthListings())

    assert stored_results(str(tmp_path / "ahead")).equals(stored_results(str(tmp_path / "alone")))
    assert ahead.served == len(keys) - BATCH  # the first batch's pass computed everything else
    assert ahead.held_bytes() == 0  # each result is served once, then forgotten
    # The month was read once, and each job's bytes are its share of that read.
    assert sum(o.bytes_in for o in served) <= _month_bytes(data / fmt) * 1.05
    assert sum(o.bytes_in for o in alone) >= 10 * sum(o.bytes_in for o in served)  # once per batch
    for ahead_outcome, own in zip(served, alone, strict=True):
        counts = ("rows_read", "rows_accepted", "rows_rejected", "rows_filtered", "files")
        assert [getattr(ahead_outcome, c) for c in counts] == [getattr(own, c) for c in counts]


def test_an_ingested_month_is_not_read_whole(data: Path, tmp_path: Path) -> None:
    source = data / "laid"
    keys = _keys(str(source))
    storage = open_storage(str(source))
    files = month_files(storage, MONTH)
    few = sorted({k.security for k in keys})[:2]
    assert pass_share(storage, files, few, None) < AHEAD_FROM_SHARE
    assert pass_share(open_storage(str(data / "raw")), month_files(open_storage(str(data / "raw")), MONTH),
                      few, None) == 1.0

    ahead: ResultsAhead[JobOutcome] = ResultsAhead()
    outcomes = _run(str(source), str(tmp_path / "out"), keys, MonthListings(ahead=ahead))
    assert ahead.served == 0  # each batch read its own row groups
    assert sum(o.bytes_in for o in outcomes) < _month_bytes(source) * 2


def test_without_the_month_key_file_or_past_the_budget_each_batch_makes_its_own_pass(
    data: Path, tmp_path: Path
) -> None:
    source = str(data / "raw")
    keys = _keys(source)[: 4 * BATCH]
    reference = _run(source, str(tmp_path / "ref"), keys, MonthListings())

    no_keys: ResultsAhead[JobOutcome] = ResultsAhead()
    _run(source, str(tmp_path / "no-keys"), keys, MonthListings(ahead=no_keys), with_key_file=False)
    tiny: ResultsAhead[JobOutcome] = ResultsAhead(budget_bytes=1024)
    _run(source, str(tmp_path / "tiny"), keys, MonthListings(ahead=tiny))

    assert no_keys.served == 0 and tiny.served == 0
    expected = stored_results(str(tmp_path / "ref"))
    assert stored_results(str(tmp_path / "no-keys")).equals(expected)
    assert stored_results(str(tmp_path / "tiny")).equals(expected)
    assert len(reference) == len(keys)


def test_results_are_kept_per_run_and_parameters(data: Path, tmp_path: Path) -> None:
    source = str(data / "raw")
    keys = _keys(source)[: 3 * BATCH]
    ahead: ResultsAhead[JobOutcome] = ResultsAhead()
    listings = MonthListings(ahead=ahead)
    output = str(tmp_path / "out")
    _run(source, output, keys[:BATCH], listings, run_id="r1")  # computes the rest of r1 ahead
    # Another run with other parameters over the same month: nothing of r1 may serve it.
    other = JobParams(market_tz=TZ, min_size=500)
    _run(source, output, keys[BATCH:], listings, run_id="r2", params=other)
    _run(source, str(tmp_path / "ref"), keys[BATCH:], MonthListings(), run_id="r2", params=other)

    assert stored_results(output, "r2").equals(stored_results(str(tmp_path / "ref"), "r2"))
    assert ahead.served == len(keys) - 2 * BATCH  # r2's own pass, not r1's results


def test_two_slots_of_one_worker_read_a_month_once(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = str(data / "raw")
    keys = _keys(source)
    output = str(tmp_path / "out")
    layout = RunLayout("r1")
    open_storage(output).write_bytes(layout.month_job_keys(MONTH), job_keys_csv(keys))
    opened: list[str] = []
    lock = threading.Lock()
    original = LocalStorage.open_read

    def open_read(self: LocalStorage, key: str):  # type: ignore[no-untyped-def]
        with lock:
            opened.append(key)
        return original(self, key)

    monkeypatch.setattr(LocalStorage, "open_read", open_read)
    jobs = [JobMessage.build(run_id="r1", month=MONTH, security=k.security, date=k.date, input=source,
                             output=output, processor="analytics", params=JobParams(market_tz=TZ)) for k in keys]
    listings = MonthListings(ahead=ResultsAhead())
    batches = [jobs[i:i + BATCH] for i in range(0, len(jobs), BATCH)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda batch: execute_batch(batch, s3_endpoint_url=None, worker_id="test",
                                                            listings=listings), batches))

    assert all(isinstance(r, JobOutcome) for batch in results for r in batch)
    files = month_files(open_storage(source), MONTH)
    reads_per_file = {f.key: sum(1 for k in opened if k == f.key) for f in files}
    assert all(n <= 2 for n in reads_per_file.values()), reads_per_file  # the footer, then one pass
    marked = {o.key for o in open_storage(output).list(layout.succeeded_prefix)}
    assert marked == {layout.marker(k) for k in keys}


def test_an_unreadable_month_key_file_costs_only_the_shortcut(data: Path, tmp_path: Path) -> None:
    source = str(data / "raw")
    keys = _keys(source)[: 2 * BATCH]
    output = str(tmp_path / "out")
    open_storage(output).write_bytes(RunLayout("r1").month_job_keys(MONTH), b"not,a,key,file\n")
    ahead: ResultsAhead[JobOutcome] = ResultsAhead()
    outcomes = _run(source, output, keys, MonthListings(ahead=ahead), with_key_file=False)

    assert len(outcomes) == len(keys) and ahead.served == 0
    _run(source, str(tmp_path / "ref"), keys, MonthListings())
    assert stored_results(output).equals(stored_results(str(tmp_path / "ref")))


def test_one_pass_at_a_time_computes_ahead_and_ordinary_passes_never_take_the_turn() -> None:
    ahead: ResultsAhead[JobOutcome] = ResultsAhead()
    with ahead.widening(False) as ordinary:  # e.g. a batch of an ingested month, running
        assert not ordinary
        with ahead.widening() as first:
            assert first  # a raw month's pass elsewhere may still widen
            with ahead.widening() as second:
                assert not second  # but only one at a time: memory holds one widened pass
    with ahead.widening() as again:
        assert again
