"""The application's side of a move: a small routing client that sends each user's writes
to their home and never loses one to a stale cache.

The directory (`migrator.directory` in the control database, or a replica of it) says
which region is each user's home and the epoch of that home (+1 at every cutover and
rollback). An application caches it, and a cached home goes stale the moment a shard
cuts over or rolls back. Two things tell the client so:

* the old home refuses the write with SQLSTATE RMF01: the source after a cutover, the
  destination after a rollback (and any region while a shard's fence is up), an INSERT
  of a new row included;
* an UPDATE or DELETE at an old home can find no row (a rollback removed them from the
  destination): a trigger cannot fire on a row that is not there, so the client treats a
  write that touched nothing as a question to the directory. When the user's home has
  changed since the write was routed, the write runs again at the new home; when it has
  not, nothing was there to write and the answer stands.

Either way the cached home is dropped and read again; a write is retried only at a home
the directory names. A `Router` holds one connection per region and is not shared
between threads (one per thread, as a connection is).

    router = Router(control_dsn, {"us": ..., "ie": ..., "no": ...}, default="us")
    router.write(user_id, lambda c: c.execute("UPDATE users SET ... WHERE user_id = %s", (uid,)).rowcount)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psycopg

from migrator.capture import FENCED
from migrator.control.store import SCHEMA


@dataclass(frozen=True)
class Home:
    region: str
    epoch: int  # 0 for a user the directory does not know yet (homed at the default)


class StillFenced(Exception):
    """The user's writes were refused at every home the directory named, for as long as
    the client waits (a shard's fence window is seconds; this is longer)."""


class Router:
    def __init__(
        self,
        directory_dsn: str,
        regions: Mapping[str, str],
        default: str,
        *,
        ttl_s: float = 30.0,
        wait_s: float = 0.02,
        give_up_s: float = 120.0,
    ):
        self.directory_dsn, self.regions, self.default = directory_dsn, dict(regions), default
        self.ttl_s, self.wait_s, self.give_up_s = ttl_s, wait_s, give_up_s
        self._cache: dict[str, tuple[Home, float]] = {}
        self._conns: dict[str, psycopg.Connection] = {}
        self._directory: psycopg.Connection | None = None
        self.refused = 0  # writes an old home refused (RMF01)
        self.rerouted = 0  # writes that touched no row at an old home and ran again at the new one

    def home(self, user: object) -> Home:
        """The user's home: cached for `ttl_s`, read from the directory otherwise."""
        key = str(user)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[1] < self.ttl_s:
            return hit[0]
        home = self._read(key)
        self._cache[key] = (home, time.monotonic())
        return home

    def forget(self, user: object) -> None:
        self._cache.pop(str(user), None)

    def write(self, user: object, statement: Callable[[psycopg.Connection], int]) -> int:
        """Run `statement` (which returns the rows it touched) in one transaction at the
        user's home; rerouted as the module says. Returns the rows touched at the home."""
        give_up = time.monotonic() + self.give_up_s
        while True:
            home = self.home(user)
            conn = self._conn(home.region)
            try:
                with conn.transaction():
                    touched = statement(conn)
            except psycopg.Error as exc:
                if exc.sqlstate != FENCED:
                    if isinstance(exc, psycopg.OperationalError):
                        self._drop(home.region)
                    raise
                self.refused += 1
                self.forget(user)
                if time.monotonic() > give_up:
                    raise StillFenced(f"writes refused at {home.region} for {self.give_up_s:.0f} s") from None
                time.sleep(self.wait_s)
                continue
            if touched:
                return touched
            self.forget(user)
            if self.home(user) == home:
                return 0  # routed right: there was nothing to write
            self.rerouted += 1

    def close(self) -> None:
        for c in [*self._conns.values(), self._directory]:
            if c is not None:
                c.close()
        self._conns.clear()
        self._directory = None

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _read(self, key: str) -> Home:
        if self._directory is None or self._directory.closed:
            self._directory = psycopg.connect(self.directory_dsn, autocommit=True)
        try:
            row = self._directory.execute(
                f"SELECT home, epoch FROM {SCHEMA}.directory WHERE user_key = %s", (key,)
            ).fetchone()
        except psycopg.errors.UndefinedTable:  # nothing migrated yet
            row = None
        except psycopg.OperationalError:
            self._directory.close()
            raise
        return Home(row[0], row[1]) if row else Home(self.default, 0)

    def _conn(self, region: str) -> psycopg.Connection:
        c = self._conns.get(region)
        if c is None or c.closed:
            c = self._conns[region] = psycopg.connect(self.regions[region], autocommit=True)
        return c

    def _drop(self, region: str) -> None:
        c = self._conns.pop(region, None)
        if c is not None:
            c.close()
