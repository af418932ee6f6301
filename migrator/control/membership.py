"""What the control database keeps of a shard's members and progress: its users and their
batches, each committed batch's checkpoint, the change log's catch-up positions, and the
held users of a rolled-back shard. `Control` (`store`) takes it in, with its connection."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from migrator.control.state import State
from migrator.errors import ControlUnavailable, describe
from migrator.schema import history
from migrator.stores import is_transient
from migrator.stores.postgres import Conn, pipe, where

SCHEMA = history.SCHEMA
# the shards (`s`) holding some of a shard's (`me`) users (`o`), for a WHERE to narrow
_SHARING = (
    f"FROM {SCHEMA}.shard_user su JOIN {SCHEMA}.shard_user o ON o.user_key = su.user_key AND o.shard_id <> su.shard_id "
    f"JOIN {SCHEMA}.shard s ON s.shard_id = o.shard_id JOIN {SCHEMA}.shard me ON me.shard_id = su.shard_id "
    "WHERE su.shard_id = %s AND"
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

    def __init__(self, ctl: Membership, sid: str, count: int, sort: Callable[[list[str]], list[str]]):
        self._ctl, self._sid, self._count, self._sort = ctl, sid, count, sort

    def __getitem__(self, b: int) -> list[str]:
        if not isinstance(b, int) or not 0 <= b < self._count:
            raise KeyError(b)
        return self._sort(self._ctl.batch(self._sid, b))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._count))

    def __len__(self) -> int:
        return self._count


def _worth_waiting(exc: BaseException) -> bool:
    return is_transient(exc) and not isinstance(exc, ControlUnavailable)


def ride_out(dsn: str, seconds: float, fn: Callable[[], Any]) -> Any:
    """`fn()` (one transaction of its own) retried through a transient outage of the control
    database for up to `seconds` (a restart, a failover): the one level at which the control
    database's calls are retried. Past it, ControlUnavailable, which nothing in this process
    retries again (a call that rides out an outage inside another does not double it)."""
    try:
        for attempt in Retrying(
            retry=retry_if_exception(_worth_waiting),
            stop=stop_after_delay(seconds),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        ):
            with attempt:
                return fn()
    except Exception as exc:
        if _worth_waiting(exc):
            raise ControlUnavailable(f"{where(dsn)}: away for more than {seconds:g} s ({describe(exc)})") from exc
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def ridden_out(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A Control method ridden out through an outage of the control database (`ride_out`)."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return ride_out(self.dsn, self.outage_s, lambda: fn(self, *args, **kwargs))

    return wrapper


class Membership:
    """The shard's members and progress (a part of `Control`, which gives it `connect`)."""

    dsn: str
    outage_s: float
    connect: Callable[..., Conn]

    def batches_of(self, sid: str) -> int:
        """How many batches the shard has (the store reads its row)."""
        raise NotImplementedError

    def hold(self, conn: Conn, sid: str, reason: str) -> int:
        """Hold the shard's users (in the caller's transaction); how many."""
        return conn.execute(
            f"INSERT INTO {SCHEMA}.held_users (user_key, shard_id, reason) SELECT user_key, shard_id, %s "
            f"FROM {SCHEMA}.shard_user WHERE shard_id = %s "
            "ON CONFLICT (user_key) DO UPDATE SET shard_id = EXCLUDED.shard_id, reason = EXCLUDED.reason, at = now()",
            (reason or "rolled back", sid),
        ).rowcount

    @ridden_out
    def held(self, sid: str) -> tuple[int, str | None]:
        """(users held, reason) of the shard."""
        with self.connect(autocommit=True) as c:
            n, reason = c.execute(
                f"SELECT count(*), max(reason) FROM {SCHEMA}.held_users WHERE shard_id = %s", (sid,)
            ).fetchone()
        return n, reason

    def release(self, conn: Conn, sid: str) -> int:
        return conn.execute(f"DELETE FROM {SCHEMA}.held_users WHERE shard_id = %s", (sid,)).rowcount

    @ridden_out
    def superseded_by(self, sid: str) -> list[str]:
        """Live shards of other waves that now hold this (rolled-back, released) shard's users."""
        return self._sharing(sid, "s.state <> %s", (State.ROLLED_BACK.value,))

    @ridden_out
    def moved_on(self, sid: str) -> list[str]:
        """Shards planned after this one that took some of its users on from where it moved
        them, whatever became of them: from their capture's start the users' writes there
        were logged for the later shard, so this one cannot carry them back."""
        return self._sharing(sid, "s.created_at > me.created_at", ())

    @ridden_out
    def taken_back(self, sid: str, origin: str) -> dict[str, list[str]]:
        """Shards planned after this one that take (or took) some of its users back to its
        origin `origin`, a move back, with those users: their rows there are the later
        shard's business, not this one's retained copy any more."""
        return self._users_sharing(sid, "s.created_at > me.created_at AND s.region = %s", (origin,))

    @ridden_out
    def left_before(self, sid: str, source: str) -> dict[str, list[str]]:
        """Shards planned before this one that moved some of its users away from its
        destination (their origin, `source` when they have none), with those users: what
        such a shard left there (a copy kept until its purge, or what the purge kept) is
        replaced by this shard's copy."""
        return self._users_sharing(
            sid, "s.created_at < me.created_at AND coalesce(s.origin, %s) = me.region", (source,)
        )

    def _users_sharing(self, sid: str, where: str, args: tuple) -> dict[str, list[str]]:
        """The other shards that hold some of this one's users, narrowed by `where`, with those users."""
        out: dict[str, list[str]] = {}
        with self.connect(autocommit=True) as c:
            q = f"SELECT o.shard_id, o.user_key {_SHARING} {where} ORDER BY 1, 2"
            for other, key in c.execute(q, (sid, *args)):
                out.setdefault(other, []).append(key)
        return out

    def _sharing(self, sid: str, where: str, args: tuple) -> list[str]:
        """The other shards (`s`) that hold some of this one's (`me`) users, narrowed by `where`."""
        with self.connect(autocommit=True) as c:
            return [r[0] for r in c.execute(f"SELECT DISTINCT o.shard_id {_SHARING} {where} ORDER BY 1", (sid, *args))]

    # --- membership and checkpoints ---------------------------------------------------
    def batch_keys(self, sid: str, sort: Callable[[list[str]], list[str]] = sorted) -> ShardBatches:
        """The shard's batches by number; each batch's keys are read when asked for."""
        return ShardBatches(self, sid, self.batches_of(sid), sort)

    @ridden_out
    def batch(self, sid: str, b: int) -> list[str]:
        with self.connect(autocommit=True) as c:
            return [
                k
                for (k,) in c.execute(
                    f"SELECT user_key FROM {SCHEMA}.shard_user WHERE shard_id = %s AND batch_no = %s", (sid, b)
                )
            ]

    def send_members(self, sid: str, into: Conn, table: str, not_homed_at: str | None = None) -> int:
        """Stream the shard's (user key, batch number) pairs into `table` (k, b) over `into`;
        with `not_homed_at`, but the users the directory homes there."""
        away = (
            ""
            if not_homed_at is None
            else f" AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.directory d WHERE d.user_key = su.user_key AND d.home = %s)"
        )
        with self.connect() as c:
            return pipe(
                c,
                f"COPY (SELECT user_key, batch_no FROM {SCHEMA}.shard_user su WHERE shard_id = %s{away}) TO STDOUT",
                (sid,) if not_homed_at is None else (sid, not_homed_at),
                into,
                sql.SQL("COPY {} (k, b) FROM STDIN").format(sql.Identifier(table)),
            )

    @ridden_out
    def checkpoints(self, sid: str) -> dict[int, BatchRecord]:
        with self.connect(autocommit=True) as c:
            rows = c.execute(
                f"SELECT batch_no, last_key, rows, digest FROM {SCHEMA}.checkpoint WHERE shard_id = %s", (sid,)
            ).fetchall()
        return {b: BatchRecord(k, r, d) for b, k, r, d in rows}

    @ridden_out
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

    @ridden_out
    def position(self, sid: str, direction: str) -> tuple[int, int]:
        """(horizon, last id) of the shard's catch-up in `direction`; (0, 0) before the first pass."""
        with self.connect(autocommit=True) as c:
            r = c.execute(
                f"SELECT horizon, last_id FROM {SCHEMA}.capture_pos WHERE shard_id = %s AND direction = %s",
                (sid, direction),
            ).fetchone()
        return (r[0], r[1]) if r else (0, 0)

    @ridden_out
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
