"""Fault injection for resilience tests: kill this process at named points of a job.

Off unless ``TICKQ_CHAOS_KILL`` is set, e.g. ``before-upload:0.05,after-upload:0.05`` (point
and probability). Points: ``before-upload`` (result computed, nothing stored),
``after-upload`` (result and marker stored, event not published, job not acked). The kill is a
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


def maybe_kill(point: str, job_id: str) -> None:
    """SIGKILL this process at `point` with the configured probability.

    With ``TICKQ_CHAOS_ONLY_JOB`` set, only that job ever kills its process.
    """
    probability = _PLAN.get(point)
    if _ONLY_JOB is not None and job_id != _ONLY_JOB:
        return
    if probability and random.random() < probability:
        os.kill(os.getpid(), signal.SIGKILL)
