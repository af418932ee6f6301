"""Bad input gets a clear error naming the problem, and nothing is written or lost."""

from __future__ import annotations

import copy
import json

import psycopg
import pytest
import yaml

from tests.conftest import DEMO_OWNED, World
from tests.helpers import cut_when

pytestmark = pytest.mark.integration


def nothing_written(w: World) -> None:
    for r in ("ie", "no"):
        for t in DEMO_OWNED:
            assert w.rows(r, f"SELECT count(*) FROM {t}")[0][0] == 0
    shards = w.ctl("SELECT to_regclass('migrator.shard')")[0][0]
    if shards:
        assert w.ctl("SELECT count(*) FROM migrator.checkpoint")[0][0] == 0


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            lambda s: s["entity_graph"]["tables"].append(
                {"table": "nope", "parent": "users", "fk": {"user_id": "user_id"}}
            ),
            "table public.nope does not exist",
        ),
        (lambda s: s["entity_graph"]["root"].update(residency="country"), "column users.country does not exist"),
        (
            lambda s: s["entity_graph"]["tables"][0]["fk"].update({"user_id": "uid"}),
            "fk column users.uid does not exist",
        ),
        (
            lambda s: s["entity_graph"]["tables"][1].update(parent="users", fk={"author_id": "user_id"}),
            "comments's fk (comments.author_id -> users.user_id) is not a foreign key the database declares",
        ),
        (
            lambda s: s["entity_graph"]["tables"][3].update(fk={"device_no": "user_id"}),
            "fk devices.device_no is integer but users.user_id is bigint",
        ),
    ],
)
def test_unknown_table_or_column_fails_before_any_write(world: World, change, needle):
    """A spec problem found against the databases exits 2, like one in the file."""
    change(world.spec)
    world.write_spec()
    res = world.migrator("run")
    assert res.returncode == 2
    assert needle in res.stderr
    nothing_written(world)


def test_spec_errors_exit_2_and_name_the_field(world: World):
    world.spec["policy"]["germany"] = "ie"
    world.write_spec()
    res = world.migrator("run")
    assert res.returncode == 2
    assert "policy" in res.stderr and "germany" in res.stderr
    nothing_written(world)


def test_destination_schema_differs(world: World):
    with psycopg.connect(world.dsn["no"]) as c:
        c.execute("ALTER TABLE devices ALTER COLUMN model TYPE varchar(40)")
    res = world.migrator("run")
    assert res.returncode == 2  # a spec problem against a database, found before anything is written
    assert "destination no: table devices column model" in res.stderr
    nothing_written(world)


def test_rows_not_written_by_the_tool_are_a_conflict(world: World):
    # a user bound for ie already has a row there that this tool did not write
    uid, email = world.rows("us", "SELECT user_id, email FROM users WHERE country_code = 'DE' ORDER BY 1 LIMIT 1")[0]
    world.rows("ie", "INSERT INTO users VALUES (%s, %s, NULL, 'DE', now(), NULL) RETURNING 1", (uid, email))
    res = world.migrator("run", "--region", "ie", "--json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    errors = " ".join(s.get("error") or "" for s in doc["shards"])
    assert "already has rows" in errors and f"'user_id': '{uid}'" in errors
    assert email not in res.stdout + res.stderr
    # rollback of the failed shard leaves the foreign row alone
    failed = [s["name"] for s in doc["shards"] if s["state"] == "failed"]
    assert world.migrator("rollback", *sum((["--shard", f] for f in failed), [])).returncode == 0
    assert world.rows("ie", "SELECT count(*) FROM users WHERE user_id = %s", (uid,))[0][0] == 1


def test_destination_server_lost_mid_copy_then_resumed(world: World):
    world.write_spec(copy={"batch_users": 4}, sharding={"shards_per_region": 1})
    assert world.migrator("plan", "--region", "ie").returncode == 0
    server = world.cluster["ie"]

    try:
        with cut_when(world, "SELECT count(*) FROM migrator.checkpoint", 2, server.kill, timeout=60):
            res = world.migrator("copy", "--region", "ie", "--json")
    finally:
        server.start()
    assert res.returncode == 1
    shard = json.loads(res.stdout)["shards"][0]
    assert shard["state"] == "copying"  # a lost server is transient: resumable, never failed
    assert (
        world.ctl(
            "SELECT count(*) FROM migrator.audit WHERE detail->>'event' = 'copy interrupted' "
            "AND detail->>'resumable' = 'true'"
        )[0][0]
        >= 1
    )
    kept = world.ctl("SELECT count(*) FROM migrator.checkpoint")[0][0]
    assert 2 <= kept < shard["batches"]
    # status shows what stopped it, naming the store, while the shard waits to resume
    (status,) = json.loads(world.migrator("status", "--region", "ie", "--json").stdout)["shards"]
    assert status["state"] == "copying" and "region ie" in (status["error"] or ""), status
    res = world.migrator("run", "--region", "ie", "--json")
    assert res.returncode == 0, res.stdout[-1500:]
    (status,) = json.loads(world.migrator("status", "--region", "ie", "--json").stdout)["shards"]
    assert status["state"] == "cut_over" and status["error"] is None, status  # over once a step succeeds
    audit = world.ctl("SELECT count(*) FROM migrator.checkpoint")[0][0]
    assert audit == shard["batches"]
    ids = [
        r[0]
        for r in world.rows(
            "us", "SELECT user_id FROM users WHERE country_code IN ('IE','DE','FR','IT','ES','NL','PL','PT','AT','BE')"
        )
    ]
    for table, q in DEMO_OWNED.items():
        assert world.rows("us", q, (ids,)) == world.rows("ie", q, (ids,)), table


SECRET = "s3cr3t-PASSWORD-9f7e"


def test_the_command_line_exits_2_without_the_password(world):
    spec = copy.deepcopy(world.spec)
    spec["regions"]["ie"] = f"postgresql://app:{SECRET}@127.0.0.1:1/app"
    world.spec_path.write_text(yaml.safe_dump(spec))
    for cmd in ("plan", "run", "status"):
        res = world.migrator(cmd, "--json")
        assert res.returncode == 2, (cmd, res.stdout, res.stderr)
        assert "regions.ie" in res.stderr and SECRET not in res.stdout + res.stderr


def _dsn(world: World, region: str, change) -> dict:
    spec = copy.deepcopy(world.spec)
    spec["regions"][region]["dsn"] = change(world.dsn[region])
    return spec


def _control(world: World, change) -> dict:
    spec = copy.deepcopy(world.spec)
    spec["control"]["dsn"] = change(world.control)
    return spec


# (what is wrong, the spec or file it makes, the command, the words the answer must hold)
ANSWERS = [
    (
        "a database that does not exist",
        lambda w: _dsn(w, "ie", lambda d: d.rsplit("/", 1)[0] + "/nosuchdb"),
        ["plan"],
        ["region ie", "the database does not exist"],
    ),
    (
        "a role that does not exist",
        lambda w: _dsn(w, "no", lambda d: d.replace("postgres@", "nosuchrole@")),
        ["plan"],
        ["region no", "the role does not exist"],
    ),
    (
        "a DSN parameter libpq does not know",
        lambda w: _dsn(w, "ie", lambda d: d + "?foo=bar"),
        ["plan"],
        ["region ie", "(foo)"],
    ),
    (
        "a port that is not a number",
        lambda w: _dsn(w, "ie", lambda d: d.replace("127.0.0.1:", "127.0.0.1:x")),
        ["plan"],
        ["region ie", "port is not a number"],
    ),
    (
        "an sslmode libpq does not know",
        lambda w: _dsn(w, "no", lambda d: d + "?sslmode=bogus"),
        ["plan"],
        ["region no", "sslmode"],
    ),
    (
        "the control database's DSN with an unknown parameter",
        lambda w: _control(w, lambda d: d + "?foo=bar"),
        ["status"],
        ["control database", "(foo)"],
    ),
    ("a binary spec file", lambda w: b"\x89PNG\r\n\x1a\n\x00\xff", ["plan"], ["spec.yaml", "not a text file"]),
    ("a shard name that matches nothing", lambda w: w.spec, ["run", "--shard", "ie-99"], ["no shard named ie-99"]),
    (
        "status of a shard that does not exist",
        lambda w: w.spec,
        ["status", "--shard", "no-42"],
        ["no shard named no-42"],
    ),
    (
        "--since after --until",
        lambda w: w.spec,
        ["plan", "--since", "2026-02-01", "--until", "2026-01-01"],
        ["--since", "is not before --until"],
    ),
    (
        "a pseudonymise rule on a timestamp column",
        lambda w: {**w.spec, "purge": {"after": "0s", "tables": {"users": {"pseudonymise": ["email", "created_at"]}}}},
        ["plan"],
        ["purge.tables.users.created_at", "cannot be pseudonymised"],
    ),
]


@pytest.mark.parametrize("what, make, args, words", ANSWERS, ids=[a[0] for a in ANSWERS])
def test_the_command_lines_answer_to_bad_input(world: World, what, make, args, words):
    made = make(world)
    if isinstance(made, bytes):
        world.spec_path.write_bytes(made)
    else:
        world.spec_path.write_text(yaml.safe_dump(made))
    res = world.migrator(*args)
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 2, (what, out[-2000:])
    for w in words:
        assert w in out, (what, w, out[-2000:])
    assert "Traceback" not in out
    nothing_written(world)
