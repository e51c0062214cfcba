"""How `--concurrency auto` shares a host's cores among the tickq workers running on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from worker.host_share import MEMORY_PER_SLOT, HostWorkers, auto_slots


def test_an_auto_sized_worker_takes_its_share_of_the_cores_within_its_memory() -> None:
    plenty = 64 * MEMORY_PER_SLOT
    assert auto_slots(2, plenty) == 2
    assert auto_slots(2, plenty, workers_on_host=2) == 1
    assert auto_slots(8, plenty, workers_on_host=3) == 2
    assert auto_slots(2, plenty, workers_on_host=5) == 1  # more workers than cores: one slot each
    assert auto_slots(1.5, plenty) == 1  # a fractional cgroup quota
    assert auto_slots(16, 3 * MEMORY_PER_SLOT) == 3  # memory bounds it
    assert auto_slots(16, 6 * MEMORY_PER_SLOT, workers_on_host=2) == 3  # its share of the memory
    assert auto_slots(16, MEMORY_PER_SLOT // 2) == 1


def test_workers_count_each_other_until_they_leave(tmp_path: Path) -> None:
    first, second = HostWorkers(tmp_path / "host"), HostWorkers(tmp_path / "host")
    first.join()
    assert first.count() == 1
    second.join()
    assert first.count() == second.count() == 2
    second.leave()
    assert first.count() == 1
    assert len(list((tmp_path / "host").iterdir())) == 1


def test_a_killed_worker_stops_counting_and_its_file_is_removed(tmp_path: Path) -> None:
    folder = tmp_path / "host"
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from worker.host_share import HostWorkers;"
         f"h = HostWorkers(Path({str(folder)!r})); h.join(); print('joined', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "joined"
        here = HostWorkers(folder)
        here.join()
        assert here.count() == 2
        os.kill(child.pid, signal.SIGKILL)  # no chance to leave: the kernel drops its lock
        child.wait(timeout=10)
        assert here.count() == 1
        assert [p.name for p in folder.iterdir()] == [p.name for p in folder.glob(f"{os.getpid()}-*.lock")]
    finally:
        child.kill()
        child.wait(timeout=10)


def test_a_folder_that_cannot_be_used_leaves_the_worker_counting_itself_alone(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    host = HostWorkers(blocked / "host")
    host.join()
    assert host.count() == 1
    assert host.error is not None and "NotADirectoryError" in host.error
    host.leave()


def test_a_worker_starting_sees_a_file_locked_under_its_final_name_only(tmp_path: Path) -> None:
    """A file being set up (not yet renamed to its final name) is neither counted nor removed."""
    folder = tmp_path / "host"
    here = HostWorkers(folder)
    here.join()
    pending = folder / ".12345-abcdef01"
    pending.write_bytes(b"")
    assert here.count() == 1
    assert pending.exists()
