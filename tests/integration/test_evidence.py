"""Signed manifests kept in the destination region, checked by `migrator audit` as a reader:
a changed destination row, a changed manifest and a signature from another key are named."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import World
from tests.helpers import paused, start
from tests.integration.test_audit import _audit, _cli, _reader

pytestmark = pytest.mark.integration

SEED = "11" * 32
OTHER = "22" * 32
PSEUDONYM_KEY = "evidence-pseudonym-key-0123456789"


def _pub(seed: str) -> str:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed)).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _with_evidence(world: World, monkeypatch) -> None:
    monkeypatch.setenv("TEST_SIGNING_IE", SEED)
    monkeypatch.setenv("TEST_PSEUDONYMS_IE", PSEUDONYM_KEY)
    ev = {
        "regions": {
            "ie": {
                "signing": {"env": "TEST_SIGNING_IE"},
                "pseudonym": {"env": "TEST_PSEUDONYMS_IE"},
                "public_key": _pub(SEED),
            }
        }
    }
    world.write_spec(evidence=ev, sharding={"shards_per_region": 1})


def test_manifests_are_signed_kept_at_home_and_checked(world: World, tmp_path, monkeypatch):
    _with_evidence(world, monkeypatch)
    assert world.migrator("run", "--region", "ie").returncode == 0
    ((sid, text, signature),) = world.rows("ie", "SELECT shard_id, doc, signature FROM migrator.manifests")
    doc = json.loads(text)
    # canonical, signed with the region's key (checked here with the public key alone)
    assert text == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    pub = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(SEED)).public_key()
    pub.verify(bytes.fromhex(signature), text.encode())
    users = [k for (k,) in world.ctl("SELECT user_key FROM migrator.shard_user WHERE shard_id = %s", (sid,))]
    assert doc["users"]["count"] == len(users)  # named only by keyed pseudonyms, recomputed here
    assert doc["users"]["pseudonyms"] == sorted(
        hmac.new(PSEUDONYM_KEY.encode(), u.encode(), hashlib.sha256).hexdigest() for u in users
    )
    assert doc["tables"]["users"]["rows"] == len(users) and doc["event"] == "cutover"
    spec = _reader(world, tmp_path)
    rc, out = _audit(world, spec)
    assert rc == 0 and out["residency"]["regions"]["ie"]["manifests"] == 1, out
    # the application writes at the user's new home after cutover: drift, not a finding
    uid = int(users[0])
    world.rows("ie", "UPDATE users SET display_name = 'changed' WHERE user_id = %s RETURNING 1", (uid,))
    rc, out = _audit(world, spec)
    assert rc == 0, out["findings"]
    assert [(d["kind"], d["shard"], d["table"], d["rows_written"]) for d in out["drift"]] == [
        ("the application wrote after cutover", sid, "users", 1)
    ]
    # a change made past the guard (nothing logs it) is tampering
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("SET LOCAL migrator.apply = 'on'")
        c.execute("UPDATE videos SET title = 'changed' WHERE user_id = %s", (uid,))
    rc, out = _audit(world, spec)
    assert rc == 1
    assert {(f["kind"], f.get("shard"), f.get("table")) for f in out["findings"]} == {
        ("destination rows differ from the shard's manifest, and no logged write explains it", sid, "videos")
    }
    assert "changed" not in json.dumps(out)
    # incremental: a shard without audit activity since is not recomputed; one with activity is
    res = _cli(spec, "audit", "--json", "--since", "2999-01-01T00:00:00")
    assert res.returncode == 0, res.stdout[-2000:]
    res = _cli(spec, "audit", "--json", "--since", "2000-01-01T00:00:00")
    assert res.returncode == 1
    # a manifest changed, and one re-signed with another key
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute('UPDATE migrator.manifests SET doc = replace(doc, \'"event":"cutover"\', \'"event":"forged"\')')
    rc, out = _audit(world, spec)
    assert rc == 1 and "manifest signature invalid (changed, or signed with another key)" in {
        f["kind"] for f in out["findings"]
    }
    forged = json.loads(world.rows("ie", "SELECT doc FROM migrator.manifests")[0][0])
    other = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(OTHER))
    body = json.dumps(forged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("UPDATE migrator.manifests SET signature = %s", (other.sign(body.encode()).hex(),))
    rc, out = _audit(world, spec)
    assert rc == 1 and "manifest signature invalid (changed, or signed with another key)" in {
        f["kind"] for f in out["findings"]
    }
    # and removed altogether
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("DELETE FROM migrator.manifests")
    rc, out = _audit(world, spec)
    assert rc == 1 and ("no manifest kept for a shard moved here", sid) in {
        (f["kind"], f.get("shard")) for f in out["findings"]
    }


def _manifests(world: World) -> list[tuple[str, str]]:
    if world.rows("ie", "SELECT to_regclass('migrator.manifests')")[0][0] is None:
        return []
    return world.rows("ie", "SELECT shard_id, event FROM migrator.manifests ORDER BY id")


def test_a_move_killed_before_its_manifest_gets_it_when_the_phase_is_run_again(world: World, tmp_path, monkeypatch):
    """Killed (SIGKILL) after the cutover committed and before its manifest was kept: the
    audit names the shard as moved without one, and running the cutover again keeps it
    (once: a third run keeps nothing more). The same for a rollback killed there."""
    _with_evidence(world, monkeypatch)
    proc = paused(world, "moved", "run", "--region", "ie")
    proc.kill()
    proc.wait()
    ((sid, state),) = world.ctl("SELECT shard_id, state FROM migrator.shard WHERE region = 'ie'")
    assert state == "cut_over" and _manifests(world) == []
    # nobody is locked out: a moved user writes at their new home, and the source refuses them
    uid = int(world.ctl("SELECT min(user_key::bigint) FROM migrator.shard_user WHERE shard_id = %s", (sid,))[0][0])
    touch = "UPDATE users SET display_name = %s WHERE user_id = %s RETURNING 1"
    assert world.rows("ie", touch, ("written-at-ie", uid)) == [(1,)]
    with pytest.raises(psycopg.Error):
        world.rows("us", touch, ("written-at-us", uid))
    rc, out = _audit(world, _reader(world, tmp_path))
    assert rc == 1 and ("no manifest kept for a shard moved here", sid) in {
        (f["kind"], f.get("shard")) for f in out["findings"]
    }
    for _ in range(2):
        res = world.migrator("cutover", "--region", "ie", "--json")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert _manifests(world) == [(sid, "cutover")]
    rc, out = _audit(world, _reader(world, tmp_path))
    assert rc == 0, out.get("findings") or out
    # paused at the same place again: a second "paused at moved" row
    proc = start(world, "rollback", "--region", "ie", "--reason", "killed", env={"MIGRATOR_PAUSE_AT": "moved"})
    q = "SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'paused at moved'"
    deadline = time.monotonic() + 120
    while world.ctl(q)[0][0] < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the rollback never reached its manifest"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert world.ctl("SELECT state FROM migrator.shard WHERE shard_id = %s", (sid,)) == [("rolled_back",)]
    assert _manifests(world) == [(sid, "cutover")]
    # home at the source again, with the write made at the destination meanwhile, and writable there
    assert world.rows("us", "SELECT display_name FROM users WHERE user_id = %s", (uid,)) == [("written-at-ie",)]
    assert world.rows("us", touch, ("written-at-us", uid)) == [(1,)]
    res = world.migrator("rollback", "--region", "ie", "--reason", "again", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert _manifests(world) == [(sid, "cutover"), (sid, "rollback")]
    assert world.rows("us", "SELECT display_name FROM users WHERE user_id = %s", (uid,)) == [("written-at-us",)]
