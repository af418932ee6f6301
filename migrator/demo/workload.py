"""A writer that acts like the application: it routes each write through the routing client
(homes cached, a stale one corrected by the old home's refusal or by a write that touched
no row there), inserts, updates and deletes across the entity graph at a steady rate, and
records every write that was acknowledged, so a test can check that none was lost."""

from __future__ import annotations

import functools
import multiprocessing
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migrator.routing import Router, StillFenced


@dataclass
class Acked:
    inserted: dict[int, int] = field(default_factory=dict)  # login event id -> user
    deleted: set[int] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)  # user -> last display_name written
    comments: dict[int, tuple[int, str]] = field(default_factory=dict)  # comment id -> (owner, last body): two hops
    fenced: int = 0  # writes an old home refused (RMF01), each retried at the user's home
    rerouted: int = 0  # writes that touched no row at an old home, each run again at the new one
    ops: int = 0


class Writer:
    def __init__(
        self,
        dsn: dict[str, str],
        control: str,
        users: list[int],
        threads: int = 2,
        rate_hz: float = 200,
        seed: int = 7,
        first_event: int = 10**9,
    ):
        self.dsn, self.control = dsn, control
        self.parts = [users[i::threads] for i in range(threads)]
        self.rate = rate_hz / threads
        self.acked = Acked()
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i, seed + i), daemon=True) for i in range(threads)]
        self.errors: list[str] = []
        self.first_event = first_event
        self._refused = [0] * threads
        self._rerouted = [0] * threads

    def start(self) -> Writer:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> Acked:
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)
        return self.acked

    def _ack(self, op: tuple[str, Any], user: int, n: int, got: list[int], mine: dict[int, list[int]]) -> None:
        """Record a write its home acknowledged (under the lock)."""
        kind, arg = op
        if kind == "insert":
            self.acked.inserted[arg] = user
            mine.setdefault(user, []).append(arg)
        elif kind == "name":
            if n != 1:
                self.errors.append(f"an update of a user's row found {n} rows at their home")
            self.acked.names[user] = arg
        elif kind == "comment":
            if n:
                self.acked.comments[got[0]] = (user, arg)
        else:
            if n != 1:
                self.errors.append(f"delete of an acknowledged insert found {n} rows")
            self.acked.deleted.add(arg)
            mine[user].remove(arg)

    def _run(self, i: int, seed: int) -> None:
        rnd = random.Random(seed)
        users = self.parts[i]
        # user -> the events this thread inserted for them and has not deleted, oldest first
        # (kept per user: a scan of every event inserted so far would slow the writer down
        # the longer it runs, and a long run would then measure the writer, not the stores)
        mine: dict[int, list[int]] = {}
        next_event = self.first_event + i * 10**7
        # Homes cached as an application caches them: a stale one is told apart by the
        # old home's refusal or by a write that touched no row there (see `routing`).
        router = Router(self.control, self.dsn, default="us", give_up_s=5.0)
        while not self.stop_flag.is_set():
            user = rnd.choice(users)
            kind = rnd.random()
            op: tuple[str, Any]
            if kind < 0.45:
                op = ("insert", next_event)
                next_event += 1
            elif kind < 0.7:
                op = ("name", f"w{i}-{rnd.randrange(10**9)}")
            elif kind < 0.85:
                op = ("comment", f"c{i}-{rnd.randrange(10**9)}")
            else:
                own = mine.get(user)
                if not own:
                    continue
                op = ("delete", rnd.choice(own))
            got: list[int] = []  # the comment a comment's update wrote
            write = functools.partial(_statement, op=op, user=user, got=got)
            while not self.stop_flag.is_set():  # until acknowledged, as an application would
                try:
                    n = router.write(user, write)
                except (StillFenced, psycopg.OperationalError):
                    time.sleep(0.005)
                    continue
                except psycopg.Error as e:
                    self.errors.append(f"{type(e).__name__}: {getattr(e, 'sqlstate', '')}")
                    time.sleep(0.005)
                    continue
                with self.lock:
                    self._ack(op, user, n, got, mine)
                    self.acked.ops += 1
                    self.acked.fenced = self.acked.fenced - self._refused[i] + router.refused
                    self._refused[i] = router.refused
                    self.acked.rerouted = self.acked.rerouted - self._rerouted[i] + router.rerouted
                    self._rerouted[i] = router.rerouted
                break
            time.sleep(1 / self.rate)
        router.close()


def _statement(c: psycopg.Connection, op: tuple[str, Any], user: int, got: list[int]) -> int:
    """One write of the writer's at the home the router chose: the rows it touched."""
    kind, arg = op
    if kind == "insert":
        return c.execute("INSERT INTO login_events VALUES (%s, %s, '192.0.2.1', now(), true)", (arg, user)).rowcount
    if kind == "name":
        return c.execute("UPDATE users SET display_name = %s WHERE user_id = %s", (arg, user)).rowcount
    if kind == "comment":
        got[:] = [
            r[0]
            for r in c.execute(
                "UPDATE comments SET body = %s WHERE comment_id = (SELECT min(c.comment_id) "
                "FROM comments c JOIN videos v USING (video_id) WHERE v.user_id = %s) RETURNING comment_id",
                (arg, user),
            )
        ]
        return len(got)
    return c.execute("DELETE FROM login_events WHERE event_id = %s", (arg,)).rowcount


class WriterProcess:
    """The same writer in a process of its own, as the application is: its threads share no
    interpreter lock with the migrator's (for the benchmark, where the writer's throughput
    is the figure). `start` returns once the writer is about to write."""

    def __init__(self, *args: Any, **kwargs: Any):
        mp = multiprocessing.get_context("spawn")
        self._ready, self._stop, self._out = mp.Event(), mp.Event(), mp.Queue()
        self._proc = mp.Process(target=_serve, args=(args, kwargs, self._ready, self._stop, self._out))
        self._proc.daemon = True
        self.errors: list[str] = []

    def start(self) -> WriterProcess:
        self._proc.start()
        if not self._ready.wait(120):
            self._proc.kill()
            raise RuntimeError("the writer process did not start")
        return self

    def stop(self) -> Acked:
        self._stop.set()
        acked, self.errors = self._out.get(timeout=120)
        self._proc.join(60)
        return acked


def _serve(args: tuple, kwargs: dict, ready: Any, stop: Any, out: Any) -> None:
    w = Writer(*args, **kwargs)
    ready.set()
    w.start()
    stop.wait()
    acked = w.stop()
    out.put((acked, w.errors))


def check(dsn: dict[str, str], control: str, acked: Acked) -> None:
    """Every acknowledged write is in its user's home region, exactly once."""
    with psycopg.connect(control) as c:
        homes = {int(k): h for k, h in c.execute("SELECT user_key, home FROM migrator.directory")}
    conns = {r: psycopg.connect(d) for r, d in dsn.items()}
    try:
        for event, user in acked.inserted.items():
            home = conns[homes.get(user, "us")]
            n = home.execute(
                "SELECT count(*) FROM login_events WHERE event_id = %s AND user_id = %s", (event, user)
            ).fetchall()[0][0]
            want = 0 if event in acked.deleted else 1
            assert n == want, f"event {event} of user {user}: {n} row(s) in {homes.get(user, 'us')}, expected {want}"
        for user, name in acked.names.items():
            got = (
                conns[homes.get(user, "us")]
                .execute("SELECT display_name FROM users WHERE user_id = %s", (user,))
                .fetchone()
            )
            assert got == (name,), f"user {user}: last acknowledged name lost in {homes.get(user, 'us')}"
        for comment, (user, body) in acked.comments.items():
            got = (
                conns[homes.get(user, "us")]
                .execute("SELECT body FROM comments WHERE comment_id = %s", (comment,))
                .fetchone()
            )
            assert got == (body,), f"comment {comment}: last acknowledged body lost in {homes.get(user, 'us')}"
    finally:
        for c in conns.values():
            c.close()
