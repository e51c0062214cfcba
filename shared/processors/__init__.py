"""Processors: the per-job computation a run selects with ``--processor``.

Built-ins live here; third-party processors register under the ``tickq.processors``
entry-point group (``name = "package.module:ProcessorClass"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from shared.errors import PermanentError
from shared.processors.analytics import AnalyticsProcessor
from shared.processors.base import JobAccumulator, JobContext, Processor, StoredResult
from shared.processors.extract import ExtractProcessor

__all__ = ["JobAccumulator", "JobContext", "Processor", "StoredResult", "get_processor", "processor_names"]

if TYPE_CHECKING:
    from importlib.metadata import EntryPoints

_BUILTIN: dict[str, type] = {"analytics": AnalyticsProcessor, "extract": ExtractProcessor}


def _plugins() -> EntryPoints:
    """Processors other packages install. Looked up only for a name not built in: importing
    `importlib.metadata` and reading the installed packages' metadata cost every worker and
    aggregator several milliseconds at start."""
    from importlib.metadata import entry_points

    return entry_points(group="tickq.processors")


def processor_names() -> list[str]:
    """Every processor this installation can run."""
    return sorted(set(_BUILTIN) | {ep.name for ep in _plugins()})


def get_processor(name: str) -> Processor:
    """The processor called `name`; `PermanentError` when none is installed under it."""
    if name in _BUILTIN:
        return cast(Processor, _BUILTIN[name]())
    for ep in _plugins():
        if ep.name == name:
            return cast(Processor, ep.load()())
    raise PermanentError(f"unknown processor {name!r} (installed: {', '.join(processor_names())})")
