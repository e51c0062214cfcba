"""A worker's share of its host's cores, among the tickq workers running on that host.

`--concurrency auto` sizes a worker from what its process may use, container limits included.
Workers started side by side on one host without such limits (a VM, systemd units, a
benchmark) each see every core and all the memory: eight of them on an 8-core host would run
64 execution slots between them, contending for the cores and peaking at eight times the
memory one worker plans for. So each worker holds a lock on a file of its own in one folder of
the host (`TICKQ_HOST_DIR`, by default a folder of the user's in the temp directory), and an
auto-sized worker runs its share of the host (cores and memory divided by the workers holding
a lock, whatever their own concurrency), counted again as workers come and go.

A lock ends with its process however that ends (the kernel drops it), so a worker that was
killed stops counting at once; its file is removed by the next count. Containers do not share
their temp folders, and are sized by their own limits.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: every worker counts itself alone
    fcntl = None  # type: ignore[assignment]

# A slot per this much of the memory the process may use, so that peak memory stays inside
# a container's limit (a slot's jobs peak at about 200 MB).
MEMORY_PER_SLOT = 256 << 20
LOCK_SUFFIX = ".lock"


def default_folder() -> Path:
    """Where the host's workers hold their locks: `TICKQ_HOST_DIR`, or a folder of this user's
    in the temp directory (workers of other users are not counted)."""
    configured = os.environ.get("TICKQ_HOST_DIR")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"tickq-workers-{os.getuid()}"


def auto_slots(cpus: float, memory_bytes: int, workers_on_host: int = 1) -> int:
    """Execution slots for an auto-sized worker: its share, among `workers_on_host` (itself
    included), of the `cpus` and the memory its process may use; at least one."""
    workers = max(1, workers_on_host)
    by_cpu = math.floor(cpus / workers)
    by_memory = memory_bytes // workers // MEMORY_PER_SLOT
    return max(1, min(by_cpu, by_memory))


class HostWorkers:
    """This worker's place among the host's workers: a locked file in `folder`, held until
    `leave` or the end of the process."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Why the worker holds no place (the folder could not be used), if so.
        self.error: str | None = None
        self._fd: int | None = None
        self._path: Path | None = None

    def join(self) -> None:
        """Take a place (a locked file). A folder that cannot be used leaves the worker counting
        itself alone, with `error` saying why: sizing is a hint, not a reason not to start."""
        if fcntl is None or self._fd is not None:
            return
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            # Locked under a name `count` ignores, then renamed: a count never sees the file
            # unlocked and takes it for a dead worker's.
            pending = self.folder / f".{name}"
            fd = os.open(pending, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path = self.folder / f"{name}{LOCK_SUFFIX}"
                os.rename(pending, path)
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    pending.unlink()
                raise
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc.strerror or exc}"
            return
        self._fd, self._path = fd, path

    def count(self) -> int:
        """Workers holding a place on this host, this one included (at least 1). Files whose
        worker has ended are removed."""
        if fcntl is None:
            return 1
        try:
            names = [entry for entry in os.listdir(self.folder) if entry.endswith(LOCK_SUFFIX)]
        except OSError:
            return 1
        live = 0
        for name in names:
            path = self.folder / name
            if path == self._path or _is_held(path):
                live += 1
        return max(1, live)

    def leave(self) -> None:
        """Give the place up (the process ending does as much)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            assert self._path is not None
            self._path.unlink()
        os.close(self._fd)
        self._fd = self._path = None


def _is_held(path: Path) -> bool:
    """Whether a live worker holds `path`'s lock; a file no one holds is removed."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # gone meanwhile: its worker left
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return True
    except OSError:
        os.close(fd)
        return False
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)
    return False
