"""A run's progress as storage records it: expected, succeeded, dead and retrying jobs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shared.errors import PermanentError
from shared.layout import JobKey, RunLayout, dead_keys, read_job_keys, retrying_keys, succeeded_keys
from shared.storage import Storage


def read_manifest(storage: Storage, layout: RunLayout) -> dict[str, Any]:
    """The run's manifest; `PermanentError` when the run does not exist there."""
    if not storage.exists(layout.manifest):
        raise PermanentError(f"no run {layout.run_id} under {storage.describe()} (no manifest)")
    return dict(json.loads(storage.read_bytes(layout.manifest)))


@dataclass
class RunState:
    """Which of a run's expected jobs succeeded, are dead, or are still missing."""

    expected: set[JobKey]
    succeeded: set[JobKey]
    dead: set[JobKey]
    retrying: set[JobKey] = field(default_factory=set)

    @property
    def missing(self) -> set[JobKey]:
        """Jobs neither succeeded nor dead."""
        return self.expected - self.succeeded - self.dead

    @property
    def accounted(self) -> bool:
        """Every expected job has succeeded or is dead."""
        # The aggregator asks on every event of a run: while fewer jobs are settled than
        # expected some must be missing, which the counts tell without comparing any keys.
        if len(self.succeeded) + len(self.dead) < len(self.expected):
            return False
        return not self.missing

    @property
    def complete(self) -> bool:
        """Every expected job succeeded."""
        return self.expected <= self.succeeded


def load_state(storage: Storage, layout: RunLayout, expected: set[JobKey] | None = None) -> RunState:
    """The run's job states from its key file, success markers and dead records.

    A caller that read the key file before may pass its `expected` keys: the producer writes
    that file once, before the run's first job, and never changes it.
    """
    expected = set(read_job_keys(storage, layout)) if expected is None else expected
    months = {key.month for key in expected}
    succeeded = succeeded_keys(storage, layout, months) & expected
    dead = (dead_keys(storage, layout, months) & expected) - succeeded
    retrying = (retrying_keys(storage, layout, months) & expected) - succeeded - dead
    return RunState(expected, succeeded, dead, retrying)


