"""What this process may use (CPUs and memory, container limits included) and how it spends
its memory: pyarrow's allocator, pandas left unloaded, the garbage collector."""

from __future__ import annotations

import gc
import importlib.abc
import os
import sys
from dataclasses import dataclass
from pathlib import Path


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
    import psutil  # here, not at import: the healthcheck path stays lean

    memory = psutil.virtual_memory().total
    limit = _cgroup_memory()
    if limit is not None:
        memory = min(memory, limit)
    return Resources(cpus=cpus, memory_bytes=memory)


class _RefusePandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is not loaded by pyarrow's probe in this process")


def keep_pandas_unloaded() -> None:
    """Stop pyarrow from loading pandas (about 50 MB resident) behind ``pa.array(list)``.

    pyarrow asks pandas, once per process, whether an object it converts is a pandas object,
    importing pandas to do so. A worker never hands pyarrow pandas objects, so the probe runs
    here with pandas out of reach and pyarrow remembers that answer. pandas itself stays
    importable: code that wants it (a processor, ``Table.from_pandas``) imports it as usual.
    """
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    finder = _RefusePandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(finder)


def use_returning_memory_pool() -> None:
    """Have pyarrow hand freed memory back to the system, so resident memory follows the work.

    pyarrow's default allocator here (mimalloc) keeps freed pages for reuse: a worker's RSS
    then settles near its largest batch ever rather than its current one (measured: 267 MB
    against 229 MB with jemalloc for the same jobs). The choice is read once, when pyarrow's
    C++ library loads, so this must run before pyarrow is imported; it is inherited by child
    processes. ``ARROW_DEFAULT_MEMORY_POOL``, when set, still decides.
    """
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")


def spare_idle_blas_threads() -> None:
    """Keep numpy's BLAS (OpenBLAS in numpy's wheels) to the calling thread.

    tickq asks numpy for element-wise and indexed arithmetic only, never for the linear algebra
    BLAS threads serve, yet OpenBLAS starts a thread per core when numpy is imported and keeps
    them spinning for a while: 0.1-0.15 CPU-seconds of every tickq process's start-up on 2
    cores (measured: a worker's start 0.34-0.41 CPU-s against 0.50-0.58 s). The setting is read
    once, when numpy loads, so this must run before numpy is imported; child processes inherit
    it. ``OPENBLAS_NUM_THREADS``, when set, still decides.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


# Set by the console entry point (`tickq.cli.run`): this process runs one command and ends.
_one_command_process = False

# Container objects allocated (net of those freed) between two young collections: Python's
# default is 700. A worker keeps a few thousand objects in flight (its prefetched jobs) and
# allocates more with every job, so at 700 it collected about a hundred times a second and
# promoted what was merely in flight; at 10,000 most of it is freed before a collection looks
# at it (measured: 0.02 s of collection per 5,000 jobs instead of 0.1 s).
YOUNG_COLLECTION_THRESHOLD = 10_000


def one_command_process() -> None:
    """Declare that this process runs one tickq command and exits after it.

    Only then may `relieve_garbage_collector` act: a process that calls tickq's functions and
    goes on (a test session, a notebook) keeps its garbage collector as it was.
    """
    global _one_command_process
    _one_command_process = True


def relieve_garbage_collector() -> None:
    """Spare the cyclic garbage collector work that cannot find garbage in a command's process.

    A tickq command imports and sets up once, then works until it exits. The tens of thousands
    of module, class and configuration objects alive after start-up would be walked again by
    every full collection and once more by the collection at interpreter exit (about 0.1 s per
    command): they are frozen, exempt from later passes (still freed as usual when nothing
    refers to them; only cycles among them would outlive the command). Young collections run
    less often (`YOUNG_COLLECTION_THRESHOLD`). Call after start-up and again at exit.
    """
    if _one_command_process:
        gc.freeze()
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
