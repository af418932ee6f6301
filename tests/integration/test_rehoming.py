"""Users who move again: a user homed in one destination whose residency, changed at their
home, now belongs to the other is found by the audit and re-homed by the next run (rows,
directory, the old home's guard), with the application writing and the move killed at
random instants; a rollback of such a move returns them to their previous home; the old
copy is purged; and a move back to a region a user left is reported, not left silent.
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


def test_a_user_who_would_move_back_to_a_region_they_left_is_reported(world: World):
    assert world.migrator("run", "--region", "ie").returncode == 0
    (uid,) = _homed_at(world, "ie", 1)
    _relocate(world, "ie", uid, "US")
    res = world.migrator("run", "--wave", "again", "--json")
    assert res.returncode == 0
    doc = json.loads(res.stdout)
    assert doc["moves"] == {} and any("belong in us again" in w for w in doc["warnings"]), doc["warnings"]
    assert _home(world, uid) == "ie"
    rc, audit = _audit(world)
    assert rc == 1 and {(f["kind"], f["region"], f["to"]) for f in audit["findings"]} == {
        ("users homed outside their policy's region", "ie", "us")
    }


def test_the_old_copy_of_a_re_homed_user_is_purged_after_its_retention(world: World, monkeypatch):
    keys = {"ie": "rehoming-key-ie-0123456789abcdef", "no": "rehoming-key-no-0123456789abcdef"}
    for r, k in keys.items():
        monkeypatch.setenv(f"TEST_REHOMING_KEY_{r.upper()}", k)
    world.write_spec(
        purge={
            "after": "0s",
            "tables": {"users": {"pseudonymise": ["email"]}},
            "keys": {r: {"env": f"TEST_REHOMING_KEY_{r.upper()}"} for r in keys},
        }
    )
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
    the second move's cutover and rollback while the application writes through the
    directory; every acknowledged write ends at its user's home, exactly once."""
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
    finally:
        acked = writer.stop()
    writes_at_home(world, writer, acked)
    assert {_home(world, u) for u in relocated} == {"no"}
    for uid in relocated[:5]:  # one home at a time: the old ones refuse them
        assert [writable(world, r, uid) for r in ("us", "ie", "no")] == [False, False, True]
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
