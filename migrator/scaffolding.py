"""Test scaffolding compiled into the tool: named places where a test stops the process
(to kill it there, or to change a store under it). Inert unless MIGRATOR_PAUSE_AT names
the place."""

from __future__ import annotations

import os
import time
from typing import Any


def pause_point(ctx: Any, sid: str, name: str) -> None:
    """Stop for MIGRATOR_PAUSE_S seconds here when MIGRATOR_PAUSE_AT=name, after writing an
    audit row that says so (what a test waits for)."""
    if os.environ.get("MIGRATOR_PAUSE_AT") == name:
        ctx.control.record(sid, None, {"event": f"paused at {name}"})
        pause_here(name)


def pause_here(name: str) -> None:
    """Stop for MIGRATOR_PAUSE_S seconds here when MIGRATOR_PAUSE_AT=name, writing nothing:
    for places inside a transaction of a store, which a test watches from that store (a
    schema upgrade between two revisions)."""
    if os.environ.get("MIGRATOR_PAUSE_AT") == name:
        time.sleep(float(os.environ.get("MIGRATOR_PAUSE_S", "60")))
