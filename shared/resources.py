"""What this process may use: CPUs and memory, container limits (cgroups) included."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Resources:
    """CPUs and memory available to this process."""

    cpus: float
    memory_bytes: int


def _cgroup_cpus() -> float | None:
    cpu_max = Path("/sys/fs/cgroup/cpu.max")
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_v1 = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_v1 = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota_v1 > 0:
            return quota_v1 / period_v1
    except (OSError, ValueError):
        pass
    return None


def _cgroup_memory() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text != "max" and int(text) < 1 << 60:
            return int(text)
    return None


def available() -> Resources:
    """CPUs (affinity and cgroup quota) and memory (cgroup limit or physical)."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, quota)
    memory = psutil.virtual_memory().total
    limit = _cgroup_memory()
    if limit is not None:
        memory = min(memory, limit)
    return Resources(cpus=cpus, memory_bytes=memory)
