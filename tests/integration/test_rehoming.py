"""Users who move again: a user homed in one destination whose residency, changed at their
home, now belongs to the other is found by the audit and re-homed by the next run (rows,
directory, the old home's guard), with the application writing and the move killed at
random instants; a rollback of such a move returns them to their previous home; the old
copy is purged; users move back to a region they left (ie→us, no→us, ie→no→ie), whether
the copy there is kept or purged; and an interval finds users whose country changed in it.
Kill trials: MIGRATOR_REHOMING_TRIALS (each kills one cutover and one rollback)."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import psycopg
import pytest

from migrator.demo.workload import Writer
from tests.conftest import DEMO_OWNED, World
from tests.helpers import homes_of, killed, paused, settles, text_pseudonym, writable, writes_at_home

pytestmark = pytest.mark.integration

TRIALS = int(os.environ.get("MIGRATOR_REHOMING_TRIALS", "1"))
WINDOW_S = 2.0
WORST_S = WINDOW_S + 1.0 + 5.0  # the window, its expiry's second, the watchdog's bound


def _home(world: World, uid: int) -> str:
    return world.ctl("SELECT home FROM migrator.directory WHERE user_key = %s", (str(uid),))[0][0]


def _homed_at(world: World, region: str, n: int) -> list[int]:
    return [
        int(k)
        for (k,) in world.ctl(
            "SELECT user_key FROM migrator.directory WHERE home = %s ORDER BY user_key::bigint LIMIT %s", (region, n)
        )
    ]


def _relocate(world: World, region: str, uid: int, country: str) -> None:
    """The application, at the user's home, changes their country."""
    with psycopg.connect(world.dsn[region]) as c:
        c.execute("UPDATE users SET country_code = %s WHERE user_id = %s", (country, uid))


def _owned(world: World, region: str, uids: list[int]) -> dict[str, list[tuple]]:
    return {t: world.rows(region, q, (uids,)) for t, q in DEMO_OWNED.items()}


def _audit(world: World) -> tuple[int, dict]:
    res = world.migrator("audit", "--json")
    return res.returncode, json.loads(res.stdout)


def _purge_due(world: World, monkeypatch, name: str, regions: tuple[str, ...], tables: dict) -> dict[str, str]:
    """A purge due at once over `tables`, with a pseudonym key per region in the
    environment; the keys."""
    keys = {r: f"{name}-key-{r}-0123456789abcdef" for r in regions}
    env = {r: f"TEST_{name.upper().replace('-', '_')}_KEY_{r.upper()}" for r in regions}
    for r, k in keys.items():
        monkeypatch.setenv(env[r], k)
    world.write_spec(purge={"after": "0s", "tables": tables, "keys": {r: {"env": env[r]} for r in regions}})
    return keys


def test_a_user_whose_residency_changes_at_their_home_is_found_and_re_homed(world: World):
    assert world.migrator("run").returncode == 0
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]
    to_no, to_ie = _homed_at(world, "ie", 2), _homed_at(world, "no", 1)
    for uid in to_no:
        _relocate(world, "ie", uid, "NO")
    _relocate(world, "no", to_ie[0], "IE")
    before = {"no": _owned(world, "ie", to_no), "ie": _owned(world, "no", to_ie)}

    rc, doc = _audit(world)
    found = {(f["kind"], f.get("region"), f.get("to"), f.get("users")) for f in doc["findings"]}
    assert rc == 1
    assert found == {
        ("users homed outside their policy's region", "ie", "no", 2),
        ("users homed outside their policy's region", "no", "ie", 1),
    }
    assert all(str(u) not in json.dumps(doc["findings"]) for u in to_no + to_ie)  # counts, never keys

    # given no wave, the commands go on to the default line's next wave: the first is done
    dry = json.loads(world.migrator("plan", "--dry-run", "--json").stdout)
    assert dry["wave"] == "default-2" and dry["moves"] == {"ie→no": 2, "no→ie": 1}
    assert {s["from"] for s in dry["shards"]} == {"ie", "no"}

    res = world.migrator("run", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["wave"] == "default-2" and doc["moves"] == {"ie→no": 2, "no→ie": 1}
    assert {(s["from"], s["region"], s["state"]) for s in doc["shards"]} >= {
        ("ie", "no", "cut_over"),
        ("no", "ie", "cut_over"),
    }
    # the run resumed the default wave (all cut over), then ran the next one
    assert {s["wave"] for s in doc["shards"]} == {"default", "default-2"}
    assert {s["name"].rsplit("-", 1)[0] for s in doc["shards"] if s["wave"] == "default-2"} == {"ie-no", "no-ie"}
    assert [_home(world, u) for u in to_no] == ["no", "no"] and _home(world, to_ie[0]) == "ie"
    # every row at the new home as it was at the old one; the old copy stays until its purge,
    # and refuses the application's writes there
    assert _owned(world, "no", to_no) == before["no"]
    assert _owned(world, "ie", to_ie) == before["ie"]
    assert _owned(world, "ie", to_no) == before["no"]
    assert [writable(world, "ie", u) for u in to_no] == [False, False]
    assert not writable(world, "no", to_ie[0])
    assert [writable(world, "no", u) for u in to_no] == [True, True]
    assert writable(world, "ie", to_ie[0])
    # and the users their first move left at the source stay refused there too
    assert not writable(world, "us", to_no[0])

    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]
    # nothing more to do: a rerun changes nothing and plans no further wave
    epochs = world.ctl("SELECT sum(epoch) FROM migrator.directory")
    res = world.migrator("run", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["wave"] == "default-2"
    assert world.ctl("SELECT DISTINCT wave FROM migrator.shard ORDER BY 1") == [("default",), ("default-2",)]
    assert world.ctl("SELECT sum(epoch) FROM migrator.directory") == epochs


def test_a_rollback_of_a_move_again_returns_users_to_their_previous_home(world: World):
    assert world.migrator("run", "--region", "ie").returncode == 0
    uids = _homed_at(world, "ie", 3)
    for uid in uids:
        _relocate(world, "ie", uid, "SE")
    res = world.migrator("run", "--wave", "again", "--json")
    assert res.returncode == 0, res.stdout[-2000:]
    assert [_home(world, u) for u in uids] == ["no"] * 3
    # the application writes at the new home; the rollback carries it back to ie, not to us
    with psycopg.connect(world.dsn["no"]) as c:
        c.execute("UPDATE users SET display_name = 'written at no' WHERE user_id = %s", (uids[0],))
    first = world.ctl("SELECT shard_id FROM migrator.shard WHERE wave <> 'again' AND state = 'cut_over' LIMIT 1")[0][0]
    res = world.migrator("rollback", "--wave", "again", "--reason", "test", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert [_home(world, u) for u in uids] == ["ie"] * 3
    assert world.rows("ie", "SELECT display_name FROM users WHERE user_id = %s", (uids[0],)) == [("written at no",)]
    assert world.rows("no", "SELECT count(*) FROM users WHERE user_id = ANY(%s)", (uids,)) == [(0,)]
    assert [writable(world, "ie", u) for u in uids] == [True] * 3
    assert [writable(world, "no", u) for u in uids] == [False] * 3
    assert not writable(world, "us", uids[0])
    # the first move can no longer be undone for the users a later shard took on
    res = world.migrator("rollback", "--shard", first.split("/", 1)[1], "--reason", "test", "--json")
    assert res.returncode == 1 and "moved on" in res.stdout + res.stderr
    assert [_home(world, u) for u in uids] == ["ie"] * 3


def test_users_who_leave_the_eea_move_back_to_the_us_before_and_after_its_copy_is_purged(world: World, monkeypatch):
    """ie→us while the first move's copy at us is still kept, and no→us after it was purged:
    either way the copy the first move left is replaced by the rows at the user's home, the
    us fence lets go of them at the cutover, the first move's purge leaves them be, and a
    rollback of a move back returns them to their previous home, refused at us again."""
    tables = {"users": {"pseudonymise": ["email"]}, "videos": "delete"}
    keys = _purge_due(world, monkeypatch, "move-back", ("us", "ie", "no"), tables)
    assert world.migrator("run").returncode == 0
    leaving_ie, (leaving_no,) = _homed_at(world, "ie", 2), _homed_at(world, "no", 1)
    stay_ie = [u for u in _homed_at(world, "ie", 4) if u not in leaving_ie][:1]
    for uid in leaving_ie:
        _relocate(world, "ie", uid, "US")
    with psycopg.connect(world.dsn["ie"]) as c:  # written at their home after the first move
        c.execute("UPDATE users SET display_name = 'written at ie' WHERE user_id = %s", (leaving_ie[0],))
    before = _owned(world, "ie", leaving_ie)
    emails = dict(world.rows("ie", "SELECT user_id, email FROM users WHERE user_id = ANY(%s)", (leaving_ie + stay_ie,)))
    assert _owned(world, "us", leaving_ie) != before  # the copy kept at us is the first move's
    rc, doc = _audit(world)
    assert rc == 1 and [(f["kind"], f["region"], f["to"], f["users"]) for f in doc["findings"]] == [
        ("users homed outside their policy's region", "ie", "us", 2)
    ]

    # while the first move's copy at us is kept (not purged yet)
    res = world.migrator("run", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads(res.stdout)["moves"] == {"ie→us": 2}
    assert [_home(world, u) for u in leaving_ie] == ["us", "us"]
    assert _owned(world, "us", leaving_ie) == before
    assert [writable(world, r, leaving_ie[1]) for r in ("us", "ie")] == [True, False]
    assert not writable(world, "us", stay_ie[0])  # the us fence still holds the users who stayed away
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]

    # every purge due: the first moves' (leaving the users taken back alone) and the move back's
    res = world.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert world.ctl("SELECT DISTINCT state FROM migrator.shard") == [("purged",)]
    assert _owned(world, "us", leaving_ie) == before  # their home's rows, untouched by the old purge
    email = "SELECT user_id, email FROM users WHERE user_id = ANY(%s)"
    retired = dict(world.rows("ie", email, (leaving_ie,))) | dict(world.rows("us", email, (stay_ie,)))
    assert retired == {u: text_pseudonym(keys["us"].encode(), emails[u]) for u in leaving_ie} | {
        stay_ie[0]: text_pseudonym(keys["ie"].encode(), emails[stay_ie[0]])
    }  # the ie copy retired with us's key, the us copy of a user who stayed away with ie's
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]

    # after the first move's copy at us was purged (pseudonymised, videos deleted)
    _relocate(world, "no", leaving_no, "US")
    before_no = _owned(world, "no", [leaving_no])
    assert world.rows("us", "SELECT count(*) FROM videos WHERE user_id = %s", (leaving_no,)) == [(0,)]
    res = world.migrator("run", "--wave", "back", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads(res.stdout)["moves"] == {"no→us": 1}
    assert _home(world, leaving_no) == "us"
    assert _owned(world, "us", [leaving_no]) == before_no
    assert [writable(world, r, leaving_no) for r in ("us", "no")] == [True, False]
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]

    # a rollback of the move back: home at no again, refused at us again, nothing of theirs left at us
    res = world.migrator("rollback", "--wave", "back", "--reason", "test", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert _home(world, leaving_no) == "no"
    assert _owned(world, "no", [leaving_no]) == before_no
    assert all(rows == [] for rows in _owned(world, "us", [leaving_no]).values())
    assert [writable(world, r, leaving_no) for r in ("us", "no")] == [False, True]
    rc, doc = _audit(world)  # their residency still says us: held by the rollback, and reported
    assert rc == 1 and [(f["kind"], f["region"], f["to"], f["users"]) for f in doc["findings"]] == [
        ("users homed outside their policy's region", "no", "us", 1)
    ]


def test_a_user_who_moves_ie_no_ie_returns_with_their_writes_and_the_no_copy_is_purged(world: World, monkeypatch):
    """us→ie, ie→no, then back no→ie while the ie→no move's copy at ie is still kept, its
    copy killed after one batch and rerun: the ie rows are no's, ie takes their writes again
    and no refuses them, and the purges retire the no copy and leave the ie one (theirs now)
    alone."""
    keys = _purge_due(world, monkeypatch, "round-trip", ("ie", "no"), {"users": {"pseudonymise": ["email"]}})
    assert world.migrator("run", "--region", "ie").returncode == 0
    uids = _homed_at(world, "ie", 2)
    for uid in uids:
        _relocate(world, "ie", uid, "NO")
    res = world.migrator("run", "--wave", "there", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["moves"] == {"ie→no": 2}, res.stdout[-2000:]
    for uid in uids:
        _relocate(world, "no", uid, "IE")
    with psycopg.connect(world.dsn["no"]) as c:
        c.execute("UPDATE users SET display_name = 'written at no' WHERE user_id = %s", (uids[0],))
    before = _owned(world, "no", uids)
    assert world.migrator("plan", "--wave", "back").returncode == 0
    killed_copy = paused(world, "copied batch", "copy", "--wave", "back")  # one user's rows replaced at ie
    killed_copy.send_signal(signal.SIGKILL)
    killed_copy.wait()
    res = world.migrator("run", "--wave", "back", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads(res.stdout)["moves"] == {"no→ie": 2}
    assert {s["name"].rsplit("-", 1)[0] for s in json.loads(res.stdout)["shards"]} == {"no-ie"}
    assert [_home(world, u) for u in uids] == ["ie", "ie"]
    assert _owned(world, "ie", uids) == before
    assert [writable(world, r, uids[1]) for r in ("us", "ie", "no")] == [False, True, False]
    status = json.loads(world.migrator("status", "--from", "no", "--json").stdout)["shards"]
    assert {(s["wave"], s["from"], s["region"]) for s in status} == {("back", "no", "ie")}
    res = world.migrator("status", "--from", "se")
    assert res.returncode == 2 and "--from 'se'" in res.stderr
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]
    res = world.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert world.ctl("SELECT DISTINCT state FROM migrator.shard WHERE region = 'ie' OR wave <> 'default'") == [
        ("purged",)
    ]
    assert _owned(world, "ie", uids) == before  # their home's rows: the ie→no purge left them be
    emails = dict(world.rows("ie", "SELECT user_id, email FROM users WHERE user_id = ANY(%s)", (uids,)))
    at_no = dict(world.rows("no", "SELECT user_id, email FROM users WHERE user_id = ANY(%s)", (uids,)))
    assert at_no == {u: text_pseudonym(keys["ie"].encode(), emails[u]) for u in uids}  # retired with ie's key
    assert [writable(world, r, uids[0]) for r in ("us", "ie", "no")] == [False, True, False]
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]


def test_an_interval_finds_a_long_standing_user_whose_country_changed_in_it_by_updated_at(world: World):
    """A scheduled run reads the source's users created in its interval; with
    `root.updated_at` it also finds a user created long before whose country changed in it."""
    for region in world.dsn:
        with psycopg.connect(world.dsn[region]) as c:
            c.execute("ALTER TABLE users ADD COLUMN updated_at timestamptz")
            c.execute("UPDATE users SET updated_at = created_at")
    assert world.migrator("run").returncode == 0
    (uid,) = [
        u for (u,) in world.rows("us", "SELECT user_id FROM users WHERE country_code = 'US' ORDER BY user_id LIMIT 1")
    ]
    with psycopg.connect(world.dsn["us"]) as c:  # the application sets updated_at as it writes
        c.execute("UPDATE users SET country_code = 'DE', updated_at = now() WHERE user_id = %s", (uid,))
    (last,) = world.rows("us", "SELECT max(created_at) + interval '1 second' FROM users")[0]
    # after every user was created (the world's clock is UTC)
    hour = ["--since", last.strftime("%Y-%m-%dT%H:%M:%S"), "--until", "2100-01-01T00:00:00"]
    dry = json.loads(world.migrator("plan", "--wave", "interval", *hour, "--dry-run", "--json").stdout)
    assert dry["moves"] == {}  # created long before the interval: not read without updated_at
    root = world.spec["entity_graph"]["root"]
    world.write_spec(entity_graph={**world.spec["entity_graph"], "root": {**root, "updated_at": "updated_at"}})
    res = world.migrator("run", "--wave", "interval", *hour, "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads(res.stdout)["moves"] == {"us→ie": 1}
    assert _home(world, uid) == "ie"


def test_the_old_copy_of_a_re_homed_user_is_purged_after_its_retention(world: World, monkeypatch):
    keys = _purge_due(world, monkeypatch, "rehoming", ("ie", "no"), {"users": {"pseudonymise": ["email"]}})
    assert world.migrator("run", "--region", "ie").returncode == 0
    uids = _homed_at(world, "ie", 3)
    for uid in uids:
        _relocate(world, "ie", uid, "FI")
    emails = dict(world.rows("ie", "SELECT user_id, email FROM users WHERE user_id = ANY(%s)", (uids,)))
    res = world.migrator("run", "--wave", "again", "--json")
    assert res.returncode == 0, res.stdout[-2000:]
    at_no = _owned(world, "no", uids)
    res = world.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    # the copy at ie (their home before) retired with no's key, the copy at us with ie's
    for region, key in (("ie", keys["no"]), ("us", keys["ie"])):
        got = dict(world.rows(region, "SELECT user_id, email FROM users WHERE user_id = ANY(%s)", (uids,)))
        assert got == {u: text_pseudonym(key.encode(), emails[u]) for u in uids}, region
        assert world.rows(region, "SELECT count(*) FROM videos WHERE user_id = ANY(%s)", (uids,)) == [(0,)]
    assert _owned(world, "no", uids) == at_no  # their home keeps everything
    moved = world.ctl("SELECT DISTINCT state FROM migrator.shard WHERE region = 'ie' OR wave = 'again'")
    assert moved == [("purged",)]  # the first move's shards and the move again's
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]


def test_moves_again_killed_throughout_with_the_application_writing(world: World):
    """us→ie, then ie→no for users whose country changed at ie, killed at random instants of
    the second move's cutover and rollback, then no→us for some of them (a move back), its
    cutover killed too, while the application writes through the directory; every
    acknowledged write ends at its user's home, exactly once."""
    world.write_spec(sharding={"shards_per_region": 1}, changes={"fence_window_s": WINDOW_S})
    assert world.migrator("run", "--region", "ie").returncode == 0
    relocated = _homed_at(world, "ie", 30)
    for uid in relocated:
        _relocate(world, "ie", uid, "DK")
    stay = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = 'ie' LIMIT 10")]
    rnd = random.Random(int(os.environ.get("MIGRATOR_TORTURE_SEED", "20261207")))
    writer = Writer(world.dsn, world.control, relocated + [u for u in stay if u not in relocated]).start()
    settled: list[float] = []
    try:
        for i in range(TRIALS):
            wave = f"again{i}"
            for cmd in ("plan", "copy", "verify"):
                res = world.migrator(cmd, "--wave", wave, "--region", "no")
                assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
            killed(world, rnd, ["cutover", "--wave", wave, "--region", "no"], ["staged", "fenced", "held"])
            settled.append(settles(world, wave, ("ie", "no"), time.monotonic(), False, WORST_S))
            res = world.migrator("cutover", "--wave", wave, "--region", "no", "--json")
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            assert set(homes_of(world, wave, "no").values()) == {"no"}
            time.sleep(0.5)  # the writer writes at the new home
            args = ["rollback", "--wave", wave, "--region", "no", "--reason", "trial"]
            killed(world, rnd, args, ["rollback held"])
            settled.append(settles(world, wave, ("ie", "no"), time.monotonic(), True, WORST_S))
            res = world.migrator(*args, "--json")
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            assert set(homes_of(world, wave, "no").values()) == {"ie"}  # their previous home, not us
            res = world.migrator("release", "--wave", wave, "--region", "no", "--reason", "next trial")
            assert res.returncode == 0, res.stderr[-2000:]
        # and the last move stands: planned, copied, verified and cut over with the writer on
        res = world.migrator("run", "--wave", "final", "--json")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert json.loads(res.stdout)["moves"] == {"ie→no": len(relocated)}
        time.sleep(0.5)
        # then a third of them leave the EEA: back to us, whose fence has refused them since
        # their first move, the move back's cutover killed at a random instant
        leaving = relocated[: len(relocated) // 3]
        for uid in leaving:
            _relocate(world, "no", uid, "US")
        for cmd in ("plan", "copy", "verify"):
            res = world.migrator(cmd, "--wave", "home")
            assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
        killed(world, rnd, ["cutover", "--wave", "home"], ["staged", "fenced", "held"])
        # both sides refuse whom they do not home: us has since the first move
        settled.append(settles(world, "home", ("no", "us"), time.monotonic(), True, WORST_S))
        res = world.migrator("run", "--wave", "home", "--json")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert json.loads(res.stdout)["moves"] == {"no→us": len(leaving)}
        time.sleep(0.5)
    finally:
        acked = writer.stop()
    writes_at_home(world, writer, acked)
    stayed = [u for u in relocated if u not in leaving]
    assert {_home(world, u) for u in stayed} == {"no"} and {_home(world, u) for u in leaving} == {"us"}
    for uid in stayed[:5]:  # one home at a time: the old ones refuse them
        assert [writable(world, r, uid) for r in ("us", "ie", "no")] == [False, False, True]
    for uid in leaving[:5]:
        assert [writable(world, r, uid) for r in ("us", "ie", "no")] == [True, False, False]
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]
    print(f"moves again: {TRIALS} trial(s); seconds from kill to every user writable at home: max {max(settled):.2f}")


def test_a_country_the_policy_remaps_moves_its_users_at_the_next_run(world: World):
    assert world.migrator("run").returncode == 0
    german = [
        int(k)
        for (k,) in world.rows("ie", "SELECT user_id::text FROM users WHERE country_code = 'DE' ORDER BY 1")
        if _home(world, int(k)) == "ie"
    ]
    assert german
    world.spec["policy"]["DE"] = "no"  # the policy now keeps Germans' data in Norway
    world.write_spec()
    rc, doc = _audit(world)
    assert rc == 1 and [(f["region"], f["to"], f["users"]) for f in doc["findings"]] == [("ie", "no", len(german))]
    res = world.migrator("run", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.loads(res.stdout)["moves"] == {"ie→no": len(german)}
    assert {_home(world, u) for u in german} == {"no"}
    assert _owned(world, "no", german) == _owned(world, "ie", german)  # the ie copy stays until its purge
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]


def test_a_move_again_killed_mid_copy_and_mid_purge_resumes_and_loses_nothing(world: World, monkeypatch):
    """SIGKILL of the second move's copy after a batch committed, and of its purge after a
    batch was purged: each rerun finishes, the rows at no are ie's as they were, and the ie
    copy ends purged as the policy says."""
    key = "rehoming-kill-key-no-0123456789ab"
    monkeypatch.setenv("TEST_REHOMING_KILL_KEY_NO", key)
    world.write_spec(
        copy={"batch_users": 2},
        purge={"after": "0s", "tables": {"users": "delete"}, "keys": {"no": {"env": "TEST_REHOMING_KILL_KEY_NO"}}},
    )
    assert world.migrator("run", "--region", "ie").returncode == 0
    uids = _homed_at(world, "ie", 12)
    for uid in uids:
        _relocate(world, "ie", uid, "NO")
    before = _owned(world, "ie", uids)
    assert world.migrator("plan", "--wave", "again").returncode == 0
    killed_copy = paused(world, "copied batch", "copy", "--wave", "again")
    killed_copy.send_signal(signal.SIGKILL)
    killed_copy.wait()
    done = world.ctl(
        "SELECT count(*) FROM migrator.checkpoint c JOIN migrator.shard s USING (shard_id) WHERE s.wave = 'again'"
    )
    assert 0 < done[0][0] < world.ctl("SELECT sum(batches) FROM migrator.shard WHERE wave = 'again'")[0][0]
    for cmd in ("copy", "verify", "cutover"):
        res = world.migrator(cmd, "--wave", "again", "--json")
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
    assert {_home(world, u) for u in uids} == {"no"}
    assert _owned(world, "no", uids) == before  # each row once, as it was at ie
    killed_purge = paused(world, "purged batch", "purge", "--wave", "again")
    killed_purge.send_signal(signal.SIGKILL)
    killed_purge.wait()
    assert ("purging",) in world.ctl("SELECT DISTINCT state FROM migrator.shard WHERE wave = 'again'")
    res = world.migrator("purge", "--wave", "again", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert world.ctl("SELECT DISTINCT state FROM migrator.shard WHERE wave = 'again'") == [("purged",)]
    assert all(rows == [] for rows in _owned(world, "ie", uids).values())  # the ie copy is gone
    assert _owned(world, "no", uids) == before
    assert [writable(world, "no", u) for u in uids[:3]] == [True] * 3
    assert [writable(world, "ie", u) for u in uids[:3]] == [False] * 3
    rc, doc = _audit(world)
    assert rc == 0, doc["findings"]
