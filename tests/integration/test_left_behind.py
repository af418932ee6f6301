"""A table the spec does not name, holding rows that point at users (a foreign key into the
graph), is never left behind in silence: plan refuses it, a shard in flight stops before
its cutover, a purge refuses before the point of no return, the audit finds it; an
`exclude` with a reason lets it through and the audit names it."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.conftest import World

pytestmark = pytest.mark.integration

TICKETS = """
CREATE TABLE support_tickets (
  ticket_id bigserial PRIMARY KEY,
  user_id bigint NOT NULL REFERENCES users(user_id),
  email text NOT NULL
);
INSERT INTO support_tickets (user_id, email) SELECT user_id, 'u' || user_id || '@example.org' FROM users;
"""
PURGE = {
    "after": "0s",
    "tables": {"users": {"pseudonymise": ["email", "display_name"]}, "devices": "delete"},
    "keys": {"ie": {"env": "TEST_PSEUDONYM_KEY_IE"}, "no": {"env": "TEST_PSEUDONYM_KEY_NO"}},
}


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("TEST_PSEUDONYM_KEY_IE", "ie-test-key-0123456789abcdef")
    monkeypatch.setenv("TEST_PSEUDONYM_KEY_NO", "no-test-key-0123456789abcdef")


def _add_tickets(world: World) -> None:
    """A child table of users at the source, one row per user, holding an e-mail address."""
    with psycopg.connect(world.dsn["us"]) as c:
        c.execute(TICKETS)


def _states(world: World) -> set[str]:
    return {s for (s,) in world.ctl("SELECT DISTINCT state FROM migrator.shard")}


def test_plan_refuses_a_table_the_spec_forgets_and_an_exclusion_with_a_reason_lets_it_through(world: World):
    _add_tickets(world)
    res = world.migrator("plan")
    assert res.returncode == 2, res.stderr
    assert "public.support_tickets" in res.stderr and "entity_graph.exclude" in res.stderr
    assert (
        world.ctl("SELECT to_regclass('migrator.shard')")[0][0] is None
        or not world.ctl("SELECT count(*) FROM migrator.shard")[0][0]
    )

    graph = world.spec["entity_graph"]
    graph["exclude"] = [{"table": "support_tickets", "reason": ""}]
    world.write_spec()
    res = world.migrator("plan")
    assert res.returncode == 2 and "needs a reason" in res.stderr, res.stderr

    graph["exclude"] = [{"table": "support_tickets", "reason": "kept by the help desk, under its own contract"}]
    world.write_spec()
    assert world.migrator("run").returncode == 0
    assert _states(world) == {"cut_over"}
    res = world.migrator("audit", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["excluded_tables"] == [
        {"table": "support_tickets", "reason": "kept by the help desk, under its own contract"}
    ]


def test_a_table_added_mid_move_stops_the_cutover_and_the_purge_and_the_audit_finds_it(world: World, keys):
    world.write_spec(purge=PURGE)
    for phase in ("plan", "copy", "verify"):
        assert world.migrator(phase).returncode == 0, phase
    _add_tickets(world)  # the application's schema grows while the shards are verified

    res = world.migrator("cutover")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "public.support_tickets" in res.stderr
    assert _states(world) == {"verified"}
    assert world.ctl("SELECT count(*) FROM migrator.directory WHERE home <> 'us'")[0][0] == 0

    # excluded for now: the shards cut over; then the exclusion is dropped again
    world.spec["entity_graph"]["exclude"] = [{"table": "support_tickets", "reason": "reviewed later"}]
    world.write_spec()
    assert world.migrator("cutover").returncode == 0
    assert _states(world) == {"cut_over"}
    world.spec["entity_graph"].pop("exclude")
    world.write_spec()

    res = world.migrator("purge")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "public.support_tickets" in res.stderr
    assert _states(world) == {"cut_over"}  # refused before the point of no return
    assert world.rows("us", "SELECT count(*) FROM support_tickets")[0][0] == 400

    res = world.migrator("audit", "--json")
    assert res.returncode != 0
    found = [f for f in json.loads(res.stdout)["findings"] if f["kind"] == "table left behind"]
    assert found and "public.support_tickets" in found[0]["detail"]


def test_an_excluded_table_that_would_block_the_purges_deletes_refuses_it_before_it_starts(world: World, keys):
    """Excluded with a reason, the tickets stay; but with a policy that deletes the users'
    rows at the source, their foreign key would make the deletes fail half-way: the purge
    refuses before the point of no return, naming the table and the key."""
    _add_tickets(world)
    world.spec["entity_graph"]["exclude"] = [{"table": "support_tickets", "reason": "the help desk's"}]
    world.write_spec(purge={**PURGE, "tables": {"devices": "delete"}})  # users: deleted (the default)
    assert world.migrator("run").returncode == 0
    res = world.migrator("purge", "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "public.support_tickets" in res.stdout and "support_tickets_user_id_fkey" in res.stdout
    assert _states(world) == {"cut_over"}  # nothing started
    moved = world.ctl("SELECT count(*) FROM migrator.shard_user")[0][0]
    assert world.rows("us", "SELECT count(*) FROM users")[0][0] == 400 and moved > 0
    # pseudonymised instead of deleted, the users' rows stay for the tickets to point at
    world.write_spec(purge=PURGE)
    res = world.migrator("purge", "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert _states(world) == {"purged"}
    assert world.rows("us", "SELECT count(*) FROM support_tickets")[0][0] == 400


def test_a_table_with_the_roots_key_but_no_foreign_key_is_named_as_a_warning(world: World):
    with psycopg.connect(world.dsn["us"]) as c:
        c.execute("CREATE TABLE newsletter (user_id bigint, address text)")  # no foreign key: only its name says
        c.execute("CREATE TABLE counters (user_id text, n int)")  # the key's name, another type
    res = world.migrator("plan", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    warnings = json.loads(res.stdout)["warnings"]
    named = [w for w in warnings if "public.newsletter" in w]
    assert len(named) == 1 and "entity_graph.exclude" in named[0] and "source us" in named[0]
    assert not [w for w in warnings if "counters" in w]
    world.spec["entity_graph"]["exclude"] = [{"table": "newsletter", "reason": "marketing's, by consent"}]
    world.write_spec()
    res = world.migrator("plan", "--wave", "second", "--json")
    assert res.returncode == 0 and not [w for w in json.loads(res.stdout)["warnings"] if "newsletter" in w]
