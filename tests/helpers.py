"""Helpers the integration tests share: users to write for, a region brought to verified,
a command stopped at a pause point, a live Airflow for the world, the benchmark run."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from tests.conftest import ROOT, World

if TYPE_CHECKING:
    from migrator.demo.airflow_services import AirflowServices


def movers(w: World, n_per_region: int = 40) -> list[int]:
    """Users the writer works on: some bound for each region, and some who stay."""
    out = []
    for codes in (["DE", "FR", "IE", "IT", "ES"], ["NO", "SE", "DK"], ["US", "CA"]):
        out += [
            u
            for (u,) in w.rows(
                "us",
                "SELECT user_id FROM users WHERE country_code = ANY(%s) ORDER BY user_id LIMIT %s",
                (codes, n_per_region),
            )
        ]
    return out


def no_capture_left(w: World, regions=("us", "ie", "no")) -> None:
    """Nothing is logged or fenced any more; a region keeps its guards only for users a
    rollback took away from it (they are homed elsewhere, and it refuses their writes)."""
    for r in regions:
        has = w.rows(r, "SELECT to_regclass('migrator.departed')")[0][0] is not None
        if has and w.rows(r, "SELECT count(*) FROM migrator.departed")[0][0]:
            for t in ("changes", "capture_users", "fenced_users", "fences"):
                assert w.rows(r, f"SELECT count(*) FROM migrator.{t}")[0][0] == 0, (r, t)
            homed_here = {k for (k,) in w.ctl("SELECT user_key FROM migrator.directory WHERE home = %s", (r,))}
            departed = {k for (k,) in w.rows(r, "SELECT user_key FROM migrator.departed")}
            assert not departed & homed_here, r
            continue
        assert w.rows(r, "SELECT count(*) FROM pg_trigger WHERE tgname = 'migrator_guard'")[0][0] == 0, r
        assert w.rows(r, "SELECT to_regclass('migrator.changes')")[0][0] is None, r


def verified_region(world: World, region: str) -> int:
    """Plan, then copy and verify the region's shards; returns the region's first user."""
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy", "--region", region).returncode == 0
    assert world.migrator("verify", "--region", region).returncode == 0
    return int(
        world.ctl(
            "SELECT min(su.user_key::bigint) FROM migrator.shard_user su JOIN migrator.shard s "
            "USING (shard_id) WHERE s.region = %s",
            (region,),
        )[0][0]
    )


def start(w: World, *args: str, env: dict[str, str] | None = None, out: int = subprocess.DEVNULL) -> subprocess.Popen:
    """`migrator ARGS --config SPEC` in its own process, as a runbook would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "migrator.cli", *args, "--config", str(w.spec_path)],
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        stdout=out,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def reached(w: World, at: str) -> bool:
    """Whether a command has paused at the pause point `at` (its audit row; none before
    the command has made the control schema)."""
    if not w.ctl("SELECT to_regclass('migrator.audit')")[0][0]:
        return False
    return bool(w.ctl("SELECT count(*) FROM migrator.audit WHERE detail->>'event' = %s", (f"paused at {at}",))[0][0])


def paused(
    w: World, at: str, *args: str, seconds: float = 60, env: dict[str, str] | None = None, out: int = subprocess.DEVNULL
) -> subprocess.Popen:
    """The command started and returned once it has paused (for `seconds`) at `at`."""
    proc = start(w, *args, env={"MIGRATOR_PAUSE_AT": at, "MIGRATOR_PAUSE_S": str(seconds), **(env or {})}, out=out)
    t0 = time.monotonic()
    while not reached(w, at):
        assert proc.poll() is None and time.monotonic() - t0 < 120, f"{args[0]} never reached {at}"
        time.sleep(0.05)
    return proc


def paused_cutover(world: World, region: str, at: str, seconds: float = 4) -> subprocess.Popen:
    """`migrator cutover --region R --json` in its own process, returned once it has paused
    (for `seconds`) at the pause point `at`."""
    return paused(world, at, "cutover", "--region", region, "--json", seconds=seconds, out=subprocess.PIPE)


_MIGRATED: set[str] = set()  # servers holding AIRFLOW_TEMPLATE, migrated by this process
AIRFLOW_TEMPLATE = "airflow_template"


def airflow_for(world: World, tmp_path: Path, **env: str) -> tuple[Path, dict[str, str], str]:
    """An Airflow home for the world's spec (its stores as Connections, `env` added, DAGs
    paused at creation) and a metadata database on the world's US server, at Airflow's head
    with the source's pool (start its AirflowServices with `migrated=True`): (home, env, URL).

    The database is a copy of a template migrated once per server (`CREATE DATABASE ...
    TEMPLATE`): a migration costs every Airflow's start two CLI processes."""
    from migrator.demo.airflow_run import airflow_env, spec_for_airflow
    from migrator.demo.airflow_services import AirflowServices

    home = tmp_path / "airflow"
    home.mkdir()
    af_spec, conns = spec_for_airflow(world.spec_path, tmp_path / "spec.airflow.yaml")
    out = airflow_env(home, conns)
    out.update(MIGRATOR_SPEC=str(af_spec), AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True", **env)
    server = world.cluster["us"]
    if server.dsn() not in _MIGRATED:
        template = server.create_database(AIRFLOW_TEMPLATE).replace("postgresql://", "postgresql+psycopg://", 1)
        AirflowServices(home, dict(out), template).migrate()
        _MIGRATED.add(server.dsn())
    name = f"airflow_{tmp_path.name}"[:60]
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE {AIRFLOW_TEMPLATE}')
    return home, out, server.dsn(name).replace("postgresql://", "postgresql+psycopg://", 1)


@contextmanager
def live_airflow(world: World, tmp_path: Path, **env: str) -> Iterator[AirflowServices]:
    """A scheduler, dag-processor and api-server for the world (see `airflow_for`), with
    `residency_migration` parsed and unpaused; stopped at the end."""
    from migrator.demo.airflow_services import AirflowServices

    home, out, meta = airflow_for(world, tmp_path, **env)
    af = AirflowServices(home, out, meta, migrated=True).start()
    try:
        af.wait_for_dag("residency_migration")
        af.api("PATCH", "/dags/residency_migration", {"is_paused": False})
        yield af
    finally:
        af.stop()


def trigger(af: AirflowServices, conf: dict[str, Any]) -> str:
    """A manual run of `residency_migration` through the REST API, as an operator's tool would; its id."""
    return af.api("POST", "/dags/residency_migration/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]


def bench(*args: str, timeout: float = 900) -> dict[str, Any]:
    """`python -m bench ARGS --json` as a user runs it; its document (the run must succeed)."""
    res = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


@contextmanager
def cut_when(w: World, count_sql: str, at_least: int, cut: Callable[[], None], timeout: float = 120) -> Iterator[None]:
    """Runs the body while a thread waits for `count_sql` (a count in the control database,
    such as committed batches) to reach `at_least`, then calls `cut` (an endpoint or a
    server taken away, mid-phase); the thread is joined when the body ends."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if w.ctl(count_sql)[0][0] >= at_least:
                    break
            except Exception:  # noqa: BLE001 - the counted table appears with the phase's first write
                pass
            time.sleep(0.02)
        cut()

    t = threading.Thread(target=watch)
    t.start()
    try:
        yield
    finally:
        t.join()


def text_pseudonym(key: bytes, v: str | None) -> str | None:
    """A text pseudonym computed here with hmac alone, for comparing with the tool's."""
    if v is None:
        return None
    return "pz1_" + hmac.new(key, f"text:{v}".encode(), hashlib.sha256).hexdigest()[:32]


def inet_pseudonym(key: bytes, text: str | None) -> str | None:
    """An address's pseudonym computed here with hmac and ipaddress alone: the MAC of the
    address as ipaddress prints it (any mask dropped), its low bits under 240.0.0.0/4 or
    2001:db8::/32."""
    if text is None:
        return None
    addr = ipaddress.ip_interface(text).ip
    mac = int.from_bytes(hmac.new(key, f"inet:{addr}".encode(), hashlib.sha256).digest(), "big")
    if addr.version == 4:
        return str(ipaddress.IPv4Address((240 << 24) | (mac & ((1 << 28) - 1))))
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) | (mac & ((1 << 96) - 1))))


def writable(world: World, region: str, uid: int) -> bool:
    """Whether `region` takes the user's writes: an UPDATE of their row where it is, else an
    INSERT of it (rolled back), which a region that holds no row of theirs can only refuse
    by its guard."""
    with psycopg.connect(world.dsn[region]) as c:
        try:
            if not c.execute("UPDATE users SET display_name = display_name WHERE user_id = %s", (uid,)).rowcount:
                c.execute("INSERT INTO users (user_id, email, created_at) VALUES (%s, 'x@example.test', now())", (uid,))
            return True
        except psycopg.Error as e:
            assert e.sqlstate == "RMF01", e.sqlstate
            return False
        finally:
            c.rollback()


def probe(conn: psycopg.Connection, uid: int) -> str:
    """'ok' if the user's row takes a write here, 'fenced' if the database refuses it,
    'absent' if there is no row; the write is rolled back either way."""
    try:
        with conn.transaction(force_rollback=True):
            n = conn.execute("UPDATE users SET display_name = display_name WHERE user_id = %s", (uid,)).rowcount
        return "ok" if n else "absent"
    except psycopg.Error as e:
        if e.sqlstate == "RMF01":
            return "fenced"
        raise


def homes_of(w: World, wave: str, region: str) -> dict[int, str]:
    """The homes of the users of the wave's shards bound for `region`."""
    return {
        int(k): h
        for k, h in w.ctl(
            "SELECT d.user_key, d.home FROM migrator.directory d JOIN migrator.shard_user su USING (user_key) "
            "JOIN migrator.shard s USING (shard_id) WHERE s.wave = %s AND s.region = %s",
            (wave, region),
        )
    }


def settles(w: World, wave: str, pair: tuple[str, str], killed_at: float, rollback: bool, worst_s: float) -> float:
    """Seconds after a kill until every user of the wave's shards moving between `pair`
    (origin, destination) writes at its home; asserts on every look that no home the
    directory does not name takes a write, and that it settles within `worst_s`."""
    origin, dest = pair
    conns = {r: psycopg.connect(w.dsn[r], autocommit=True) for r in pair}
    try:
        while True:
            homes = homes_of(w, wave, dest)
            assert homes
            stuck = []
            for uid, home in homes.items():
                away = dest if home == origin else origin
                if away == origin or rollback:  # before a first cutover the destination is not fenced
                    # A home moves one way within a trial, so a home read again after the probe
                    # that is still the same was the home when the probe wrote.
                    if probe(conns[away], uid) == "ok":
                        assert homes_of(w, wave, dest)[uid] != home, f"user {uid} homed {home} took a write at {away}"
                if probe(conns[home], uid) != "ok":
                    stuck.append(uid)
            took = time.monotonic() - killed_at
            if not stuck:
                return took
            assert took < worst_s, f"{len(stuck)} user(s) could not write at their home {took:.1f} s after the kill"
            time.sleep(0.1)
    finally:
        for c in conns.values():
            c.close()


def killed(w: World, rnd: random.Random, args: list[str], points: list[str]) -> subprocess.Popen:
    """Start the command and SIGKILL it: at a random instant, or while paused at a point."""
    point = rnd.choice(points) if rnd.random() < 0.5 else None
    env = {"MIGRATOR_PAUSE_AT": point, "MIGRATOR_PAUSE_S": "30"} if point else {}
    proc = start(w, *args, env=env)
    if point:
        t0 = time.monotonic()
        while not reached(w, point):
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                break  # ended before the point (e.g. nothing to do): the kill below is a no-op
            time.sleep(0.02)
        with psycopg.connect(w.control) as c:  # the next trial waits for its own pause
            c.execute("DELETE FROM migrator.audit WHERE detail->>'event' = %s", (f"paused at {point}",))
    else:
        time.sleep(rnd.uniform(0.2, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def writes_at_home(world: World, writer: Any, acked: Any, at_least: int = 1) -> None:
    """The stopped writer met no error, more than `at_least` of its writes were acknowledged,
    and every one is at its user's home, exactly once (`workload.check`)."""
    from migrator.demo.workload import check

    assert not writer.errors, writer.errors[:5]
    assert acked.ops > at_least
    check(world.dsn, world.control, acked)


RTT_MS = float(os.environ.get("MIGRATOR_TEST_RTT_MS", "80"))


@contextmanager
def far(world: World, regions: tuple[str, ...] = ("ie", "no"), rtt_ms: float = RTT_MS) -> Iterator[dict[str, Any]]:
    """The migrator reaches `regions` across the loopback relay (each direction held for half of
    `rtt_ms`), as its workers beside the source reach data centers an ocean away; the
    application and the test's own checks stay beside each region's server (`world.dsn`)."""
    from migrator.demo.relay import Relay

    relays: dict[str, Any] = {}
    try:
        spec_regions = dict(world.spec["regions"])
        for r in regions:
            host_port = world.dsn[r].split("@", 1)[1].split("/", 1)[0]
            host, port = host_port.rsplit(":", 1)
            relays[r] = Relay((host, int(port)), rtt_ms=rtt_ms).start()
            spec_regions[r] = {"dsn": world.dsn[r].replace(host_port, f"127.0.0.1:{relays[r].port}")}
        world.write_spec(regions=spec_regions)
        yield relays
    finally:
        for relay in relays.values():
            relay.stop()
