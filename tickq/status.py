"""`tickq status`: a run's completeness ledger, once or live.

Expected jobs come from the manifest, succeeded from the success markers, dead and retrying
from the records workers keep beside them (a dead record is written when a job is
dead-lettered and removed when it is replayed or succeeds; a retry record while the job waits
in a delay queue). The aggregator service writes the dead records of jobs the broker
dead-lettered itself, at its delivery limit: without it, such jobs show as queued. Whatever
is left is queued or running. The namespace's queue depths come from the broker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from shared.broker import BrokerUnavailable, connect
from shared.layout import RunLayout
from shared.runstate import RunState, load_state, read_manifest
from shared.settings import Settings
from shared.storage import Storage, open_storage
from shared.topology import Topology


@dataclass(frozen=True)
class Snapshot:
    """A run's ledger at one moment."""

    run_id: str
    expected: int
    succeeded: int
    dead: int
    retrying: int
    queued: int
    rate_per_s: float | None
    eta_s: float | None
    broker: dict[str, int] | None
    # Letters in the namespace's dead-letter queue, of any run: jobs the broker dead-lettered
    # itself (a crash loop) count as queued here until the aggregator service records them.
    dead_letters: int | None = None

    @property
    def complete(self) -> bool:
        """Every job succeeded."""
        return self.succeeded == self.expected

    @property
    def settled(self) -> bool:
        """Every job succeeded or is dead: nothing more will happen by itself."""
        return self.succeeded + self.dead == self.expected

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        return {
            "run_id": self.run_id,
            "expected": self.expected,
            "succeeded": self.succeeded,
            "dead": self.dead,
            "queued": self.queued,
            "retrying": self.retrying,
            "complete": self.complete,
            "rate_per_s": self.rate_per_s,
            "eta_s": self.eta_s,
            "broker": self.broker,
        }

    def line(self) -> str:
        """One plain line for logs and non-terminals."""
        if self.settled:
            progress = ", complete" if self.complete else ", done (replay the dead with `tickq dlq replay`)"
        else:
            eta = f", ETA {self.eta_s:.0f}s" if self.eta_s is not None else ""
            progress = (f", {self.rate_per_s:.1f} jobs/s" if self.rate_per_s else "") + eta
            if self.dead_letters:
                progress += f"; {self.dead_letters} in the dead-letter queue (`tickq dlq list`)"
        return (f"run {self.run_id}: {self.succeeded}/{self.expected} succeeded, {self.dead} dead, "
                f"{self.retrying} retrying, {self.queued} queued or running{progress}")


async def _queue_depths(settings: Settings) -> dict[str, int] | None:
    topology = Topology(settings.namespace, settings.retry_delays_s)
    try:
        connection = await connect(settings, "tickq-status", robust=False, timeout=5)
    except BrokerUnavailable:
        return None
    depths: dict[str, int] = {}
    async with connection:
        for name in [topology.jobs, topology.dead, *(topology.retry_queue(d) for d in topology.retry_delays_s)]:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                depths[name] = int(queue.declaration_result.message_count or 0)
            except Exception:  # not declared yet: nothing in it
                depths[name] = 0
    return depths


def _rate(state: RunState, created_at: str | None, previous: tuple[float, int] | None) -> float | None:
    """Jobs succeeding a second: since the `previous` look, else since the run was created."""
    now = time.time()
    if previous is not None and now > previous[0]:
        return max(0.0, (len(state.succeeded) - previous[1]) / (now - previous[0]))
    if created_at:
        elapsed = now - dt.datetime.fromisoformat(created_at).timestamp()
        return len(state.succeeded) / elapsed if elapsed > 0 else None
    return None


def snapshot(storage: Storage, run_id: str, settings: Settings, previous: tuple[float, int] | None = None) -> Snapshot:
    """The run's ledger now."""
    layout = RunLayout(run_id)
    manifest = read_manifest(storage, layout)
    state = load_state(storage, layout)
    left = len(state.expected) - len(state.succeeded) - len(state.dead)
    # None once nothing is left to do: an average since creation would fall for ever after.
    rate = _rate(state, manifest.get("created_at"), previous) if left else None
    broker = asyncio.run(_queue_depths(settings))
    return Snapshot(
        run_id=run_id,
        expected=len(state.expected),
        succeeded=len(state.succeeded),
        dead=len(state.dead),
        retrying=len(state.retrying),
        queued=left - len(state.retrying),
        rate_per_s=round(rate, 3) if rate is not None else None,
        eta_s=round(left / rate, 1) if rate and left else (0.0 if not left else None),
        broker=broker,
        dead_letters=broker.get(Topology(settings.namespace).dead) if broker is not None else None,
    )


def missing(storage: Storage, run_id: str) -> list[str]:
    """Job ids that neither succeeded nor are dead."""
    state = load_state(storage, RunLayout(run_id))
    return sorted(f"{run_id}:{k.month}:{k.security}:{k.date}" for k in state.missing)


def watch(storage: Storage, run_id: str, settings: Settings, interval_s: float, as_json: bool) -> Snapshot:
    """Follow the run until every job succeeded or is dead."""
    previous: tuple[float, int] | None = None
    current = snapshot(storage, run_id, settings)
    if sys.stdout.isatty() and not as_json:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[detail]}"), TimeRemainingColumn()) as bar:
            task = bar.add_task(f"run {run_id}", total=current.expected, detail="")
            while True:
                detail = f"dead {current.dead} · retrying {current.retrying} · queued {current.queued}"
                bar.update(task, completed=current.succeeded + current.dead, detail=detail)
                if current.settled:
                    return current
                time.sleep(interval_s)
                previous = (time.time(), current.succeeded)
                current = snapshot(storage, run_id, settings, previous)
    while True:
        print(json.dumps(current.as_json()) if as_json else current.line(), flush=True)
        if current.settled:
            return current
        time.sleep(interval_s)
        previous = (time.time(), current.succeeded)
        current = snapshot(storage, run_id, settings, previous)


def add_arguments(parser: Any) -> None:
    """Arguments of `tickq status`."""
    parser.add_argument("--run", required=True, help="run id")
    parser.add_argument("--output", required=True, help="the run's output location")
    parser.add_argument("--watch", action="store_true", help="follow the run until every job succeeded or died")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between updates with --watch")
    parser.add_argument("--json", action="store_true", help="JSON (one object; one per update with --watch)")
    parser.add_argument("--missing", action="store_true", help="list the jobs neither succeeded nor dead")


def main(args: Any, settings: Settings) -> int:
    """Run `tickq status`; exit 0 when complete, 3 when not (yet)."""
    storage = open_storage(args.output, settings.s3_endpoint_url)
    if args.missing:
        for job_id in missing(storage, args.run):
            print(job_id)
        return 0
    if args.watch:
        current = watch(storage, args.run, settings, args.interval, args.json)
    else:
        current = snapshot(storage, args.run, settings)
        print(json.dumps(current.as_json()) if args.json else current.line())
    return 0 if current.complete else 3
