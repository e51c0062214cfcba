"""Where suspect jobs run: child processes, each running one job at a time.

A job that was in hand when its worker died may be what killed it. Running it in a child
process means that if it kills again, only the child dies, and the job that was running there
is the one to blame. Children are spawned (no inherited threads), die with their worker, and
are kept warm between jobs: after a worker is killed, every job it had prefetched comes back
as a suspect, and a burst of them costs one interpreter start per child, not one per job.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from shared.resources import keep_pandas_unloaded

T = TypeVar("T")
PR_SET_PDEATHSIG = 1


def start_child(parent_pid: int) -> None:
    """First thing in an isolation child: die with the worker, and keep pandas unloaded."""
    keep_pandas_unloaded()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: the child ends when its pipe closes
        return
    if os.getppid() != parent_pid:  # the worker died before the request took effect
        os._exit(1)


class IsolationChildren:
    """`size` single-process pools; a pool whose child died is replaced on next use."""

    def __init__(self, size: int) -> None:
        self._idle: asyncio.Queue[ProcessPoolExecutor | None] = asyncio.Queue()
        for _ in range(max(1, size)):
            self._idle.put_nowait(None)  # spawned on first use
        self._all: set[ProcessPoolExecutor] = set()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in a child; raises `BrokenProcessPool` when the child died running it."""
        child = await self._idle.get()
        try:
            if child is None:
                child = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=start_child,
                    initargs=(os.getpid(),),
                )
                self._all.add(child)
            return await asyncio.get_running_loop().run_in_executor(child, fn, *args)
        except BrokenProcessPool:
            self._discard(child)
            child = None
            raise
        finally:
            self._idle.put_nowait(child)

    def _discard(self, child: ProcessPoolExecutor | None) -> None:
        if child is not None:
            self._all.discard(child)
            child.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop every child (a job still running in one is abandoned, as at a shutdown timeout)."""
        for child in list(self._all):
            self._discard(child)
