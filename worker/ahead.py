"""A month without an index is read about once per run, not once per batch or per worker.

On a month laid out by `tickq ingest`, a batch of jobs reads only the row groups of its
securities. On a month that is not (raw CSV, DBN, Parquet in any order), every batch reads
the whole month (or, in time order, the days of its jobs), so a run of N batches would read
it N times. There, the first batch of the month claims it for its run (an object created only
where none exists: of racing workers exactly one wins), and its pass computes every job of the
month the run expects and has not done yet (the month's key file, written by the producer) and
stores their results and markers as passes of their own would have. A month is claimed in
parts (`month_parts`): in time order, parts of whole dates of about `PART_JOBS` jobs, whose
passes read only their dates' row groups, so that several workers compute one month side by
side; sorted by security in row groups (or CSV slices) of hundreds of jobs each, where a
batch's own read would decode about as much of its neighbours' rows as of its own, parts of
whole securities alike; otherwise parts of up to `MAX_JOBS_AHEAD` jobs in key order. A batch
claims each part no one has, those holding its own jobs first; batches whose parts are all
claimed elsewhere wait for those passes to be done and then find their jobs stored: their
messages are acked as already done.

Nothing is lost: a message is acked only once its job's result and marker are stored. A pass
that fails deletes its claim; a claimed pass renews its claim as it goes, and a claim not
renewed for `CLAIM_STALE_S` by the store's own clock (its worker died; the workers' clocks
need not agree) is no longer waited for: a batch waiting on it,
or the next to claim the part, takes the claim over and makes the pass again (as a waiting
batch does when a failed pass released its claim). A claim that its worker could not delete
(the store failing too) is taken back by that worker's next batch of the month, which makes
the pass again, rather than left for everyone, its worker included, to wait out; and a
waiting batch takes a look the store fails as no news, not as its own failure.

Memory stays bounded: a claimed pass holds the partial results of up to `MAX_JOBS_AHEAD` jobs
(a few KB each while the pass runs, for analytics), and one such pass runs in a process at a
time.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

from shared.errors import PermanentError, is_transient
from shared.layout import JobKey, RunLayout
from shared.metrics import get_logger
from shared.storage import Storage

# The most jobs one pass computes: a month of 500 securities has about 10,500.
MAX_JOBS_AHEAD = 12_000
# A month in time order is split into parts of whole dates, of about this many jobs each (one
# sorted by security, of whole securities): a pass over a few dates reads only their row
# groups, so the parts' passes can run on several workers at once and the month is still read
# about once. Each part costs a pass its set-up and the row groups it shares with the next; a
# month of 500 securities makes four parts, one of 200 securities two. (Parts of 5,500 jobs,
# two for 500 securities, were no quicker on that month, and left one worker to compute a
# month of 200 securities alone: 17 % slower to its last job on two workers; bench/RESULTS.md.)
PART_JOBS = 2_750
# And of about this many rows at most: a month of few securities and many rows a job (50
# securities over 20 M rows: 1,050 jobs) is split as one of many securities, rather than
# computed in one part by one worker.
PART_ROWS = 5_000_000
# A claimed pass renews its claim this often; a claim not renewed for CLAIM_STALE_S (six
# renewals missed) is taken to have died with its worker, and its part's pass is made again.
CLAIM_RENEW_S = 5.0
CLAIM_STALE_S = 30.0
# A waiting batch looks for the pass's `.done` after WAIT_POLL_S, then less and less often, up
# to every WAIT_POLL_MAX_S: two HEAD requests a look on S3, from every batch that waits, while
# a pass over a large month runs for minutes; and the month's other jobs, all stored by then,
# wait behind that batch for half a look on average after the pass ends.
WAIT_POLL_S = 0.1
WAIT_POLL_MAX_S = 0.25
WAIT_FAILING_MAX_S = 4.0  # between looks while the store fails them
# A failed pass deletes its claim in up to RELEASE_TRIES tries, RELEASE_PAUSE_S, then twice
# that, apart (a store failing the pass may be failing briefly).
RELEASE_TRIES = 3
RELEASE_PAUSE_S = 0.5
_pause = time.sleep  # how waiting and releasing sleep (a test replaces it)


def month_parts(keys: Sequence[JobKey], by_date: bool, by_security: bool = False, rows: int = 0) -> list[list[JobKey]]:
    """A month's expected jobs (`keys`, in key order) in the parts that passes claim, each in
    key order: with `by_date`, whole dates of about `PART_JOBS` jobs together (and, of a month
    of `rows` rows, about `PART_ROWS` rows at most), in date order; with `by_security`, whole
    securities alike; else, and within a date or security of more than `MAX_JOBS_AHEAD` jobs,
    up to that many jobs."""
    if not (by_date or by_security):
        return [list(keys[i:i + MAX_JOBS_AHEAD]) for i in range(0, len(keys), MAX_JOBS_AHEAD)]
    group: Callable[[JobKey], str] = (lambda key: key.date) if by_date else (lambda key: key.security)
    per_group = Counter(group(key) for key in keys)
    count = min(len(per_group), max(-(-len(keys) // PART_JOBS), -(-rows // PART_ROWS)))
    part_of: dict[str, int] = {}
    placed = 0
    for value in sorted(per_group):  # each date (security) joins the part its first job falls in, by count
        part_of[value] = placed * count // len(keys)
        placed += per_group[value]
    parts: list[list[JobKey]] = [[] for _ in range(count)]
    for key in keys:
        parts[part_of[group(key)]].append(key)
    return [part[i:i + MAX_JOBS_AHEAD] for part in parts for i in range(0, len(part), MAX_JOBS_AHEAD)]


class MonthPasses:
    """A worker's view of the month passes it makes or waits for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._widened = threading.Lock()
        self._batch_by_batch: set[Hashable] = set()  # months never claimed in parts
        self._claiming = threading.Lock()
        self._held: set[Hashable] = set()  # claims a pass of this process holds

    @contextlib.contextmanager
    def widening(self) -> Iterator[None]:
        """Held while this process makes a pass computing a whole month (one at a time)."""
        with self._widened:
            yield

    def never_claimed(self, month: Hashable) -> bool:
        """Whether `month` was found to be read batch by batch, never in claimed parts (its run
        has no key file for it, or it is laid out for batches to read their own)."""
        with self._lock:
            return month in self._batch_by_batch

    def note_never_claimed(self, month: Hashable) -> None:
        """`month` is read batch by batch: later batches need not look at it again."""
        with self._lock:
            self._batch_by_batch.add(month)

    @contextlib.contextmanager
    def claims(self) -> Iterator[set[Hashable]]:
        """The claims that passes of this process hold, to read or change while no other slot
        of it does: a slot's claim is made (or given up) in the store and noted here at once."""
        with self._claiming:
            yield self._held


def _claim_body(worker: str) -> bytes:
    return json.dumps({"worker": worker, "claimed_at": time.time()}).encode()


def claim_month(storage: Storage, layout: RunLayout, month: str, part: int, worker: str,
                passes: MonthPasses) -> bool:
    """Claim the pass over `part` of `month`'s jobs for this worker (`passes`: this process's):
    True when no one had; when the claim is this worker's own and no pass of this process holds
    it (an earlier pass failed and could not delete it); or when it is stale (its worker died).
    The pass then holds the claim in `passes` until `month_done` or `release_month`, so that
    other slots of this worker wait for it.
    """
    key = layout.month_pass_claim(month, part)
    with passes.claims() as held:
        if (storage.uri, key) in held:  # another slot of this worker makes this pass
            return False
        won = storage.create(key, _claim_body(worker)) or _take_back(storage, layout, month, part, worker)
        if won:
            held.add((storage.uri, key))
        return won


def _take_back(storage: Storage, layout: RunLayout, month: str, part: int, worker: str) -> bool:
    """Make the claim on a pass not done `worker`'s: its own (a pass whose release failed), or
    one not renewed for `CLAIM_STALE_S` (its worker died, most likely mid-pass). Otherwise the
    part's every later batch would read the part for its own jobs alone. False when the claim
    is another worker's live one, or the pass is done.

    Two workers that find the same claim stale may both take it and both make the pass: the
    work is done twice, never counted twice (a job's later result replaces the earlier)."""
    key = layout.month_pass_claim(month, part)
    if storage.exists(layout.month_pass_done(month, part)):
        return False
    claim = _read_claim(storage, key)
    if claim is None:  # deleted since (released), or not a claim: claim it afresh if it is gone
        return storage.create(key, _claim_body(worker))
    own = claim["worker"] == worker
    if not own and not _unrenewed(storage, key, CLAIM_STALE_S):
        return False
    storage.write_bytes(key, _claim_body(worker), "application/json")
    get_logger().info("worker.month_claim_taken_back" if own else "worker.month_claim_taken_over",
                      run_id=layout.run_id, month=month, part=part, claimed_by=claim["worker"])
    return True


@contextlib.contextmanager
def renewing_claim(storage: Storage, layout: RunLayout, month: str, part: int, worker: str,
                   every_s: float = CLAIM_RENEW_S) -> Iterator[None]:
    """Renew this worker's claim every `every_s` while the block runs (its pass is alive)."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(every_s):
            # A renewal that fails only brings the claim nearer to looking stale.
            with contextlib.suppress(Exception):
                storage.write_bytes(layout.month_pass_claim(month, part), _claim_body(worker), "application/json")

    renewer = threading.Thread(target=renew, name="tickq-claim-renewal", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def month_done(storage: Storage, layout: RunLayout, month: str, part: int, passes: MonthPasses) -> None:
    """The claimed pass over `part` of `month` has stored its results."""
    storage.write_bytes(layout.month_pass_done(month, part), b"{}", "application/json")
    with passes.claims() as held:
        held.discard((storage.uri, layout.month_pass_claim(month, part)))


def release_month(storage: Storage, layout: RunLayout, month: str, part: int, passes: MonthPasses) -> None:
    """The claimed pass failed: others may compute the part's jobs. Never raises: a claim
    that cannot be deleted is taken back by this worker's next batch of the month, or turns
    stale, and what failed the pass is what its batch reports."""
    key = layout.month_pass_claim(month, part)
    with passes.claims() as held:
        for attempt in range(1, RELEASE_TRIES + 1):
            try:
                storage.delete(key)
                break
            except Exception as exc:
                if attempt == RELEASE_TRIES or not is_transient(exc):
                    get_logger().warning("worker.month_claim_not_released", run_id=layout.run_id, month=month,
                                         part=part, error=str(exc))
                    break
            _pause(RELEASE_PAUSE_S * attempt)
        held.discard((storage.uri, key))


def wait_for_month(
    storage: Storage,
    layout: RunLayout,
    month: str,
    part: int,
    stale_s: float = CLAIM_STALE_S,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> bool:
    """Return once the pass over `part` of `month` claimed by another worker is done (True),
    or released or stale (not renewed for `stale_s`): False, the part is free to claim.

    A look the store fails (transiently) says nothing of the pass: waiting goes on, and raises
    only when looks have failed for `stale_s` in a row.
    """
    clock, sleep = clock or time.monotonic, sleep or _pause
    claim = layout.month_pass_claim(month, part)
    failing_since: float | None = None
    pause = WAIT_POLL_S
    while True:
        try:
            if storage.exists(layout.month_pass_done(month, part)):
                return True
            if _unrenewed(storage, claim, stale_s):  # released (its pass failed), or its worker died
                return False
            failing_since = None
            pause = min(pause, WAIT_POLL_MAX_S)
        except Exception as exc:
            failing_since = clock() if failing_since is None else failing_since
            if not is_transient(exc) or clock() - failing_since > stale_s:
                raise
            # A failing store is looked at less and less often: its client's retries draw on
            # one budget for the whole process, which looks from every waiting batch would spend.
            pause = min(pause * 2, WAIT_FAILING_MAX_S)
        sleep(pause)
        if failing_since is None:
            pause = min(pause * 1.5, WAIT_POLL_MAX_S)


def _unrenewed(storage: Storage, key: str, stale_s: float) -> bool:
    """Whether the claim at `key` is gone, or was last written (made or renewed) more than
    `stale_s` ago. Its age comes from the store, not from the time the claim says, so that a
    worker whose clock runs behind or ahead neither loses its live claim nor keeps a dead one."""
    age = storage.age(key)
    return age is None or age > stale_s


def _read_claim(storage: Storage, key: str) -> dict[str, Any] | None:
    """The claim at `key` (its worker and when it was made or renewed); None when it is gone
    (released) or not a claim as this version writes them."""
    try:
        claim = json.loads(storage.read_bytes(key))
    except (PermanentError, ValueError):
        return None
    is_claim = (isinstance(claim, dict) and isinstance(claim.get("worker"), str)
                and isinstance(claim.get("claimed_at"), int | float))
    return claim if is_claim else None
