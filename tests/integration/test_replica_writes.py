"""Batches written with the graph's own foreign-key checks skipped (migrator/replica.py):
only tables whose skipped triggers are those checks; every other trigger and foreign key
still acts, row by row, at the copy, the rollback and the purge."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest

from migrator.spec import parse_spec
from migrator.stores.replica import Trigger, skippable
from tests.conftest import DEMO_OWNED, World
from tests.helpers import start

pytestmark = pytest.mark.integration

# A statement trigger on every graph table that fires in either mode (ENABLE ALWAYS) and
# writes down the mode each of the tool's statements ran in.
WATCH = """
CREATE TABLE seen (tbl text, op text, mode text);
CREATE FUNCTION seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO seen VALUES (TG_TABLE_NAME, TG_OP, current_setting('session_replication_role'));
  RETURN NULL;
END$$;
"""


def watch(w: World, region: str) -> None:
    with psycopg.connect(w.dsn[region]) as c:
        c.execute(WATCH)
        for t in DEMO_OWNED:
            c.execute(f"CREATE TRIGGER seen AFTER INSERT OR DELETE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION seen()")
            c.execute(f"ALTER TABLE {t} ENABLE ALWAYS TRIGGER seen")


def modes(w: World, region: str, op: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for t, m in w.rows(region, "SELECT tbl, mode FROM seen WHERE op = %s", (op,)):
        out.setdefault(t, set()).add(m)
    return out


def missing_parents(w: World, region: str) -> int:
    """Rows of the demo graph whose parent row is not there (the tests' own anti-joins)."""
    return w.rows(
        region,
        "SELECT (SELECT count(*) FROM videos v WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.user_id = v.user_id))"
        " + (SELECT count(*) FROM comments c WHERE NOT EXISTS (SELECT 1 FROM videos v WHERE v.video_id = c.video_id))"
        " + (SELECT count(*) FROM login_events l WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.user_id = l.user_id))"
        " + (SELECT count(*) FROM devices d WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.user_id = d.user_id))",
    )[0][0]


def test_only_tables_with_nothing_but_graph_edge_checks_skip_them(world: World):
    """Copy and rollback: the tables whose only triggers are the graph's foreign keys are
    written in replica mode; login_events, with an application trigger of its own, is
    written row by row and its trigger fires for every row, as before."""
    watch(world, "ie")
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("CREATE TABLE app_log (event_id bigint)")
        c.execute("""CREATE FUNCTION app_log() RETURNS trigger LANGUAGE plpgsql AS
                     $$BEGIN INSERT INTO app_log VALUES (NEW.event_id); RETURN NEW; END$$""")
        c.execute("CREATE TRIGGER app_log AFTER INSERT ON login_events FOR EACH ROW EXECUTE FUNCTION app_log()")
    assert world.migrator("plan").returncode == 0
    res = world.migrator("copy", "--region", "ie")
    assert res.returncode == 0, res.stderr[-2000:]
    res = world.migrator("verify", "--region", "ie")
    assert res.returncode == 0, res.stderr[-2000:]
    inserted = modes(world, "ie", "INSERT")
    assert inserted == {
        "users": {"replica"},
        "videos": {"replica"},
        "comments": {"replica"},
        "devices": {"replica"},
        "login_events": {"origin"},
    }
    assert missing_parents(world, "ie") == 0
    said = world.ctl(
        "SELECT DISTINCT detail->'edge_checks_skipped' FROM migrator.audit WHERE detail->>'event' = 'copied'"
    )
    assert said == [(["comments", "devices", "users", "videos"],)]
    logins = world.rows("ie", "SELECT count(*) FROM login_events")[0][0]
    assert logins > 0 and world.rows("ie", "SELECT count(*) FROM app_log")[0][0] == logins

    res = world.migrator("rollback", "--region", "ie", "--reason", "test")
    assert res.returncode == 0, res.stderr[-2000:]
    deleted = modes(world, "ie", "DELETE")
    assert deleted == {t: ({"origin"} if t == "login_events" else {"replica"}) for t in DEMO_OWNED}
    for t in DEMO_OWNED:
        assert world.rows("ie", f"SELECT count(*) FROM {t}")[0][0] == 0, t


def test_a_foreign_key_off_the_graph_is_checked_for_every_row_of_the_copy(world: World):
    """The destination declares a foreign key the graph does not (a comment's author): the
    copy of comments fires it for every row, so a batch whose comments name an author the
    destination lacks is refused by name and not committed."""
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("ALTER TABLE comments ADD CONSTRAINT comments_author_fk FOREIGN KEY (author_id) REFERENCES users")
    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("plan").returncode == 0
    res = world.migrator("copy", "--region", "ie", "--json")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-2000:]
    assert "comments_author_fk" in out and "table comments" in out
    emails = [e for (e,) in world.rows("us", "SELECT email FROM users LIMIT 50")]
    assert not any(e in out for e in emails)
    assert world.rows("ie", "SELECT count(*) FROM comments")[0][0] == 0
    assert world.rows("ie", "SELECT count(*) FROM migrator.batch_ledger")[0][0] == 0
    assert {s for (s,) in world.ctl("SELECT state FROM migrator.shard WHERE region = 'ie'")} == {"failed"}


def test_a_rollback_leaves_no_row_pointing_at_a_deleted_user(world: World):
    """After the copy, a resident at the destination follows a moved user, through a table
    and a foreign key the graph does not know: the rollback cannot delete that user, says
    which constraint stops it, and leaves the reference whole; once the follow is gone, the
    rollback finishes."""
    world.write_spec(sharding={"shards_per_region": 1})
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy", "--region", "ie").returncode == 0
    moved = world.rows("ie", "SELECT min(user_id) FROM users")[0][0]
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("INSERT INTO users VALUES (900001, 'resident@example.test', NULL, 'IE', now(), NULL)")
        c.execute(
            "CREATE TABLE follows (follower bigint REFERENCES users, "
            "followee bigint CONSTRAINT follows_followee_fk REFERENCES users)"
        )
        c.execute("INSERT INTO follows VALUES (900001, %s)", (moved,))
    res = world.migrator("rollback", "--region", "ie", "--reason", "test")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-2000:]
    assert "follows_followee_fk" in out and "resident@example.test" not in out
    assert world.rows("ie", "SELECT count(*) FROM follows f JOIN users u ON u.user_id = f.followee")[0][0] == 1
    assert missing_parents(world, "ie") == 0
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("DELETE FROM follows")
    res = world.migrator("rollback", "--region", "ie", "--reason", "test")
    assert res.returncode == 0, res.stderr[-2000:]
    assert world.rows("ie", "SELECT user_id FROM users") == [(900001,)]
    for t in ("videos", "comments", "login_events", "devices"):
        assert world.rows("ie", f"SELECT count(*) FROM {t}")[0][0] == 0, t


def _role(w: World, region: str, name: str) -> str:
    """A login role with every privilege the migrator needs at a destination, but no superuser."""
    role = f"{name}_{w.spec_path.parent.name}"[:60].lower().replace("-", "_")
    db = w.dsn[region].rsplit("/", 1)[1]
    with psycopg.connect(w.dsn[region], autocommit=True) as c:
        c.execute(f'CREATE ROLE "{role}" LOGIN')
        c.execute(f'GRANT CREATE ON DATABASE "{db}" TO "{role}"')
        c.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE, TRIGGER ON ALL TABLES IN SCHEMA public TO "{role}"')
        c.execute(f'GRANT INSERT ON seen TO "{role}"')
    return role


def test_a_role_that_may_not_set_the_mode_checks_every_row(world: World):
    """Without SET on session_replication_role (ie) every row is checked, as before; with
    it granted (no) the graph-edge checks are skipped; both copies are verified."""
    for r in ("ie", "no"):
        watch(world, r)
    ie_role, no_role = _role(world, "ie", "plain"), _role(world, "no", "granted")
    with psycopg.connect(world.dsn["no"], autocommit=True) as c:
        c.execute(f'GRANT SET ON PARAMETER session_replication_role TO "{no_role}"')
    regions = dict(world.spec["regions"])
    regions["ie"] = {"dsn": world.dsn["ie"].replace("postgres@", f"{ie_role}@", 1)}
    regions["no"] = {"dsn": world.dsn["no"].replace("postgres@", f"{no_role}@", 1)}
    world.write_spec(regions=regions)
    assert world.migrator("plan").returncode == 0
    for r in ("ie", "no"):
        res = world.migrator("copy", "--region", r)
        assert res.returncode == 0, res.stderr[-2000:]
        res = world.migrator("verify", "--region", r)
        assert res.returncode == 0, res.stderr[-2000:]
    assert modes(world, "ie", "INSERT") == {t: {"origin"} for t in DEMO_OWNED}
    said = dict(
        world.ctl(
            "SELECT DISTINCT s.region, a.detail->'edge_checks_skipped' FROM migrator.audit a "
            "JOIN migrator.shard s USING (shard_id) WHERE a.detail->>'event' = 'copied'"
        )
    )
    assert said == {"ie": [], "no": sorted(DEMO_OWNED)}
    assert modes(world, "no", "INSERT") == {t: {"replica"} for t in DEMO_OWNED}
    for r in ("ie", "no"):
        assert missing_parents(world, r) == 0


def test_the_rule_of_which_tables_skip(world: World):
    """`skippable` over catalog rows made by hand: the guard, graph edges and ALWAYS
    triggers let a table skip; a trigger of its own, a replica-only trigger or a foreign
    key off the graph keeps it on per-row triggers."""
    graph = parse_spec(world.spec).entity_graph
    edge = ("public", "videos", ("user_id",), "public", "users", ("user_id",))
    off = ("public", "comments", ("author_id",), "public", "users", ("user_id",))
    names = ["users", "videos", "comments", "login_events", "devices"]
    found = [
        Trigger("videos", "RI_ConstraintTrigger_c_1", "O", edge),
        Trigger("users", "RI_ConstraintTrigger_a_1", "O", edge),
        Trigger("users", "migrator_guard", "O"),
        Trigger("devices", "audit", "A"),
        Trigger("comments", "RI_ConstraintTrigger_c_2", "O", off),
        Trigger("login_events", "app", "O"),
    ]
    assert skippable(found, graph, names) == {"users", "videos", "devices"}
    assert skippable([Trigger("devices", "only_for_replicas", "R")], graph, names) == set(names) - {"devices"}
    assert skippable([Trigger("users", "RI_ConstraintTrigger_a_2", "O", off)], graph, names) == set(names) - {"users"}


def test_a_purge_deletes_by_the_graph_and_refuses_what_another_table_still_needs(world: World, monkeypatch):
    """At the source, videos are deleted with their graph checks skipped, but a US user's
    playlist names a moved user's video through a foreign key the graph does not know:
    the purge refuses before anything is purged, naming the table and the constraint, and
    the video stays; without the playlist the purge finishes and no row is left pointing
    at a deleted one."""
    monkeypatch.setenv("TEST_PSEUDONYM_KEY_IE", "ie-test-key-0123456789abcdef")
    monkeypatch.setenv("TEST_PSEUDONYM_KEY_NO", "no-test-key-0123456789abcdef")
    world.write_spec(
        purge={
            "after": "0s",
            "tables": {"users": {"pseudonymise": ["email"]}, "login_events": {"pseudonymise": ["ip"]}},
            "keys": {"ie": {"env": "TEST_PSEUDONYM_KEY_IE"}, "no": {"env": "TEST_PSEUDONYM_KEY_NO"}},
        },
        sharding={"shards_per_region": 1},
    )
    watch(world, "us")
    assert world.migrator("run").returncode == 0
    video = world.rows("ie", "SELECT min(video_id) FROM videos")[0][0]
    with psycopg.connect(world.dsn["us"]) as c:
        c.execute(
            "CREATE TABLE playlist (owner bigint, video_id bigint CONSTRAINT playlist_video_fk REFERENCES videos)"
        )
        c.execute("INSERT INTO playlist VALUES (1, %s)", (video,))
    res = world.migrator("purge", "--region", "ie")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-2000:]  # a table the spec does not name: refused before anything is purged
    assert "public.playlist" in out and "playlist_video_fk" in out
    assert {s for (s,) in world.ctl("SELECT state FROM migrator.shard WHERE region = 'ie'")} == {"cut_over"}
    assert world.rows("us", "SELECT count(*) FROM playlist p JOIN videos v USING (video_id)")[0][0] == 1
    with psycopg.connect(world.dsn["us"]) as c:
        c.execute("DROP TABLE playlist")
        c.execute("TRUNCATE seen")
    res = world.migrator("purge", "--region", "ie")
    assert res.returncode == 0, res.stderr[-2000:]
    deleted = modes(world, "us", "DELETE")
    assert deleted == {"videos": {"replica"}, "comments": {"replica"}, "devices": {"replica"}}
    assert missing_parents(world, "us") == 0
    assert world.rows("us", "SELECT count(*) FROM videos WHERE video_id = %s", (video,)) == [(0,)]


def test_the_plan_writes_its_membership_without_its_own_key_checks(world: World):
    """The plan's membership rows name the shards it inserted just before, so their foreign
    key is not checked row by row; the directory rows, with no such key, are written as ever.
    Every moving user is a member of an existing shard."""
    assert world.migrator("upgrade").returncode == 0  # the control tables, before the plan writes them
    with psycopg.connect(world.control) as c:
        c.execute(WATCH)
        for t in ("migrator.shard_user", "migrator.directory"):
            c.execute(f"CREATE TRIGGER seen AFTER INSERT ON {t} FOR EACH STATEMENT EXECUTE FUNCTION seen()")
            c.execute(f"ALTER TABLE {t} ENABLE ALWAYS TRIGGER seen")
    res = world.migrator("plan")
    assert res.returncode == 0, res.stderr[-2000:]
    said = {t: m for t, m in world.ctl("SELECT tbl, mode FROM seen WHERE op = 'INSERT'")}
    assert said == {"shard_user": "replica", "directory": "origin"}
    moving = [c for c, r in world.spec["policy"].items() if r != "us"]
    n = world.rows("us", "SELECT count(*) FROM users WHERE country_code = ANY(%s)", (moving,))[0][0]
    assert n > 0 and world.ctl("SELECT count(*) FROM migrator.shard_user")[0][0] == n
    orphans = (
        "SELECT count(*) FROM migrator.shard_user su "
        "WHERE NOT EXISTS (SELECT 1 FROM migrator.shard s WHERE s.shard_id = su.shard_id)"
    )
    assert world.ctl(orphans) == [(0,)]


def test_a_plan_killed_inside_its_transaction_leaves_nothing_and_reruns_whole(world: World):
    """`migrator plan` killed (SIGKILL) after writing the membership with its key checks
    skipped, before its commit: the control database holds no shard, member or directory
    row, and the next plan writes every moving user once, each in a shard that exists."""
    proc = start(world, "plan", env={"MIGRATOR_PAUSE_AT": "membership written", "MIGRATOR_PAUSE_S": "60"})
    deadline = time.monotonic() + 60
    while not world.ctl(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
        "AND state_change < now() - interval '1 second' AND pid <> pg_backend_pid() "
        "AND application_name = 'residency-migrator'"
    )[0][0]:
        assert proc.poll() is None and time.monotonic() < deadline, "the plan never paused in its transaction"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    counts = (
        "SELECT (SELECT count(*) FROM migrator.shard), (SELECT count(*) FROM migrator.shard_user), "
        "(SELECT count(*) FROM migrator.directory)"
    )
    deadline = time.monotonic() + 10  # the server sees its client gone and rolls the transaction back
    while world.ctl(counts) != [(0, 0, 0)]:
        assert time.monotonic() < deadline, "the killed plan's rows are still in the control database"
        time.sleep(0.1)
    res = world.migrator("plan")
    assert res.returncode == 0, res.stderr[-2000:]
    moving = [c for c, r in world.spec["policy"].items() if r != "us"]
    n = world.rows("us", "SELECT count(*) FROM users WHERE country_code = ANY(%s)", (moving,))[0][0]
    assert world.ctl("SELECT count(*), count(DISTINCT user_key) FROM migrator.shard_user") == [(n, n)]
    orphans = (
        "SELECT count(*) FROM migrator.shard_user su "
        "WHERE NOT EXISTS (SELECT 1 FROM migrator.shard s WHERE s.shard_id = su.shard_id)"
    )
    assert world.ctl(orphans) == [(0,)]
    res = world.migrator("run", "--region", "no")  # and the plan moves: nobody is stuck by the killed one
    assert res.returncode == 0, res.stderr[-2000:]
