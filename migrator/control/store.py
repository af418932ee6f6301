"""The control database: shard state, checkpoints, shard membership, the ownership
directory and the audit trail.

Every change of a shard's phase is one compare-and-set (`UPDATE ... WHERE state = ANY(
expected)`) committed together with its audit row. A worker also holds a session advisory
lock on the shard while it works on it, so a second worker is turned away at once and a
killed worker's lock dies with its connection, letting a rerun resume immediately.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from migrator.control.state import Phase, allowed
from migrator.errors import ShardBusy, SpecError, StateConflict, riding_out
from migrator.schema import history
from migrator.stores.postgres import Conn, connect, pipe

SCHEMA = history.SCHEMA


@dataclass
class Shard:
    shard_id: str
    wave: str
    name: str
    region: str
    idx: int
    state: Phase
    version: int
    users: int
    batches: int
    plan: dict
    digest: str | None
    error: str | None

    @classmethod
    def from_row(cls, r: dict) -> Shard:
        return cls(
            r["shard_id"],
            r["wave"],
            r["name"],
            r["region"],
            r["idx"],
            Phase(r["state"]),
            r["version"],
            r["users"],
            r["batches"],
            r["plan"] or {},
            r["digest"],
            r["error"],
        )


@dataclass(frozen=True)
class BatchRecord:
    """What one committed batch wrote: its last user key, rows per table and the digest of
    the bytes streamed (a checkpoint in the control database, a ledger row at the destination)."""

    last_key: str
    rows: dict[str, int]
    digest: str


class ShardBatches(Mapping[int, list[str]]):
    """A shard's batches by number (0 .. batches - 1). A batch's keys are read from the
    control database when it is asked for, so the row phases never hold a whole shard's keys."""

    def __init__(self, ctl: Control, sid: str, count: int, sort: Callable[[list[str]], list[str]]):
        self._ctl, self._sid, self._count, self._sort = ctl, sid, count, sort

    def __getitem__(self, b: int) -> list[str]:
        if not isinstance(b, int) or not 0 <= b < self._count:
            raise KeyError(b)
        return self._sort(self._ctl.batch(self._sid, b))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._count))

    def __len__(self) -> int:
        return self._count


def shard_id(wave: str, name: str) -> str:
    return f"{wave}/{name}"


def _ridden_out(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Retry a Control method (one transaction of its own) through a transient outage of
    the control database, for up to its `outage_s`."""

    @functools.wraps(fn)
    def wrapper(self: Control, *args: Any, **kwargs: Any) -> Any:
        for attempt in riding_out(self.outage_s):
            with attempt:
                return fn(self, *args, **kwargs)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


class Control:
    def __init__(self, dsn: str, run_id: str, outage_s: float = 60.0):
        self.dsn = dsn
        self.run_id = run_id
        self.outage_s = outage_s
        self._current = False  # the schema brought up to date by this process (see `ensure`)

    def connect(self, autocommit: bool = False) -> Conn:
        """A connection to the control database, its tables (where there are any yet) brought
        to the head of their schema history first (once per Control; `plan` creates them, so
        a dry run against a fresh database leaves it empty); establishing it rides out an outage."""
        if not self._current and self.exists():
            self.ensure()
        for attempt in riding_out(self.outage_s):
            with attempt:
                return connect(self.dsn, autocommit=autocommit)
        raise AssertionError("unreachable")  # pragma: no cover

    @_ridden_out
    def record(self, sid: str | None, state: str | None, detail: dict) -> None:
        """An audit row of its own (no move of the shard's state)."""
        with self.connect() as c:
            self.audit(c, sid, state, state, detail)

    # --- schema -----------------------------------------------------------------------
    @_ridden_out
    def exists(self) -> bool:
        with connect(self.dsn, autocommit=True) as c:  # looks, creates nothing
            return c.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.meta",)).fetchone()[0]

    @_ridden_out
    def ensure(self) -> None:
        """The control tables at the head of their schema history (`migrator.schema`)."""
        history.ensure(self.dsn, history.CONTROL)
        self._current = True

    # --- shards -----------------------------------------------------------------------
    @_ridden_out
    def shards(
        self,
        wave: str | None = None,
        names: Iterable[str] | None = None,
        region: str | None = None,
        states: Iterable[Phase] | None = None,
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

    @_ridden_out
    def shard(self, sid: str) -> Shard:
        with self.connect(autocommit=True) as c, c.cursor(row_factory=dict_row) as cur:
            r = cur.execute(f"SELECT * FROM {SCHEMA}.shard WHERE shard_id = %s", (sid,)).fetchone()
        if r is None:
            raise StateConflict(f"shard {sid} does not exist")
        return Shard.from_row(r)

    def transition(
        self,
        conn: Conn,
        sid: str,
        expected: Phase | Iterable[Phase],
        to: Phase,
        detail: dict | None = None,
        **fields: Any,
    ) -> Phase:
        """Compare-and-set the shard's phase inside the caller's transaction, with its audit row."""
        exp = [expected] if isinstance(expected, Phase) else list(expected)
        exp = [e for e in exp if allowed(e, to)]
        if not exp:
            raise StateConflict(f"shard {sid}: a move to {to} is not allowed from {expected}")
        sets = ", ".join(f"{k} = %s" for k in fields)
        q = (
            f"UPDATE {SCHEMA}.shard SET state = %s, version = version + 1, updated_at = now()"
            + (f", {sets}" if sets else "")
            + " WHERE shard_id = %s AND state = ANY(%s)"
            + f" RETURNING (SELECT state FROM {SCHEMA}.shard WHERE shard_id = %s)"
        )
        vals = [json.dumps(v) if isinstance(v, dict) else v for v in fields.values()]
        row = conn.execute(q, [to.value, *vals, sid, [e.value for e in exp], sid]).fetchone()
        if row is None:
            cur = conn.execute(f"SELECT state FROM {SCHEMA}.shard WHERE shard_id = %s", (sid,)).fetchone()
            now = cur[0] if cur else "absent"
            raise StateConflict(f"shard {sid}: expected state {'/'.join(exp)}, found {now}; not moved to {to}")
        self.audit(conn, sid, row[0], to.value, detail or {})
        return Phase(row[0])

    @_ridden_out
    def move(
        self, sid: str, expected: Phase | Iterable[Phase], to: Phase, detail: dict | None = None, **fields: Any
    ) -> Phase:
        with self.connect() as c:
            return self.transition(c, sid, expected, to, detail, **fields)

    def audit(self, conn: Conn, sid: str | None, src: str | None, dst: str | None, detail: dict) -> None:
        conn.execute(
            f"INSERT INTO {SCHEMA}.audit (run_id, shard_id, from_state, to_state, detail) VALUES (%s, %s, %s, %s, %s)",
            (self.run_id, sid, src, dst, json.dumps(detail, default=str)),
        )

    @contextlib.contextmanager
    def lock(self, sid: str) -> Iterator[Conn]:
        """Hold the shard for this worker; refuse at once if another worker holds it.

        The lock is let go explicitly before the session closes: a closed session's locks
        end only when its server process has exited, which can be after the next phase
        (in this process or the next command) already asks for the shard."""
        key = f"migrator:shard:{sid}"
        c = self.connect(autocommit=True)
        got = False
        try:
            got = c.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()[0]
            if not got:
                raise ShardBusy(f"shard {sid} is being worked on by another worker")
            yield c
        finally:
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
                    f"shard name {n!r} matches {len(ss)} shards ({', '.join(s.shard_id for s in ss)}); "
                    "give --wave or the shard id"
                )
        return found

    def hold(self, conn: Conn, sid: str, reason: str) -> int:
        """Hold the shard's users (in the caller's transaction); how many."""
        return conn.execute(
            f"INSERT INTO {SCHEMA}.held_users (user_key, shard_id, reason) SELECT user_key, shard_id, %s "
            f"FROM {SCHEMA}.shard_user WHERE shard_id = %s "
            "ON CONFLICT (user_key) DO UPDATE SET shard_id = EXCLUDED.shard_id, reason = EXCLUDED.reason, at = now()",
            (reason or "rolled back", sid),
        ).rowcount

    @_ridden_out
    def held(self, sid: str) -> tuple[int, str | None]:
        """(users held, reason) of the shard."""
        with self.connect(autocommit=True) as c:
            n, reason = c.execute(
                f"SELECT count(*), max(reason) FROM {SCHEMA}.held_users WHERE shard_id = %s", (sid,)
            ).fetchone()
        return n, reason

    def release(self, conn: Conn, sid: str) -> int:
        return conn.execute(f"DELETE FROM {SCHEMA}.held_users WHERE shard_id = %s", (sid,)).rowcount

    @_ridden_out
    def superseded_by(self, sid: str) -> list[str]:
        """Live shards of other waves that now hold this (rolled-back, released) shard's users."""
        with self.connect(autocommit=True) as c:
            return [
                r[0]
                for r in c.execute(
                    f"SELECT DISTINCT o.shard_id FROM {SCHEMA}.shard_user su JOIN {SCHEMA}.shard_user o "
                    "ON o.user_key = su.user_key AND o.shard_id <> su.shard_id "
                    f"JOIN {SCHEMA}.shard s ON s.shard_id = o.shard_id "
                    "WHERE su.shard_id = %s AND s.state <> %s ORDER BY 1",
                    (sid, Phase.ROLLED_BACK.value),
                )
            ]

    # --- membership and checkpoints ---------------------------------------------------
    def batch_keys(self, sid: str, sort: Callable[[list[str]], list[str]] = sorted) -> ShardBatches:
        """The shard's batches by number; each batch's keys are read when asked for."""
        return ShardBatches(self, sid, self.shard(sid).batches, sort)

    @_ridden_out
    def batch(self, sid: str, b: int) -> list[str]:
        with self.connect(autocommit=True) as c:
            return [
                k
                for (k,) in c.execute(
                    f"SELECT user_key FROM {SCHEMA}.shard_user WHERE shard_id = %s AND batch_no = %s", (sid, b)
                )
            ]

    def send_members(self, sid: str, into: Conn, table: str) -> int:
        """Stream the shard's (user key, batch number) pairs into `table` (k, b) over `into`."""
        with self.connect() as c:
            return pipe(
                c,
                f"COPY (SELECT user_key, batch_no FROM {SCHEMA}.shard_user WHERE shard_id = %s) TO STDOUT",
                (sid,),
                into,
                sql.SQL("COPY {} (k, b) FROM STDIN").format(sql.Identifier(table)),
            )

    @_ridden_out
    def checkpoints(self, sid: str) -> dict[int, BatchRecord]:
        with self.connect(autocommit=True) as c:
            rows = c.execute(
                f"SELECT batch_no, last_key, rows, digest FROM {SCHEMA}.checkpoint WHERE shard_id = %s", (sid,)
            ).fetchall()
        return {b: BatchRecord(k, r, d) for b, k, r, d in rows}

    @_ridden_out
    def save_checkpoint(self, sid: str, batch_no: int, rec: BatchRecord) -> None:
        with self.connect() as c:
            c.execute(
                f"INSERT INTO {SCHEMA}.checkpoint (shard_id, batch_no, last_key, rows, digest) "
                "VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (shard_id, batch_no) DO UPDATE SET last_key = EXCLUDED.last_key, rows = EXCLUDED.rows, "
                "digest = EXCLUDED.digest, at = now()",
                (sid, batch_no, rec.last_key, json.dumps(rec.rows), rec.digest),
            )

    def clear_checkpoints(self, conn: Conn, sid: str) -> None:
        conn.execute(f"DELETE FROM {SCHEMA}.checkpoint WHERE shard_id = %s", (sid,))

    @_ridden_out
    def position(self, sid: str, direction: str) -> tuple[int, int]:
        """(horizon, last id) of the shard's catch-up in `direction`; (0, 0) before the first pass."""
        with self.connect(autocommit=True) as c:
            r = c.execute(
                f"SELECT horizon, last_id FROM {SCHEMA}.capture_pos WHERE shard_id = %s AND direction = %s",
                (sid, direction),
            ).fetchone()
        return (r[0], r[1]) if r else (0, 0)

    @_ridden_out
    def set_position(self, sid: str, direction: str, pos: tuple[int, int]) -> None:
        with self.connect() as c:
            c.execute(
                f"INSERT INTO {SCHEMA}.capture_pos (shard_id, direction, horizon, last_id) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (shard_id, direction) "
                "DO UPDATE SET horizon = EXCLUDED.horizon, last_id = EXCLUDED.last_id",
                (sid, direction, *pos),
            )

    def clear_positions(self, conn: Conn, sid: str) -> None:
        conn.execute(f"DELETE FROM {SCHEMA}.capture_pos WHERE shard_id = %s", (sid,))

    # --- directory --------------------------------------------------------------------
    @_ridden_out
    def entered(self, sid: str, state: Phase) -> datetime | None:
        """When the shard last moved into `state` (from another state), from the audit."""
        with self.connect(autocommit=True) as c:
            return c.execute(
                f"SELECT max(at) FROM {SCHEMA}.audit WHERE shard_id = %s AND to_state = %s "
                "AND from_state IS DISTINCT FROM to_state",
                (sid, state.value),
            ).fetchone()[0]

    def purge_started(self, sid: str) -> str:
        at = self.entered(sid, Phase.PURGING)
        return at.isoformat(timespec="seconds") if at else "at an unrecorded time"

    @_ridden_out
    def audit_rows(self, sid: str | None = None) -> list[dict]:
        with self.connect(autocommit=True) as c, c.cursor(row_factory=dict_row) as cur:
            if sid:
                return cur.execute(f"SELECT * FROM {SCHEMA}.audit WHERE shard_id = %s ORDER BY id", (sid,)).fetchall()
            return cur.execute(f"SELECT * FROM {SCHEMA}.audit ORDER BY id").fetchall()
