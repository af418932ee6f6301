"""The pause points the tests put into the processes they start (`migrator.hooks`): at the
point MIGRATOR_PAUSE_AT names, write an audit row that says so (what a test waits for;
none inside a store's transaction, where the point passes no context) and stop for
MIGRATOR_PAUSE_S seconds, so the test can kill the process there or change a store under it;
and, while the file MIGRATOR_PAUSE_HOLD names exists, longer (a test holds the work still
while it looks, however slow a loaded machine makes the looking).

conftest.py sets MIGRATOR_HOOKS to `pause` for the whole session, so every command, Airflow
process and worker the tests start carries it."""

from __future__ import annotations

import os
import time
from typing import Any

HOOK = "tests.pauses:pause"


def pause(name: str, ctx: Any, sid: str | None) -> None:
    if os.environ.get("MIGRATOR_PAUSE_AT") != name:
        return
    if ctx is not None and sid is not None:
        ctx.control.record(sid, None, {"event": f"paused at {name}"})
    time.sleep(float(os.environ.get("MIGRATOR_PAUSE_S", "60")))
    hold = os.environ.get("MIGRATOR_PAUSE_HOLD")
    while hold and os.path.exists(hold):
        time.sleep(0.2)
