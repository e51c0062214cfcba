"""A tickq command as a process of its own, and as a function called inside someone else's."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tickq.cli import main

MONTH = "2024-03"


def test_a_command_called_in_process_leaves_the_callers_garbage_collector_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A command run as a process freezes its start-up objects and collects young objects less
    # often; called from a notebook or a test session, it must not do that to the caller's.
    frozen, thresholds = gc.get_freeze_count(), gc.get_threshold()
    assert main(["gen", "--out", str(tmp_path / "raw"), "--months", MONTH, "--securities", "2",
                 "--rows", "2000"]) == 0
    assert main(["produce", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out"),
                 "--months", MONTH, "--dry-run", "--json"]) == 0
    assert (gc.get_freeze_count(), gc.get_threshold()) == (frozen, thresholds)


def test_a_command_run_as_a_process_answers_as_the_function_does(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    subprocess.run([sys.executable, "-m", "tickq", "gen", "--out", str(raw), "--months", MONTH,
                    "--securities", "2", "--rows", "2000"], check=True, capture_output=True)
    produced = subprocess.run(
        [sys.executable, "-m", "tickq", "produce", "--input", str(raw), "--output", str(tmp_path / "out"),
         "--months", MONTH, "--dry-run", "--json"],
        check=True, capture_output=True, text=True,
    )
    assert json.loads(produced.stdout)["jobs"] > 0
    refused = subprocess.run([sys.executable, "-m", "tickq", "aggregate", "--run", "no-such-run", "--output",
                              str(tmp_path / "out")], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()] and "no run no-such-run" in refused.stderr
