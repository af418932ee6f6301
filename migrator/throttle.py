"""The throttle of the phases that read a shard at the source, the copy and the verify: before
each step (a copy batch, a verified table), wait while the source is busier than the
spec's `copy.throttle` allows (other backends running a query, backends waiting for a
lock, a streaming standby's replay lagging behind), and keep the phase's reading of one
shard under a rows-per-second ceiling. Each pause is logged and recorded in the shard's
audit trail (`copy throttled` or `verify throttled`, with the reason and how long), so the
task log and `migrator status --json` show it. A caller waits outside any transaction at
the source, so a long pause holds back neither its vacuum nor its locks.
"""

from __future__ import annotations

import logging
import threading
import time

from migrator.control.context import Context, not_a_standby
from migrator.errors import describe
from migrator.stores import is_transient
from migrator.stores.postgres import connect, where

log = logging.getLogger("migrator.throttle")

_LOAD = """
SELECT count(*) FILTER (WHERE state = 'active' AND backend_type = 'client backend'
                         AND application_name NOT LIKE 'residency-migrator%' AND pid <> pg_backend_pid()),
       count(*) FILTER (WHERE wait_event_type = 'Lock')
FROM pg_stat_activity WHERE datname = current_database()
"""

# Seconds the standby's replay is behind what it has received: 0 when it has replayed all
# of it (an idle source), else the age of the last transaction it replayed; NULL when the
# server is not in recovery.
_REPLAY_LAG = """
SELECT CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN pg_last_wal_receive_lsn() IS NULL OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM clock_timestamp()
                                    - coalesce(pg_last_xact_replay_timestamp(), pg_postmaster_start_time()))
       END
"""


EVENTS = ("copy throttled", "verify throttled")  # the audit events of a pause, by phase


class Throttle:
    """One per shard and phase (`copy` or `verify`), shared by the phase's lanes or
    connections."""

    def __init__(self, ctx: Context, sid: str, phase: str = "copy"):
        self.ctx, self.sid, self.phase = ctx, sid, phase
        self.limits = ctx.spec.copy_.throttle
        self.started = time.monotonic()
        self.rows = 0
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        t = self.limits
        return any(x is not None for x in (t.max_active, t.max_lock_waits, t.max_rows_per_s, t.max_replay_lag_s))

    def _busy(self) -> tuple[str, str] | None:
        """(what is busy, why in words) while the source is busier than the limits, else None."""
        t = self.limits
        if t.max_active is not None or t.max_lock_waits is not None:
            with connect(self.ctx.source_dsn, autocommit=True) as c:
                active, waiting = c.execute(_LOAD).fetchone()
            if t.max_active is not None and active > t.max_active:
                return "active", f"{active} other queries running at the source (max_active {t.max_active})"
            if t.max_lock_waits is not None and waiting > t.max_lock_waits:
                why = f"{waiting} backends waiting for a lock at the source (max_lock_waits {t.max_lock_waits})"
                return "locks", why
        if t.standby is not None and t.max_replay_lag_s is not None:
            lagging = self._lagging(t.standby.url, t.max_replay_lag_s)
            return ("standby", lagging) if lagging else None
        return None

    def _lagging(self, dsn: str, limit: float) -> str | None:
        """Why the standby holds the copy back, or None. A standby that does not answer
        holds it back too (its lag cannot be seen), until it answers again; one that is not
        a standby at all is a spec problem."""
        try:
            with connect(dsn, autocommit=True) as c:
                lag = c.execute(_REPLAY_LAG).fetchone()[0]
        except Exception as exc:
            if not is_transient(exc):
                raise
            return f"{describe(exc)}: the standby's replay lag is unknown"
        if lag is None:
            raise not_a_standby(dsn)
        if lag > limit:
            return f"{where(dsn)} replays {lag:.1f} s behind the source (max_replay_lag_s {limit:g})"
        return None

    def wait(self) -> None:
        """Before the next step: wait while the source is busy, or while the shard is ahead
        of its rate ceiling."""
        if not self.enabled:
            return
        waited, reasons, seen = 0.0, [], set()
        while (busy := self._busy()) is not None:
            what, why = busy
            if what not in seen:  # each cause once per pause, in its first words
                seen.add(what)
                reasons.append(why)
                log.info("shard %s: %s paused: %s", self.sid, self.phase, why)
            time.sleep(self.limits.check_every_s)
            waited += self.limits.check_every_s
        if self.limits.max_rows_per_s is not None:
            with self.lock:
                ahead = self.rows / self.limits.max_rows_per_s - (time.monotonic() - self.started)
            if ahead > 0:
                why = f"the shard's rate is at its ceiling ({self.limits.max_rows_per_s} rows/s)"
                reasons.append(why)
                log.info("shard %s: %s paused %.1f s: %s", self.sid, self.phase, ahead, why)
                time.sleep(ahead)
                waited += ahead
        if reasons:
            self.ctx.control.record(
                self.sid, None, {"event": f"{self.phase} throttled", "reasons": reasons, "waited_s": round(waited, 2)}
            )

    def done(self, rows: int) -> None:
        """`rows` more read at the source (counted against the rate ceiling)."""
        with self.lock:
            self.rows += rows
