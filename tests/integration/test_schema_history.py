"""The migrator's own tables under a schema history: `migrator upgrade`, its `--sql` for a
DBA, stores written before the history existed upgraded in place mid-migration, and a
store from a newer version refused."""

from __future__ import annotations

import json
import re
import time

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from migrator.airflow import tasks
from migrator.schema import tables
from migrator.spec import load_spec
from tests.conftest import World
from tests.helpers import start, verified_region

pytestmark = pytest.mark.integration

HEADS = {"control": "control_0005", "capture": "capture_0003", "ledger": "ledger_0003"}
# where each history's tables live in the test world (control database on the US server)
WHERE = {"control": ["control"], "capture": ["us", "ie", "no"], "ledger": ["ie", "no"]}


def _dsn(world: World, store: str) -> str:
    return world.control if store == "control" else world.dsn[store]


def _version(world: World, store: str, history: str) -> str | None:
    with psycopg.connect(_dsn(world, store)) as c:
        if c.execute("SELECT to_regclass(%s)", (f"migrator.alembic_version_{history}",)).fetchone()[0] is None:
            return None
        return c.execute(f"SELECT version_num FROM migrator.alembic_version_{history}").fetchone()[0]


def _differences(dsn: str, metadata: sa.MetaData) -> list:
    """What alembic's autogenerate finds between the database and the declared tables."""
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    names = set(metadata.tables)
    try:
        with engine.connect() as conn:
            mc = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "compare_type": True,
                    "include_name": lambda name, kind, parent: (
                        name == "migrator" if kind == "schema" else kind != "table" or f"migrator.{name}" in names
                    ),
                },
            )
            return compare_metadata(mc, metadata)
    finally:
        engine.dispose()


def test_upgrade_brings_every_store_to_head_and_matches_the_declared_tables(world: World):
    res = world.migrator("upgrade", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {(s["store"], s["history"]) for s in doc["stores"]} == {
        ("control database", "control"),
        ("source us", "capture"),
        ("destination ie", "capture"),
        ("destination ie", "ledger"),
        ("destination no", "capture"),
        ("destination no", "ledger"),
    }
    assert all(s["upgraded"] and s["from"] is None for s in doc["stores"])
    for history, stores in WHERE.items():
        for store in stores:
            assert _version(world, store, history) == HEADS[history], (store, history)
    declared = {"control": tables.control, "capture": tables.capture, "ledger": tables.ledger}
    assert _differences(world.control, declared["control"]) == []
    assert _differences(world.dsn["us"], declared["capture"]) == []
    assert _differences(world.dsn["ie"], declared["ledger"]) == []
    assert world.ctl("SELECT reloptions FROM pg_class WHERE oid = 'migrator.directory'::regclass") == [
        (["fillfactor=45"],)
    ]
    again = json.loads(world.migrator("upgrade", "--json").stdout)
    assert not any(s["upgraded"] for s in again["stores"])


def _paused_in_transaction(dsn: str) -> bool:
    """A session holding an advisory lock and the exclusive locks of tables it has created
    in its open transaction, idle in it for over a second (no upgrade pauses that long
    between two statements of its own)."""
    with psycopg.connect(dsn) as c:
        return bool(
            c.execute(
                "SELECT count(*) FROM pg_stat_activity a WHERE a.state = 'idle in transaction' "
                "AND a.state_change < now() - interval '1 second' AND a.pid <> pg_backend_pid() "
                "AND EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory') "
                "AND EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'relation' "
                "            AND l.mode = 'AccessExclusiveLock')"
            ).fetchone()[0]
        )


def test_an_upgrade_killed_between_two_revisions_leaves_the_store_as_it_was(world: World):
    """`migrator upgrade` killed (SIGKILL) after the control history's first revision and
    before its second, inside the one transaction: the control database has nothing of
    the migrator's (no schema, no version), and the next upgrade brings it to head."""
    proc = start(world, "upgrade", env={"MIGRATOR_PAUSE_AT": "upgraded control_0001", "MIGRATOR_PAUSE_S": "60"})
    deadline = time.monotonic() + 60
    while not _paused_in_transaction(world.control):
        assert proc.poll() is None and time.monotonic() < deadline, "the upgrade never paused after control_0001"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10  # the server sees its client gone and rolls the transaction back
    while _version(world, "control", "control") is not None or world.ctl("SELECT to_regnamespace('migrator')")[0][0]:
        assert time.monotonic() < deadline, "the killed upgrade's work is still in the control database"
        time.sleep(0.1)
    res = world.migrator("upgrade", "--json")
    assert res.returncode == 0, res.stderr
    ((store,),) = [[s] for s in json.loads(res.stdout)["stores"] if s["history"] == "control"]
    assert store["from"] is None and store["upgraded"]
    assert _version(world, "control", "control") == HEADS["control"]
    assert _differences(world.control, tables.control) == []


def test_upgrade_sql_applied_by_hand_leaves_nothing_to_do(world: World, tmp_path):
    unreachable = dict(world.spec)
    unreachable["regions"] = {r: {"dsn": f"host=127.0.0.1 port=1 dbname=app_{r}"} for r in world.dsn}
    unreachable["control"] = {"dsn": "host=127.0.0.1 port=1 dbname=control"}
    path = tmp_path / "unreachable.yaml"
    path.write_text(json.dumps(unreachable))
    res = world.migrator("upgrade", "--sql", "--config", str(path))
    assert res.returncode == 0, res.stderr
    parts = dict(re.findall(r"^-- (\w+) tables, for: .*?\n(.*?)(?=^-- \w+ tables, for: |\Z)", res.stdout, re.S | re.M))
    assert set(parts) == {"control", "capture", "ledger"}
    assert "CREATE TABLE IF NOT EXISTS migrator.shard " in parts["control"]
    assert "alembic_version_ledger" in parts["ledger"]
    for history, stores in WHERE.items():  # what a DBA would do with psql
        for store in stores:
            with psycopg.connect(_dsn(world, store), autocommit=True) as c:
                c.execute(parts[history])
    doc = json.loads(world.migrator("upgrade", "--json").stdout)
    assert not any(s["upgraded"] for s in doc["stores"]), doc
    assert world.migrator("plan").returncode == 0
    assert world.migrator("copy", "--region", "ie").returncode == 0


def test_stores_from_before_the_history_upgrade_in_place_mid_migration(world: World):
    """A region copied and verified, then every store put back in the layout the tool wrote
    before it kept a history (no version tables, a state version row, positions without a
    horizon, a change log without transaction ids, a directory without its fillfactor),
    then a change: the upgraded migrator cuts the region over with the change at home."""
    uid = verified_region(world, "ie")
    for history, stores in WHERE.items():
        for store in stores:
            with psycopg.connect(_dsn(world, store)) as c:
                c.execute(f"DROP TABLE IF EXISTS migrator.alembic_version_{history}")
    with psycopg.connect(world.dsn["us"]) as c:
        c.execute("DROP INDEX migrator.changes_horizon")
        c.execute("ALTER TABLE migrator.changes DROP COLUMN xid")
        c.execute("CREATE INDEX changes_shard ON migrator.changes (shard_id, id)")
    with psycopg.connect(world.control) as c:
        c.execute("ALTER TABLE migrator.capture_pos DROP COLUMN horizon")
        c.execute("ALTER TABLE migrator.directory RESET (fillfactor)")
        c.execute("INSERT INTO migrator.meta VALUES ('state_version', '1')")
        c.execute("DROP INDEX migrator.audit_seq, migrator.audit_unsealed")
        c.execute(
            "ALTER TABLE migrator.audit DROP COLUMN xid, DROP COLUMN seq, DROP COLUMN content, "
            "DROP COLUMN prev_sha256, DROP COLUMN sha256"
        )
    world.rows("us", "UPDATE users SET email = 'logged-by-old@example.test' WHERE user_id = %s RETURNING 1", (uid,))
    doc = json.loads(world.migrator("status", "--json").stdout)
    assert sum(s["lag"] or 0 for s in doc["shards"] if s["region"] == "ie") >= 1
    res = world.migrator("cutover", "--region", "ie", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    assert world.rows("ie", "SELECT email FROM users WHERE user_id = %s", (uid,)) == [("logged-by-old@example.test",)]
    assert world.rows(
        "us", "SELECT indexname FROM pg_indexes WHERE schemaname = 'migrator' AND tablename = 'changes' ORDER BY 1"
    ) == [("changes_horizon",), ("changes_pkey",)]
    assert _version(world, "control", "control") == HEADS["control"]
    assert _version(world, "us", "capture") == HEADS["capture"]
    assert _version(world, "ie", "ledger") == HEADS["ledger"]  # the cutover kept the audit chain's head there
    doc = json.loads(world.migrator("upgrade", "--json").stdout)
    # every audit row, those written before the chain existed first, is in the chain now
    assert world.ctl("SELECT count(*) FILTER (WHERE seq IS NULL), count(*) FROM migrator.audit")[0][0] == 0
    assert (
        world.ctl("SELECT min(seq), max(seq), count(*) FROM migrator.audit")[0][1:]
        == (world.ctl("SELECT count(*), count(*) FROM migrator.audit")[0])
    )
    assert [(s["store"], s["history"]) for s in doc["stores"] if s["upgraded"]] == [
        ("destination no", "capture"),  # nothing was moved there yet
        ("destination no", "ledger"),
    ]
    assert _version(world, "ie", "ledger") == HEADS["ledger"]
    assert world.ctl("SELECT count(*) FROM migrator.meta WHERE key = 'state_version'") == [(0,)]
    assert world.ctl("SELECT reloptions FROM pg_class WHERE oid = 'migrator.directory'::regclass") == [
        (["fillfactor=45"],)
    ]
    assert _differences(world.control, tables.control) == []


def test_a_store_at_a_revision_from_a_newer_version_is_refused(world: World):
    assert world.migrator("plan").returncode == 0
    with psycopg.connect(world.control) as c:
        c.execute("UPDATE migrator.alembic_version_control SET version_num = 'control_9999'")
    res = world.migrator("copy", "--region", "ie")
    assert res.returncode == 2, res.stderr
    assert "control database" in res.stderr and "control_9999" in res.stderr
    assert world.ctl("SELECT count(*) FROM migrator.checkpoint") == [(0,)]


STATE_KEPT = "shard_id, state, state_since, finalized_at, rollback_reason, last_verify, approval"


def test_a_control_database_from_before_the_shard_state_columns_gets_them_from_its_audit(world: World):
    """A migration under way when the state machine kept only the state: an approved and
    cleaned-up cutover, a rolled-back cutover with its reason, shards verified and not cut
    over. Put back at control_0002 (without the columns), the upgrade fills each column from
    the audit rows exactly as the running tool had kept it."""
    world.write_spec(sharding={"shards_per_region": 2})
    verified_region(world, "ie")
    spec = load_spec(world.spec_path)
    approved, rolled = "default/ie-00", "default/ie-01"
    for sid in (approved, rolled):
        assert tasks.answer_cutover(spec, "r1", sid, True, "alice", "")["state"] == "cut_over"
    assert world.migrator("cleanup", "--shard", "ie-00").returncode == 0
    assert world.migrator("rollback", "--shard", "ie-01", "--reason", "ticket 7").returncode == 0
    assert world.migrator("copy", "--region", "no").returncode == 0
    kept = world.ctl(f"SELECT {STATE_KEPT} FROM migrator.shard ORDER BY shard_id")
    by_id = {r[0]: r for r in kept}
    assert by_id[approved][3] is not None and by_id[rolled][4] == "ticket 7"
    assert by_id[approved][6]["by"] == "alice" and by_id[approved][5]["matched"] is True
    with psycopg.connect(world.control) as c:
        c.execute(
            "ALTER TABLE migrator.shard DROP COLUMN state_since, DROP COLUMN finalized_at, "
            "DROP COLUMN rollback_reason, DROP COLUMN last_verify, DROP COLUMN approval"
        )
        c.execute("UPDATE migrator.alembic_version_control SET version_num = 'control_0002'")
    res = world.migrator("upgrade", "--json")
    assert res.returncode == 0, res.stderr
    assert _version(world, "control", "control") == HEADS["control"]
    after = world.ctl(f"SELECT {STATE_KEPT} FROM migrator.shard ORDER BY shard_id")
    for was, now in zip(kept, after, strict=True):
        for column, a, b in zip(STATE_KEPT.split(", "), was, now, strict=True):
            assert a == b, (was[0], column, a, b)
    assert _differences(world.control, tables.control) == []
    # and what the shards then do: the cleaned-up one is refused a rollback, the others are not
    res = world.migrator("rollback", "--shard", "ie-00", "--reason", "after cleanup")
    assert res.returncode == 1 and "finalized" in res.stdout + res.stderr


def test_an_upgrade_sent_in_one_message_to_a_store_another_process_upgraded_first_does_nothing(world: World):
    """The regions' histories go to their store as one message rendered from the revision
    read before; when another process upgraded the store between that read and the
    message's lock, the message changes nothing (its check under the lock refuses it) and
    the upgrade finishes the ordinary way: one version row, at head, the tables whole."""
    from migrator.schema import history

    dsn = _dsn(world, "ie")
    assert _version(world, "ie", "ledger") is None
    assert history.upgrade(dsn, history.LEDGER, None) == ["ledger_0001", "ledger_0002", "ledger_0003"]
    assert _version(world, "ie", "ledger") == HEADS["ledger"]
    # a process that read "nothing there" before the first one upgraded, sending its message now
    assert history.upgrade(dsn, history.LEDGER, None) == []
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT version_num FROM migrator.alembic_version_ledger").fetchall() == [(HEADS["ledger"],)]
    assert _differences(dsn, tables.ledger) == []
    # the message's own check, sent as it is: refused with the history's code, nothing written
    with psycopg.connect(dsn, autocommit=True) as c, pytest.raises(psycopg.Error) as raised:
        c.execute(history.sql(history.LEDGER, None, expect=True))
    assert raised.value.sqlstate == history.MOVED_ON
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*) FROM migrator.alembic_version_ledger").fetchone() == (1,)
