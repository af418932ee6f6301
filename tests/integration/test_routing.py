"""A guard at every old home, and the routing client: a router whose cached home went stale
at a cutover or a rollback has each write refused at the old home (RMF01) or sees it touch
no row there, and the write lands at the user's home after its retry."""

from __future__ import annotations

import signal

import psycopg
import pytest

from migrator.routing import Home, Router
from tests.conftest import World
from tests.helpers import paused, writable

pytestmark = pytest.mark.integration


def _name_at(world: World, region: str, uid: int) -> str | None:
    rows = world.rows(region, "SELECT display_name FROM users WHERE user_id = %s", (uid,))
    return rows[0][0] if rows else None


def _rename(name: str, uid: int):
    return lambda c: c.execute("UPDATE users SET display_name = %s WHERE user_id = %s", (name, uid)).rowcount


def _login(event: int, uid: int):
    return lambda c: (
        c.execute("INSERT INTO login_events VALUES (%s, %s, '192.0.2.1', now(), true)", (event, uid)).rowcount
    )


def _refused(world: World, region: str, sql: str, args: tuple) -> str:
    with pytest.raises(psycopg.Error) as e:
        world.rows(region, sql, args)
    return e.value.sqlstate


def test_stale_routes_after_cutover_and_rollback_land_at_the_home(world: World):
    world.write_spec(sharding={"shards_per_region": 1})
    (uid,) = world.rows("us", "SELECT min(user_id) FROM users WHERE country_code = 'IE'")[0]
    router = Router(world.control, world.dsn, default="us", ttl_s=3600)
    assert router.home(uid) == Home("us", 0)  # cached before anything moved

    assert world.migrator("run", "--region", "ie").returncode == 0
    assert world.ctl("SELECT home FROM migrator.directory WHERE user_key = %s", (str(uid),)) == [("ie",)]
    # the stale route goes to the source, which refuses; the retry lands at ie
    assert router.write(uid, _rename("after-cutover", uid)) == 1
    assert router.refused == 1
    assert _name_at(world, "ie", uid) == "after-cutover"
    assert _name_at(world, "us", uid) != "after-cutover"

    stale = Router(world.control, world.dsn, default="us", ttl_s=3600)
    assert stale.home(uid).region == "ie"
    insert_stale = Router(world.control, world.dsn, default="us", ttl_s=3600)
    assert insert_stale.home(uid).region == "ie"
    res = world.migrator("rollback", "--region", "ie", "--reason", "routing test")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert world.ctl("SELECT home FROM migrator.directory WHERE user_key = %s", (str(uid),)) == [("us",)]
    # the write carried back by the rollback is at the source
    assert _name_at(world, "us", uid) == "after-cutover"
    assert _name_at(world, "ie", uid) is None

    # the destination refuses every write of the users who left it, an INSERT of the
    # user's own row included (the application's own SQL, no router)
    assert (
        _refused(
            world,
            "ie",
            "INSERT INTO users (user_id, email, display_name, country_code, created_at) "
            "VALUES (%s, 'x@example.test', 'x', 'IE', now())",
            (uid,),
        )
        == "RMF01"
    )
    assert (
        _refused(world, "ie", "INSERT INTO login_events VALUES (%s, %s, '192.0.2.1', now(), true)", (9_000_001, uid))
        == "RMF01"
    )
    # an UPDATE at the old home finds no row (no trigger can fire): the router sees it
    # touch nothing, asks the directory again and writes at the source
    assert stale.write(uid, _rename("after-rollback", uid)) == 1
    assert stale.rerouted == 1 and stale.refused == 0
    assert _name_at(world, "us", uid) == "after-rollback"
    # an INSERT routed to the old home is refused there and lands at the source
    assert insert_stale.write(uid, _login(9_000_002, uid)) == 1
    assert insert_stale.refused == 1
    assert world.rows("us", "SELECT user_id FROM login_events WHERE event_id = 9000002") == [(uid,)]
    assert world.rows("ie", "SELECT count(*) FROM login_events WHERE event_id IN (9000001, 9000002)") == [(0,)]
    # a user of the destination who never left it writes there as before
    (other,) = world.rows("us", "SELECT min(user_id) FROM users WHERE country_code = 'US'")[0]
    assert world.rows("us", "UPDATE users SET display_name = 'stays' WHERE user_id = %s RETURNING 1", (other,))

    # moved again: homed at ie once more, writable there, and the source refuses again
    assert world.migrator("retry", "--shard", "ie-00", "--reason", "routing test").returncode == 0
    res = world.migrator("run", "--region", "ie", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert world.rows("ie", "UPDATE users SET display_name = 'home again' WHERE user_id = %s RETURNING 1", (uid,))
    assert world.rows("ie", "SELECT count(*) FROM migrator.departed WHERE user_key = %s", (str(uid),)) == [(0,)]
    assert _refused(world, "us", "UPDATE users SET display_name = 'x' WHERE user_id = %s", (uid,)) == "RMF01"
    # the router that last wrote at the source is refused there now, and follows
    assert stale.write(uid, _rename("third home", uid)) == 1
    assert _name_at(world, "ie", uid) == "third home"
    for r in (router, stale, insert_stale):
        r.close()


def test_the_guard_survives_kills_and_never_locks_a_user_out(world: World):
    """SIGKILL after a rollback's deletes, before its guard is recorded: the users stay
    refused at the destination and writable at the source, and the rerun records the
    guard. SIGKILL inside a later cutover's window after its decision, before the guard is
    lifted (no watchdog): `migrator recover` lifts it as it finishes the flip, and the user
    writes at their new home."""
    world.write_spec(sharding={"shards_per_region": 1})
    (uid,) = world.rows("us", "SELECT min(user_id) FROM users WHERE country_code = 'IE'")[0]
    assert world.migrator("run", "--region", "ie").returncode == 0
    proc = paused(world, "departing", "rollback", "--region", "ie", "--reason", "kill test")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert world.ctl("SELECT home FROM migrator.directory WHERE user_key = %s", (str(uid),)) == [("us",)]
    assert not writable(world, "ie", uid) and writable(world, "us", uid)
    res = world.migrator("rollback", "--region", "ie", "--reason", "kill test")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert world.rows("ie", "SELECT count(*) FROM migrator.departed WHERE user_key = %s", (str(uid),)) == [(1,)]
    assert writable(world, "us", uid)
    with pytest.raises(psycopg.Error) as e:  # an INSERT of the user's own row at the old home
        world.rows(
            "ie",
            "INSERT INTO users (user_id, email, created_at) VALUES (%s, 'x@example.test', now()) RETURNING 1",
            (uid,),
        )
    assert e.value.sqlstate == "RMF01"

    assert world.migrator("retry", "--shard", "ie-00", "--reason", "kill test").returncode == 0
    for phase in ("copy", "verify"):
        assert world.migrator(phase, "--region", "ie").returncode == 0, phase
    proc = paused(world, "arriving", "cutover", "--region", "ie", env={"MIGRATOR_WATCHDOG": "off"})
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not writable(world, "us", uid)  # decided: the source is held
    res = world.migrator("recover", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert world.ctl("SELECT home FROM migrator.directory WHERE user_key = %s", (str(uid),)) == [("ie",)]
    assert world.rows("ie", "SELECT count(*) FROM migrator.departed WHERE user_key = %s", (str(uid),)) == [(0,)]
    assert writable(world, "ie", uid) and not writable(world, "us", uid)
