"""The copy's throttle: before each batch, wait while the source is busier than the spec's
`copy.throttle` allows (other backends running a query, backends waiting for a lock), and
keep a shard's copy under a rows-per-second ceiling. Each pause is logged and recorded in
the shard's audit trail (`copy throttled`, with the reason and how long), so the task log
and `migrator status --json` show it.
"""

from __future__ import annotations

import logging
import threading
import time

from migrator.context import Context
from migrator.errors import retrying
from migrator.stores.postgres import connect

log = logging.getLogger("migrator.throttle")

_LOAD = """
SELECT count(*) FILTER (WHERE state = 'active' AND backend_type = 'client backend'
                         AND application_name NOT LIKE 'residency-migrator%' AND pid <> pg_backend_pid()),
       count(*) FILTER (WHERE wait_event_type = 'Lock')
FROM pg_stat_activity WHERE datname = current_database()
"""


class Throttle:
    """One per shard copy, shared by its lanes."""

    def __init__(self, ctx: Context, sid: str):
        self.ctx, self.sid = ctx, sid
        self.limits = ctx.spec.copy_.throttle
        self.started = time.monotonic()
        self.rows = 0
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        t = self.limits
        return t.max_active is not None or t.max_lock_waits is not None or t.max_rows_per_s is not None

    def _busy(self) -> str | None:
        t = self.limits
        if t.max_active is None and t.max_lock_waits is None:
            return None
        for attempt in retrying(self.ctx.spec.retry):
            with attempt, connect(self.ctx.source_dsn, autocommit=True) as c:
                active, waiting = c.execute(_LOAD).fetchone()
        if t.max_active is not None and active > t.max_active:
            return f"{active} other queries running at the source (max_active {t.max_active})"
        if t.max_lock_waits is not None and waiting > t.max_lock_waits:
            return f"{waiting} backends waiting for a lock at the source (max_lock_waits {t.max_lock_waits})"
        return None

    def before_batch(self) -> None:
        """Wait while the source is busy, or while the shard is ahead of its rate ceiling."""
        if not self.enabled:
            return
        waited, reasons = 0.0, []
        while (why := self._busy()) is not None:
            if why not in reasons:
                reasons.append(why)
                log.info("shard %s: copy paused: %s", self.sid, why)
            time.sleep(self.limits.check_every_s)
            waited += self.limits.check_every_s
        if self.limits.max_rows_per_s is not None:
            with self.lock:
                ahead = self.rows / self.limits.max_rows_per_s - (time.monotonic() - self.started)
            if ahead > 0:
                why = f"the shard's rate is at its ceiling ({self.limits.max_rows_per_s} rows/s)"
                reasons.append(why)
                log.info("shard %s: copy paused %.1f s: %s", self.sid, ahead, why)
                time.sleep(ahead)
                waited += ahead
        if reasons:
            self.ctx.control.record(
                self.sid, None, {"event": "copy throttled", "reasons": reasons, "waited_s": round(waited, 2)}
            )

    def copied(self, rows: int) -> None:
        with self.lock:
            self.rows += rows
