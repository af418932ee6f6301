"""The control database: each shard's state and what the state machine keeps beside it,
its moves and the audit rows that record them, and the locks of the workers on it (its
members and checkpoints are `membership`'s part of `Control`).

Every change of a shard's phase is one compare-and-set (`UPDATE ... WHERE state = ANY(
expected)`) committed together with its audit row. A worker also holds a session advisory
lock on the shard while it works on it, so a second worker is turned away at once and a
killed worker's lock dies with its connection, letting a rerun resume immediately.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from migrator.control.membership import Membership, ridden_out, ride_out
from migrator.control.state import State, allowed
from migrator.errors import ShardBusy, SpecError, StateConflict
from migrator.schema import history
from migrator.stores.postgres import Conn, connect, name_store

SCHEMA = history.SCHEMA
NOW = object()  # `Control.keep`: the time of the audit row that records it


@dataclass(frozen=True)
class Shard:
    """A shard as the control database keeps it: its state, and what the state machine keeps
    beside it (the phases read these, never the audit rows)."""

    shard_id: str
    wave: str
    name: str
    region: str
    idx: int
    state: State
    version: int
    users: int
    batches: int
    plan: dict
    digest: str | None
    error: str | None
    state_since: datetime | None = None  # when it entered `state`
    finalized_at: datetime | None = None  # its capture removed by cleanup: no rollback after it
    rollback_reason: str | None = None  # the reason of the rollback asked for
    last_verify: dict | None = None  # its last verify's outcome (matched, digest, rows, differences)
    approval: dict | None = None  # the answer to its cutover since that verify, with the run's id
    frozen: dict | None = None  # its source copy as the cutover left it (digest, per table rows and digest)
    origin: str | None = None  # the region its users move from; None: the spec's source region

    @property
    def finalized(self) -> bool:
        return self.finalized_at is not None

    @classmethod
    def from_row(cls, r: dict) -> Shard:
        return cls(
            r["shard_id"],
            r["wave"],
            r["name"],
            r["region"],
            r["idx"],
            State(r["state"]),
            r["version"],
            r["users"],
            r["batches"],
            r["plan"] or {},
            r["digest"],
            r["error"],
            r.get("state_since"),
            r.get("finalized_at"),
            r.get("rollback_reason"),
            r.get("last_verify"),
            r.get("approval"),
            r.get("frozen"),
            r.get("origin"),
        )


def shard_id(wave: str, name: str) -> str:
    return f"{wave}/{name}"


def _keep_alive(c: Conn, stop: threading.Event, every_s: float) -> None:
    """A statement on the shard lock's session every `every_s`, until `stop`."""
    while not stop.wait(every_s):
        try:
            c.execute("SELECT 1")
        except psycopg.Error:
            return  # the session is lost: so is the lock, and the phase finds out on its own


class Control(Membership):
    def __init__(self, dsn: str, run_id: str, outage_s: float = 60.0, dead_session_s: float = 30.0):
        self.dsn = dsn
        self.dead_session_s = dead_session_s
        name_store(dsn, "control database")
        self.run_id = run_id
        self.outage_s = outage_s
        self._current = False  # the schema brought up to date by this process (see `ensure`)

    def connect(self, autocommit: bool = False) -> Conn:
        """A connection to the control database, its tables (where there are any yet) brought
        to the head of their schema history first (once per Control; `plan` creates them, so
        a dry run against a fresh database leaves it empty); establishing it rides out an outage."""
        if not self._current and self.exists():
            self.ensure()
        return ride_out(self.dsn, self.outage_s, lambda: connect(self.dsn, autocommit=autocommit))

    @ridden_out
    def record(self, sid: str | None, state: str | None, detail: dict) -> None:
        """An audit row of its own (no move of the shard's state)."""
        with self.connect() as c:
            self.audit(c, sid, state, state, detail)

    # --- schema -----------------------------------------------------------------------
    @ridden_out
    def exists(self) -> bool:
        with connect(self.dsn, autocommit=True) as c:  # looks, creates nothing
            return c.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.meta",)).fetchone()[0]

    @ridden_out
    def ensure(self) -> None:
        """The control tables at the head of their schema history (`migrator.schema`)."""
        history.ensure(self.dsn, history.CONTROL)
        self._current = True

    # --- shards -----------------------------------------------------------------------
    @ridden_out
    def shards(
        self,
        wave: str | None = None,
        names: Iterable[str] | None = None,
        region: str | None = None,
        states: Iterable[State] | None = None,
    ) -> list[Shard]:
        q = f"SELECT * FROM {SCHEMA}.shard WHERE true"
        args: list[Any] = []
        if states is not None:
            q += " AND state = ANY(%s)"
            args.append([p.value for p in states])
        if wave is not None:
            q += " AND wave = %s"
            args.append(wave)
        names = list(names or [])
        if names:
            q += " AND (name = ANY(%s) OR shard_id = ANY(%s))"
            args += [names, names]
        if region:
            q += " AND region = %s"
            args.append(region)
        with self.connect(autocommit=True) as c, c.cursor(row_factory=dict_row) as cur:
            return [Shard.from_row(r) for r in cur.execute(q + " ORDER BY wave, region, idx", args).fetchall()]

    @ridden_out
    def waves(self) -> list[str]:
        """Every wave planned, oldest first."""
        with self.connect(autocommit=True) as c:
            q = f"SELECT wave FROM {SCHEMA}.shard GROUP BY wave ORDER BY min(created_at), wave"
            return [w for (w,) in c.execute(q)]

    @ridden_out
    def shard(self, sid: str) -> Shard:
        with self.connect(autocommit=True) as c, c.cursor(row_factory=dict_row) as cur:
            r = cur.execute(f"SELECT * FROM {SCHEMA}.shard WHERE shard_id = %s", (sid,)).fetchone()
        if r is None:
            raise StateConflict(f"shard {sid} does not exist")
        return Shard.from_row(r)

    def batches_of(self, sid: str) -> int:
        return self.shard(sid).batches

    def transition(
        self,
        conn: Conn,
        sid: str,
        expected: State | Iterable[State],
        to: State,
        detail: dict | None = None,
        **fields: Any,
    ) -> State:
        """Compare-and-set the shard's phase inside the caller's transaction, with its audit row."""
        exp = [expected] if isinstance(expected, State) else list(expected)
        exp = [e for e in exp if allowed(e, to)]
        if not exp:
            raise StateConflict(f"shard {sid}: a move to {to} is not allowed from {expected}")
        sets = ", ".join(f"{k} = %s" for k in fields)
        q = (
            f"UPDATE {SCHEMA}.shard SET state = %s, version = version + 1, updated_at = now(), "
            "state_since = CASE WHEN state = %s THEN state_since ELSE clock_timestamp() END"
            + (f", {sets}" if sets else "")
            + " WHERE shard_id = %s AND state = ANY(%s)"
            + f" RETURNING (SELECT state FROM {SCHEMA}.shard WHERE shard_id = %s), state_since"
        )
        vals = [json.dumps(v, default=str) if isinstance(v, dict) else v for v in fields.values()]
        row = conn.execute(q, [to.value, to.value, *vals, sid, [e.value for e in exp], sid]).fetchone()
        if row is None:
            cur = conn.execute(f"SELECT state FROM {SCHEMA}.shard WHERE shard_id = %s", (sid,)).fetchone()
            now = cur[0] if cur else "absent"
            raise StateConflict(f"shard {sid}: expected state {'/'.join(exp)}, found {now}; not moved to {to}")
        # a move into another state is recorded at the time the state machine keeps for it
        self.audit(conn, sid, row[0], to.value, detail or {}, at=row[1] if row[0] != to.value else None)
        return State(row[0])

    @ridden_out
    def keep(self, sid: str, detail: dict, **fields: Any) -> None:
        """Fields the state machine keeps beside the state, set without a move, with the audit
        row that records it (one transaction). A field given `NOW` takes the time of that
        audit row."""
        sets = ", ".join(f"{k} = clock_timestamp()" if v is NOW else f"{k} = %s" for k, v in fields.items())
        vals = [json.dumps(v, default=str) if isinstance(v, dict) else v for v in fields.values() if v is not NOW]
        stamped = next((k for k, v in fields.items() if v is NOW), None)
        with self.connect() as c:
            row = c.execute(
                f"UPDATE {SCHEMA}.shard SET {sets}, updated_at = now() WHERE shard_id = %s "
                f"RETURNING state, {stamped or 'NULL'}",
                [*vals, sid],
            ).fetchone()
            if row is None:
                raise StateConflict(f"shard {sid} does not exist")
            self.audit(c, sid, row[0], row[0], detail, at=row[1])

    @ridden_out
    def move(
        self, sid: str, expected: State | Iterable[State], to: State, detail: dict | None = None, **fields: Any
    ) -> State:
        with self.connect() as c:
            return self.transition(c, sid, expected, to, detail, **fields)

    def audit(
        self, conn: Conn, sid: str | None, src: str | None, dst: str | None, detail: dict, at: datetime | None = None
    ) -> None:
        conn.execute(
            f"INSERT INTO {SCHEMA}.audit (run_id, shard_id, from_state, to_state, detail, at) "
            "VALUES (%s, %s, %s, %s, %s, coalesce(%s, clock_timestamp()))",
            (self.run_id, sid, src, dst, json.dumps(detail, default=str), at),
        )

    @contextlib.contextmanager
    def lock(self, sid: str) -> Iterator[Conn]:
        """Hold the shard for this worker; refuse at once if another worker holds it.

        The lock is its session's, and the session is kept alive by a statement every
        quarter of `dead_session_s` (PostgreSQL's `idle_session_timeout`, 14 and later):
        the server ends the session of a worker that falls silent for `dead_session_s` (a
        dead host, a cut link that no TCP close crosses), so a lost worker holds the shard
        that long at most, and `recover` or the next run takes it then. It opens no
        transaction. The lock is let go explicitly before the session closes: a closed
        session's locks end only when its server process has exited, which can be after
        the next phase (in this process or the next command) already asks for the shard."""
        key = f"migrator:shard:{sid}"
        c = self.connect(autocommit=True)
        got, stop = False, threading.Event()
        beat: threading.Thread | None = None
        try:
            got = c.execute(
                "SELECT set_config('idle_session_timeout', %s, false), pg_try_advisory_lock(hashtextextended(%s, 0))",
                (f"{int(self.dead_session_s * 1000)}ms", key),
            ).fetchone()[1]
            if not got:
                raise ShardBusy(f"shard {sid} is being worked on by another worker")
            beat = threading.Thread(target=_keep_alive, args=(c, stop, self.dead_session_s / 4), daemon=True)
            beat.start()
            yield c
        finally:
            stop.set()
            if beat is not None:
                beat.join()
            if got and not c.broken:
                with contextlib.suppress(psycopg.Error):  # a lost session has let go already
                    c.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
            c.close()

    def resolve(self, wave: str | None, names: list[str] | None, region: str | None = None) -> list[Shard]:
        """The shards a command names: with a wave, its shards (every name must be one of
        them); without, each name must match a shard of exactly one wave."""
        names = list(names or [])
        if wave is None and not names:
            wave = "default"
        found = self.shards(wave=wave, names=names or None, region=region) if self.exists() else []
        if names:
            by_name: dict[str, list[Shard]] = {}
            for s in found:
                for n in names:
                    if n in (s.name, s.shard_id):
                        by_name.setdefault(n, []).append(s)
            missing = [n for n in names if n not in by_name]
            if missing:
                where = f"wave {wave!r}" if wave is not None else "any wave"
                raise SpecError(f"no shard named {', '.join(missing)} in {where}")
            several = {n: ss for n, ss in by_name.items() if len(ss) > 1}
            if several:
                n, ss = sorted(several.items())[0]
                raise SpecError(
                    f"shard name {n!r} is in {len(ss)} waves: give the shard's id "
                    f"({', '.join(s.shard_id for s in ss)}), or name its wave"
                )
        return found

    def purge_started(self, sid: str) -> str:
        """When the shard's purge started: its state's own time while purging, before the
        time it was purged once it is."""
        shard = self.shard(sid)
        if shard.state not in (State.PURGING, State.PURGED) or shard.state_since is None:
            return "at an unrecorded time"
        at = shard.state_since.isoformat(timespec="seconds")
        return at if shard.state == State.PURGING else f"before {at}, when it was purged"

    @ridden_out
    def audit_rows(self, sid: str | None = None) -> list[dict]:
        with self.connect(autocommit=True) as c, c.cursor(row_factory=dict_row) as cur:
            if sid:
                return cur.execute(f"SELECT * FROM {SCHEMA}.audit WHERE shard_id = %s ORDER BY id", (sid,)).fetchall()
            return cur.execute(f"SELECT * FROM {SCHEMA}.audit ORDER BY id").fetchall()
