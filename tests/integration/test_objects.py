"""Users' objects across S3 endpoints (moto's server mode over HTTP, one per data center):
copied with their rows, verified by their bytes, resumed after an outage, rolled back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import psycopg
import pytest

from migrator.demo import seed
from migrator.demo.embedded import LocalS3
from tests.conftest import World, demo_spec, fresh_databases
from tests.helpers import cut_when, paused

pytestmark = pytest.mark.integration
BIG = 6 * 2**20  # above the 5 MB multipart threshold used here


class Outage:
    """A TCP relay in front of an endpoint: `down()` drops every connection and refuses new
    ones, as a network outage would; the endpoint and its data stay as they are."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.listen(64)
        self.up = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _pipe(self, a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                c.close()
                continue
            u = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [c, u]
            threading.Thread(target=self._pipe, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c), daemon=True).start()

    def down(self):
        self.up = False
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns.clear()

    def restore(self):
        self.up = True


@pytest.fixture(scope="session")
def endpoints():
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    servers = {r: LocalS3(r).start() for r in ("us", "ie", "no")}
    yield servers
    for s in servers.values():
        s.stop()


def s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def oworld(cluster, endpoints, tmp_path):
    return _oworld(cluster, endpoints, tmp_path, 90)


def _oworld(cluster, endpoints, tmp_path, users: int) -> World:
    dsn, control = fresh_databases(cluster, seed.schema_sql())
    seed.seed(dsn["us"], users)
    tag = tmp_path.name.replace("_", "-").lower()[-20:].strip("-")
    buckets = {r: f"media-{r}-{tag}" for r in endpoints}
    for r, b in buckets.items():
        s3(endpoints[r].endpoint).create_bucket(Bucket=b)
    relay = Outage(endpoints["ie"].port)
    spec = demo_spec(dsn, control, batch_users=5, shards=1)
    spec["objects"] = {
        "key_column": {"table": "videos", "column": "object_key"},
        "user_prefix": "users/{user}/",
        "threads": 4,
        "multipart_threshold_mb": 5,
        "part_size_mb": 5,
        "stores": {
            r: {"endpoint": endpoints[r].endpoint if r != "ie" else f"http://127.0.0.1:{relay.port}", "bucket": b}
            for r, b in buckets.items()
        },
    }
    w = World(cluster, dsn, control, tmp_path / "spec.yaml", spec)
    w.write_spec()
    us = s3(endpoints["us"].endpoint)
    keys = [k for (k,) in w.rows("us", "SELECT object_key FROM videos")]
    keys += [f"users/{u}/avatar.png" for (u,) in w.rows("us", "SELECT user_id FROM users")]
    big_owner = w.rows("us", "SELECT min(user_id) FROM users WHERE country_code = 'DE'")[0][0]

    def put(k):
        body = os.urandom(BIG) if k == f"users/{big_owner}/avatar.png" else (k.encode() * 40)[: 100 + len(k) * 7]
        us.put_object(Bucket=buckets["us"], Key=k, Body=body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, keys))
    w.buckets, w.endpoints, w.relay, w.big_owner = buckets, endpoints, relay, big_owner
    return w


def objects_of(w, ids) -> set[str]:
    """The keys that belong to these users, worked out here from the source."""
    keys = {k for (k,) in w.rows("us", "SELECT object_key FROM videos WHERE user_id = ANY(%s)", (ids,))}
    return keys | {f"users/{u}/avatar.png" for u in ids}


def listing(w, region) -> dict[str, bytes]:
    c = s3(w.endpoints[region].endpoint)
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=w.buckets[region]):
        for o in page.get("Contents", []):
            out[o["Key"]] = o
    return out


def body(w, region, key) -> bytes:
    return s3(w.endpoints[region].endpoint).get_object(Bucket=w.buckets[region], Key=key)["Body"].read()


def ids_for(w, region):
    codes = [c for c, r in w.spec["policy"].items() if r == region]
    return [u for (u,) in w.rows("us", "SELECT user_id FROM users WHERE country_code = ANY(%s)", (codes,))]


def test_objects_copied_verified_and_only_theirs(oworld):
    w = oworld
    w.write_spec(copy={"batch_users": 100})  # large batches list the common prefix once
    res = w.migrator("run", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    for region in ("ie", "no"):
        want = objects_of(w, ids_for(w, region))
        got = listing(w, region)
        assert set(got) == want
        for k in want:
            assert body(w, region, k) == body(w, "us", k), k
    assert f"users/{w.big_owner}/avatar.png" in listing(w, "ie")
    assert listing(w, "ie")[f"users/{w.big_owner}/avatar.png"]["Size"] == BIG
    n = w.ctl("SELECT count(*) FROM migrator.object_manifest")[0][0]
    assert n == len(objects_of(w, ids_for(w, "ie") + ids_for(w, "no")))


def test_a_move_again_takes_the_objects_from_the_users_home_and_its_rollback_removes_them(oworld):
    w = oworld
    assert w.migrator("run", "--region", "ie").returncode == 0
    moved = ids_for(w, "ie")[:2]
    with psycopg.connect(w.dsn["ie"]) as c:  # at their home, they move to Sweden
        c.execute("UPDATE users SET country_code = 'SE' WHERE user_id = ANY(%s)", (moved,))
    changed = f"users/{moved[0]}/avatar.png"  # the application wrote it again at their home
    s3(w.endpoints["ie"].endpoint).put_object(Bucket=w.buckets["ie"], Key=changed, Body=b"written at ie")
    res = w.migrator("run", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert json.loads(res.stdout)["moves"] == {"ie→no": 2}
    staying_no = objects_of(w, ids_for(w, "no"))
    assert set(listing(w, "no")) == staying_no | objects_of(w, moved)
    for k in objects_of(w, moved):  # the bytes of their home, not of the source
        assert body(w, "no", k) == body(w, "ie", k), k
    assert body(w, "no", changed) == b"written at ie"
    res = w.migrator("rollback", "--wave", "default-2", "--reason", "test", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert set(listing(w, "no")) == staying_no
    assert objects_of(w, moved) <= set(listing(w, "ie"))


def test_a_move_back_replaces_the_objects_the_first_move_left_and_their_purge_leaves_them(oworld):
    w = oworld
    w.write_spec(purge={"after": "0s"})  # every table deleted: no key needed
    assert w.migrator("run", "--region", "ie").returncode == 0
    back = ids_for(w, "ie")[:2]
    with psycopg.connect(w.dsn["ie"]) as c:  # at their home, they leave the EEA
        c.execute("UPDATE users SET country_code = 'US' WHERE user_id = ANY(%s)", (back,))
    ie = s3(w.endpoints["ie"].endpoint)
    rewritten, deleted = f"users/{back[0]}/avatar.png", f"users/{back[1]}/avatar.png"
    ie.put_object(Bucket=w.buckets["ie"], Key=rewritten, Body=b"written at ie")
    ie.delete_object(Bucket=w.buckets["ie"], Key=deleted)  # the application deleted it at their home
    theirs = objects_of(w, back) - {deleted}
    res = w.migrator("run", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert json.loads(res.stdout)["moves"] == {"ie→us": 2}
    at_us = listing(w, "us")
    assert theirs <= set(at_us) and deleted not in at_us  # what their home holds, and nothing else
    assert {k: body(w, "us", k) for k in theirs} == {k: body(w, "ie", k) for k in theirs}
    assert body(w, "us", rewritten) == b"written at ie"
    res = w.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert {k: body(w, "us", k) for k in theirs}[rewritten] == b"written at ie"  # the first move's purge left them
    assert theirs <= set(listing(w, "us"))
    assert not objects_of(w, back) & set(listing(w, "ie"))  # the move back's purge retired the ie copy
    stayed = [u for u in ids_for(w, "ie") if u not in back]
    assert not objects_of(w, stayed) & set(listing(w, "us"))  # and the first move's, the others' us copy
    res = w.migrator("audit", "--json")
    assert res.returncode == 0, res.stdout[-3000:]


def test_corrupted_object_is_named_and_rollback_removes_only_the_shards(oworld):
    w = oworld
    assert w.migrator("plan").returncode == 0
    assert w.migrator("copy", "--region", "ie").returncode == 0
    ie = s3(w.endpoints["ie"].endpoint)
    victim = sorted(objects_of(w, ids_for(w, "ie")))[0]
    ie.put_object(Bucket=w.buckets["ie"], Key=victim, Body=b"tampered")
    ie.put_object(Bucket=w.buckets["ie"], Key="unrelated/keep-me.txt", Body=b"not the shard's")
    res = w.migrator("verify", "--region", "ie", "--json")
    assert res.returncode == 1
    named = [d for s in json.loads(res.stdout)["shards"] for d in s.get("differences", [])]
    assert named == [{"object": victim, "problem": "different at destination"}]
    res = w.migrator("rollback", "--region", "ie", "--json")
    assert res.returncode == 0, res.stderr
    assert set(listing(w, "ie")) == {"unrelated/keep-me.txt"}


def _cut_mid_copy_then_resume(w, batches: int) -> tuple[dict, dict]:
    """Ireland's planned copy with its endpoint cut once `batches` object batches are
    committed: it stops resumable (exit 1, the shard still `copying`); the endpoint back,
    `run` finishes. The destination's objects after the cut (key -> LastModified) and after
    the rerun (its listing)."""
    irish = "SELECT count(*) FROM migrator.object_checkpoint WHERE shard_id LIKE '%%/ie-%%'"
    with cut_when(w, irish, batches, w.relay.down):
        res = w.migrator("copy", "--region", "ie", "--json")
    assert res.returncode == 1, res.stdout[-2000:]
    # an endpoint gone is transient: the shard keeps its state and resumes (never `failed`)
    assert json.loads(res.stdout)["shards"][0]["state"] == "copying"
    first = {k: o["LastModified"] for k, o in listing(w, "ie").items()}
    assert first
    w.relay.restore()
    time.sleep(1.1)  # LastModified has one-second resolution
    res = w.migrator("run", "--region", "ie", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    return first, listing(w, "ie")


def test_endpoint_outage_mid_copy_then_resume_copies_nothing_twice(oworld):
    w = oworld
    assert w.migrator("plan", "--region", "ie").returncode == 0

    first, after = _cut_mid_copy_then_resume(w, 2)
    assert set(after) == objects_of(w, ids_for(w, "ie"))
    assert {k: after[k]["LastModified"] for k in first} == first  # nothing already there was copied again


def test_batch_failing_midway_then_rollback_leaves_no_object_behind(oworld):
    """A batch whose copies stopped part-way (an object its rows name is missing at the
    source) never got a manifest; rollback still removes what it had copied."""
    w = oworld
    assert w.migrator("plan", "--region", "ie").returncode == 0
    first = [
        int(u)
        for (u,) in w.ctl(
            "SELECT user_key FROM migrator.shard_user su JOIN migrator.shard s "
            "USING (shard_id) WHERE s.region = 'ie' AND su.batch_no = 0"
        )
    ]
    gone = sorted(objects_of(w, first))[-1]
    s3(w.endpoints["us"].endpoint).delete_object(Bucket=w.buckets["us"], Key=gone)
    res = w.migrator("copy", "--region", "ie", "--json")
    assert res.returncode == 1
    assert (
        f"source object {gone!r} (named by the key column) is not in bucket"
        in json.loads(res.stdout)["shards"][0]["error"]
    )
    copied = set(listing(w, "ie"))
    recorded = {k for (k,) in w.ctl("SELECT key FROM migrator.object_manifest")}
    assert copied - recorded, "expected objects copied by the failed batch and never recorded"
    res = w.migrator("rollback", "--region", "ie", "--json")
    assert res.returncode == 0, res.stderr
    assert set(listing(w, "ie")) == set()


def test_purge_deletes_every_version_of_the_moved_users_objects_and_only_theirs(oworld):
    w = oworld
    us = s3(w.endpoints["us"].endpoint)
    us.put_bucket_versioning(Bucket=w.buckets["us"], VersioningConfiguration={"Status": "Enabled"})
    moved = ids_for(w, "ie")
    for u in moved:  # a second version of each moved user's avatar, so the purge has old ones to find
        us.put_object(Bucket=w.buckets["us"], Key=f"users/{u}/avatar.png", Body=f"v2 of {u}".encode())
    w.write_spec(purge={"after": "0s"})  # every table deleted: no key needed
    assert w.migrator("run", "--region", "ie").returncode == 0
    at_home = {k: body(w, "ie", k) for k in objects_of(w, moved)}
    staying = set(listing(w, "us")) - objects_of(w, moved)
    res = w.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    receipts = [s["phases"]["purge"]["purged"] for s in json.loads(res.stdout)["shards"]]
    assert sum(r["objects_deleted"] for r in receipts) == len(at_home)
    versions = []
    for page in us.get_paginator("list_object_versions").paginate(Bucket=w.buckets["us"]):
        versions += [v["Key"] for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
    assert not set(versions) & objects_of(w, moved)  # no version, no delete marker left
    assert set(listing(w, "us")) == staying  # the users who stay keep theirs
    assert {k: body(w, "ie", k) for k in at_home} == at_home
    assert body(w, "ie", f"users/{moved[0]}/avatar.png") == f"v2 of {moved[0]}".encode()


def test_purge_after_the_application_changed_objects_at_the_new_home(oworld):
    """The application overwrote one object and deleted another at the new home: the purge
    goes on (the deleted one counted in its receipt); a source object a stale writer changed
    after the copy refuses the purge, named, until it is moved again."""
    w = oworld
    w.write_spec(purge={"after": "0s"})
    assert w.migrator("run", "--region", "ie").returncode == 0
    ie, us = s3(w.endpoints["ie"].endpoint), s3(w.endpoints["us"].endpoint)
    moved = sorted(objects_of(w, ids_for(w, "ie")))
    overwritten, deleted, stale = moved[0], moved[1], moved[2]
    ie.put_object(Bucket=w.buckets["ie"], Key=overwritten, Body=b"edited at home")
    ie.delete_object(Bucket=w.buckets["ie"], Key=deleted)
    us.put_object(Bucket=w.buckets["us"], Key=stale, Body=b"written at the old home")
    res = w.migrator("purge", "--json")
    assert res.returncode == 1
    assert stale in res.stdout and "changed at the source since its copy" in res.stdout
    assert body(w, "us", stale) == b"written at the old home"  # its batch kept
    us.delete_object(Bucket=w.buckets["us"], Key=stale)  # an operator settles it
    res = w.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    receipts = [s["phases"]["purge"]["purged"] for s in json.loads(res.stdout)["shards"]]
    assert sum(r["objects_not_at_destination"] for r in receipts) == 1
    assert not set(listing(w, "us")) & set(moved)
    assert body(w, "ie", overwritten) == b"edited at home"


def test_an_object_the_source_refuses_to_delete_stops_the_purge_named_and_a_rerun_finishes(oworld):
    """DeleteObjects answers 200 even when a key was not deleted; that key's error is the
    purge's, named with the bucket, the key and the code, never taken for success."""
    w = oworld
    w.write_spec(purge={"after": "0s"})
    assert w.migrator("run", "--region", "ie").returncode == 0
    moved = ids_for(w, "ie")
    held = f"users/{moved[-1]}/avatar.png"
    us = s3(w.endpoints["us"].endpoint)
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:DeleteObject",
                "Resource": f"arn:aws:s3:::{w.buckets['us']}/{held}",
            }
        ],
    }
    us.put_bucket_policy(Bucket=w.buckets["us"], Policy=json.dumps(deny))
    res = w.migrator("purge", "--json")
    assert res.returncode == 1
    error = json.loads(res.stdout)["shards"][0]["error"]
    assert w.buckets["us"] in error and repr(held) in error and "AccessDenied" in error, error
    assert held in listing(w, "us")
    sid = w.ctl("SELECT shard_id FROM migrator.shard WHERE region = 'ie'")[0][0]
    assert w.ctl("SELECT state FROM migrator.shard WHERE shard_id = %s", (sid,)) == [("purging",)]
    # the batch holding the key committed no receipt: its rows are still at the source
    assert w.rows("us", "SELECT count(*) FROM users WHERE user_id = %s", (moved[-1],)) == [(1,)]
    us.delete_bucket_policy(Bucket=w.buckets["us"])
    res = w.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert not set(listing(w, "us")) & objects_of(w, moved)
    assert w.rows("us", "SELECT count(*) FROM users WHERE user_id = ANY(%s)", (moved,)) == [(0,)]


def test_an_endpoint_lost_mid_purge_leaves_it_resumable_then_it_finishes(oworld):
    w = oworld
    w.write_spec(purge={"after": "0s"})
    assert w.migrator("run", "--region", "ie").returncode == 0
    moved = ids_for(w, "ie")
    proc = paused(w, "purged batch", "purge", "--json", seconds=2, out=subprocess.PIPE)
    w.relay.down()  # the destination's endpoint, which the next batch's objects are checked against
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        w.relay.restore()
    assert proc.returncode == 1
    sid = w.ctl("SELECT shard_id FROM migrator.shard WHERE region = 'ie'")[0][0]
    assert w.ctl("SELECT state FROM migrator.shard WHERE shard_id = %s", (sid,)) == [("purging",)]
    q = "SELECT detail->>'event' FROM migrator.audit WHERE shard_id = %s ORDER BY id"
    events = [e for (e,) in w.ctl(q, (sid,))]
    assert events[-1] == "purge interrupted" and "purge failed" not in events, events  # transient: resumable
    done = w.rows("us", "SELECT count(*) FROM migrator.purge_ledger WHERE shard_id = %s", (sid,))[0][0]
    assert done >= 1
    res = w.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert w.ctl("SELECT state FROM migrator.shard WHERE shard_id = %s", (sid,)) == [("purged",)]
    assert not set(listing(w, "us")) & objects_of(w, moved)
    assert w.rows("us", "SELECT count(*) FROM users WHERE user_id = ANY(%s)", (moved,)) == [(0,)]


def test_a_signed_manifest_is_kept_beside_the_objects_in_the_region(oworld, monkeypatch):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    w = oworld
    seed = "33" * 32
    pub = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed)).public_key()
    monkeypatch.setenv("TEST_OBJ_SIGNING_IE", seed)
    w.write_spec(
        evidence={
            "regions": {
                "ie": {
                    "signing": {"env": "TEST_OBJ_SIGNING_IE"},
                    "public_key": pub.public_bytes(Encoding.Raw, PublicFormat.Raw).hex(),
                }
            }
        }
    )
    assert w.migrator("run", "--region", "ie").returncode == 0
    kept = {k: body(w, "ie", k) for k in listing(w, "ie") if k.startswith("evidence/")}
    (doc_key,) = [k for k in kept if k.endswith(".json")]
    assert doc_key + ".sig" in kept
    pub.verify(bytes.fromhex(kept[doc_key + ".sig"].decode()), kept[doc_key])  # raises if not signed by the region
    doc = json.loads(kept[doc_key])
    assert doc["objects"]["count"] == len(objects_of(w, ids_for(w, "ie"))) and doc["event"] == "cutover"
    assert w.rows("ie", "SELECT doc FROM migrator.manifests") == [(kept[doc_key].decode(),)]


def test_a_bucket_far_larger_than_the_shard_is_listed_per_user_not_whole(cluster, endpoints, tmp_path):
    """A shard lists the common prefix once when its users' objects are a fair share of it,
    and each user's prefix (in parallel) when the prefix holds far more: the listing is then
    bounded by the shard, not by the bucket. Either way exactly the shard's objects move,
    and a copy listing per user that loses its endpoint mid-way resumes."""
    w = _oworld(cluster, endpoints, tmp_path, 700)
    us = s3(w.endpoints["us"].endpoint)
    others = [f"users/{10_000_000 + i}/avatar.png" for i in range(4500)]  # users not in any wave
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: us.put_object(Bucket=w.buckets["us"], Key=k, Body=b"x"), others))

    def listed_by(region: str, event: str = "copied"):
        (detail,) = w.ctl(
            "SELECT a.detail FROM migrator.audit a JOIN migrator.shard s USING (shard_id) "
            "WHERE s.region = %s AND a.detail->>'event' = %s",
            (region, event),
        )
        return detail[0]["objects_listed"]

    # Norway's shard with 4 threads: the prefix (about 7,300 keys) is within its budget
    w.write_spec(copy={"batch_users": 40})
    res = w.migrator("run", "--region", "no", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert len(ids_for(w, "no")) > 64
    assert listed_by("no") == {"source": "common prefix", "destination": "common prefix"}
    # Ireland's with 64 threads: the same prefix is far more than its rounds of per-user
    # listings. Its endpoint is cut after a batch; the copy stops resumable, and the rerun
    # finishes without copying again what was there
    w.spec["objects"]["threads"] = 64
    w.write_spec(copy={"batch_users": 20})
    assert w.migrator("plan", "--region", "ie").returncode == 0

    first, after = _cut_mid_copy_then_resume(w, 1)
    assert {k: after[k]["LastModified"] for k in first} == first  # nothing already there was copied again
    assert len(ids_for(w, "ie")) > 64
    assert listed_by("ie") == {"source": "per user", "destination": "common prefix"}
    # the verify decides once for the shard too, as the copy did
    assert listed_by("no", "verify") == "common prefix"
    assert listed_by("ie", "verify") == "per user"
    for region in ("ie", "no"):
        want = objects_of(w, ids_for(w, region))
        got = listing(w, region)
        assert set(got) == want, region
        for k in sorted(want)[:20]:
            assert body(w, region, k) == body(w, "us", k), k
    # Ireland's rollback, listing the source per user: exactly the shard's objects leave
    # Ireland, and the source keeps its own and the other users' alike
    res = w.migrator("rollback", "--region", "ie", "--reason", "per-user listing rolled back", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert set(listing(w, "ie")) == set()
    assert set(listing(w, "us")) >= objects_of(w, ids_for(w, "ie")) | set(others)


def test_an_endpoint_lost_during_verify_and_rollback_leaves_each_resumable(oworld):
    """Ireland's endpoint goes away for a verify, then for a rollback: each stops with the
    shard as it was (not failed, nothing half-done left unnamed), and each rerun with the
    endpoint back finishes. The rows and objects are checked by this test's own SQL and
    listings."""
    w = oworld
    w.write_spec(copy={"batch_users": 20})  # several batches, each listing its users' keys
    assert w.migrator("plan", "--region", "ie").returncode == 0
    assert w.migrator("copy", "--region", "ie").returncode == 0
    moved = ids_for(w, "ie")

    def state() -> str:
        return w.ctl("SELECT state FROM migrator.shard WHERE region = 'ie'")[0][0]

    w.relay.down()
    try:
        res = w.migrator("verify", "--region", "ie", "--json")
    finally:
        w.relay.restore()
    assert res.returncode == 1, res.stdout[-2000:]
    err = json.loads(res.stdout)["shards"][0]["error"]
    assert f"127.0.0.1:{w.relay.port}/{w.buckets['ie']}" in err and "cannot be reached" in err, err
    assert state() == "copied"
    assert w.migrator("verify", "--region", "ie").returncode == 0
    assert state() == "verified"

    w.relay.down()
    try:
        res = w.migrator("rollback", "--region", "ie", "--reason", "endpoint lost", "--json")
    finally:
        w.relay.restore()
    assert res.returncode == 1, res.stdout[-2000:]
    err = json.loads(res.stdout)["shards"][0]["error"]
    assert f"127.0.0.1:{w.relay.port}/{w.buckets['ie']}" in err and "cannot be reached" in err, err
    assert state() != "rolled_back"
    assert "failed" not in [s for (s,) in w.ctl("SELECT state FROM migrator.shard WHERE region = 'ie'")]
    res = w.migrator("rollback", "--region", "ie", "--reason", "endpoint back", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert state() == "rolled_back"
    assert set(listing(w, "ie")) == set()
    assert w.rows("ie", "SELECT count(*) FROM users WHERE user_id = ANY(%s)", (moved,)) == [(0,)]
    assert set(listing(w, "us")) >= objects_of(w, moved)  # the source keeps them all
