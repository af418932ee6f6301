"""A helper process that a cutover or rollback leaves beside itself while its fence is up,
so that a worker killed in the window (SIGKILL, a lost machine slot) cannot leave users
unable to write: when the worker's end of the pipe closes without a word, the helper
resolves the shard (`recovery.resolve_shard`) as soon as the dead worker's lock is free.

The helper runs in a session of its own (a signal to the worker's process group does not
reach it), imports nothing heavy until it is needed, and gives up after `BUDGET_S`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from migrator.capture import recovery
from migrator.control.context import Context
from migrator.errors import ShardBusy, describe
from migrator.spec import parse_spec, to_wire

BUDGET_S = 900.0
DONE = b"done\n"


@contextlib.contextmanager
def watching(ctx: Any, sid: str) -> Iterator[None]:
    """Keep a helper beside the block; it is told all is well only when the block ends
    without error (a failing block resolves the shard itself, and the helper checks)."""
    if not ctx.spec.changes.capture or os.environ.get("MIGRATOR_WATCHDOG") == "off":
        yield
        return
    log = os.environ.get("MIGRATOR_WATCHDOG_LOG")
    err = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrator.capture.watchdog"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,
        close_fds=True,
    )
    if log:
        err.close()  # type: ignore[union-attr]
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({"spec": to_wire(ctx.spec), "run_id": ctx.run_id, "shard_id": sid}).encode() + b"\n")
    proc.stdin.flush()
    ok = False
    try:
        yield
        ok = True
    finally:
        with contextlib.suppress(OSError):
            if ok:
                proc.stdin.write(DONE)
            proc.stdin.close()


def _resolve(payload: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s watchdog %(levelname)s %(message)s")
    log = logging.getLogger("migrator.capture.watchdog")
    ctx = Context(parse_spec(payload["spec"], "watchdog"), payload["run_id"])
    sid = payload["shard_id"]
    end = time.monotonic() + BUDGET_S
    while time.monotonic() < end:
        try:
            with ctx.control.lock(sid):
                done = recovery.resolve_shard(ctx, ctx.control.shard(sid))
            log.info("shard %s resolved: %s", sid, ", ".join(done) or "nothing was due")
            return
        except ShardBusy:
            time.sleep(0.1)  # the worker (or its successor) still holds the shard
        except Exception as exc:  # a store down: try again until the budget runs out
            log.warning("shard %s: recovery failed for now: %s", sid, describe(exc))
            time.sleep(1.0)
    log.error("shard %s: gave up after %s s; the next command or `migrator recover` resolves it", sid, BUDGET_S)


def main() -> None:
    first = sys.stdin.buffer.readline()
    if not first:
        return
    payload = json.loads(first)
    if sys.stdin.buffer.readline() == DONE:
        return
    _resolve(payload)


if __name__ == "__main__":
    main()
