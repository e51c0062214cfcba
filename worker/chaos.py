"""Fault injection for resilience tests: kill this process at named points of a job.

Off unless ``TICKQ_CHAOS_KILL`` is set, e.g. ``before-upload:0.05,after-upload:0.05`` (point
and probability, drawn once per batch of jobs at each point). Points: ``before-upload``
(the batch's results computed, nothing stored), ``after-upload`` (results and markers stored,
event not published, no job acked). The kill is a
SIGKILL: no cleanup, no goodbye to the broker, as when the kernel's OOM killer strikes.
"""

from __future__ import annotations

import os
import random
import signal

_ENV = "TICKQ_CHAOS_KILL"


def _plan() -> dict[str, float]:
    plan: dict[str, float] = {}
    for part in os.environ.get(_ENV, "").split(","):
        if ":" in part:
            point, probability = part.split(":", 1)
            plan[point.strip()] = float(probability)
    return plan


_PLAN = _plan()
_ONLY_JOB = os.environ.get("TICKQ_CHAOS_ONLY_JOB")


def maybe_kill(point: str, job_ids: list[str]) -> None:
    """SIGKILL this process at `point` of a batch of `job_ids` with the configured probability.

    With ``TICKQ_CHAOS_ONLY_JOB`` set, only a batch holding that job ever kills its process.
    """
    probability = _PLAN.get(point)
    if _ONLY_JOB is not None and _ONLY_JOB not in job_ids:
        return
    if probability and random.random() < probability:
        os.kill(os.getpid(), signal.SIGKILL)
