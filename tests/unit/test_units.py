"""Pure logic: spec validation, partitioning, state transitions, masking. No servers."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator import partition
from migrator.control.state import TRANSITIONS, State, allowed
from migrator.errors import SpecError
from migrator.spec import load_spec, mask_dsn, parse_spec
from migrator.stores import is_transient

BASE = {
    "regions": {"us": {"dsn": "postgresql://app:s3cret@db-us/app"}, "ie": {"dsn": "postgresql://x@db-ie/app"}},
    "control": {"dsn": "postgresql://app:s3cret@db-us/control"},
    "policy": {"IE": "ie", "US": "us"},
    "entity_graph": {
        "root": {"table": "users", "key": "user_id", "residency": "cc"},
        "tables": [
            {"table": "videos", "parent": "users", "fk": {"user_id": "user_id"}},
            {"table": "comments", "parent": "videos", "fk": {"video_id": "video_id"}},
        ],
    },
}


def spec_with(mutate):
    d = copy.deepcopy(BASE)
    mutate(d)
    return d


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["policy"].update({"Ireland": "ie"}), "policy: country code 'Ireland' is not ISO 3166-1 alpha-2"),
        (lambda d: d["policy"].update({"DE": "de"}), "region 'de' is not among the regions"),
        (lambda d: d.update(source_region="eu"), "source_region 'eu' is not among the regions"),
        (lambda d: d["entity_graph"]["root"].pop("key"), "entity_graph.root.key: Field required"),
        (lambda d: d["entity_graph"]["tables"][1].update(parent="posts"), "parent 'posts' is not in the entity graph"),
        (
            lambda d: (
                d["entity_graph"]["tables"].append({"table": "a", "parent": "b", "fk": {"x": "y"}})
                or d["entity_graph"]["tables"].append({"table": "b", "parent": "a", "fk": {"x": "y"}})
            ),
            "loops",
        ),
        (lambda d: d["entity_graph"]["root"].update(table="users; drop"), "not a plain SQL identifier"),
        (lambda d: d.update(shards=3), "shards: Extra inputs are not permitted"),
        (lambda d: d["regions"]["us"].update(dsn="${NOT_SET_ANYWHERE_123}"), "NOT_SET_ANYWHERE_123 is not set"),
    ],
)
def test_spec_errors_name_the_field(mutate, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(spec_with(mutate))
    assert needle in str(e.value)
    assert "s3cret" not in str(e.value)


def test_spec_reads_env_and_masks_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("US_DSN", "postgresql://app:hunter2@db/app")
    d = spec_with(lambda d: d["regions"]["us"].update(dsn="${US_DSN}"))
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    spec = load_spec(p)
    assert spec.regions["us"].url == "postgresql://app:hunter2@db/app"
    for text in (repr(spec), repr(spec.regions["us"]), str(spec.model_dump()), spec.regions["us"].masked):
        assert "hunter2" not in text
    assert spec.entity_graph.path("comments")[-1].parent == "users"
    assert spec.entity_graph.ordered() == ["users", "videos", "comments"]
    assert spec.region_of(" ie") == "ie" and spec.region_of(None) is None and spec.region_of("ZZ") is None


def test_bad_files():
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("/nonexistent/spec.yaml")


def test_mask_dsn_forms():
    assert mask_dsn("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert "pw" not in mask_dsn("host=h user=u password=pw dbname=d")


@given(st.text(min_size=1, max_size=40), st.integers(1, 64))
def test_shard_index_is_stable_and_in_range(key, n):
    i = partition.shard_index(key, n)
    assert 0 <= i < n
    assert i == partition.shard_index(key, n)


@settings(max_examples=20)
@given(st.integers(2, 16))
def test_shards_are_roughly_even(n):
    counts = [0] * n
    for k in range(4000):
        counts[partition.shard_index(str(k), n)] += 1
    assert min(counts) > 4000 / n * 0.7


def test_rollback_reachable_from_every_phase_but_done_and_purge():
    for p in State:
        if p not in (State.ROLLED_BACK, State.PURGING, State.PURGED):
            assert allowed(p, State.ROLLING_BACK), p
        else:  # a purge is the point of no return
            assert not allowed(p, State.ROLLING_BACK), p
    assert TRANSITIONS[State.PURGED] == frozenset()
    assert {k for k, v in TRANSITIONS.items() if State.PURGING in v} == {State.CUT_OVER, State.PURGING}
    assert not allowed(State.CUT_OVER, State.COPYING)
    assert not allowed(State.PLANNED, State.CUT_OVER)
    assert all(State.CUT_OVER not in v for k, v in TRANSITIONS.items() if k != State.VERIFIED)


def test_error_classification():
    import psycopg
    from psycopg import errors as pge

    assert is_transient(psycopg.OperationalError("connection refused"))
    assert is_transient(pge.SerializationFailure())
    assert not is_transient(pge.UniqueViolation())
    assert not is_transient(SpecError("x"))


@pytest.mark.parametrize(
    "objects, needle",
    [
        (
            {"stores": {"us": {"bucket": "media-us"}, "ie": {"bucket": "media-ie"}}},
            "give key_column and/or user_prefix",
        ),
        (
            {"user_prefix": "users/", "stores": {"us": {"bucket": "media-us"}, "ie": {"bucket": "media-ie"}}},
            "must contain {user}",
        ),
        ({"user_prefix": "u/{user}/", "stores": {"us": {"bucket": "media-us"}}}, "no store for region 'ie'"),
        (
            {"user_prefix": "u/{user}/", "stores": {"us": {"bucket": "Bad_Bucket"}, "ie": {"bucket": "media-ie"}}},
            "not a valid S3 bucket name",
        ),
        (
            {
                "key_column": {"table": "posts", "column": "k"},
                "stores": {"us": {"bucket": "media-us"}, "ie": {"bucket": "media-ie"}},
            },
            "table 'posts' is not in the entity graph",
        ),
    ],
)
def test_object_spec_errors(objects, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(spec_with(lambda d: d.update(objects=objects)))
    assert needle in str(e.value)


def test_object_secrets_masked(monkeypatch):
    monkeypatch.setenv("S3_SECRET", "very-secret-key")
    spec = parse_spec(
        spec_with(
            lambda d: d.update(
                objects={
                    "user_prefix": "u/{user}/",
                    "stores": {
                        "us": {"bucket": "media-us", "access_key": "AK", "secret_key": "${S3_SECRET}"},
                        "ie": {"bucket": "media-ie"},
                    },
                }
            )
        )
    )
    assert spec.objects.stores["us"].secret_key.get_secret_value() == "very-secret-key"
    assert "very-secret-key" not in repr(spec.objects) + str(spec.model_dump())


def test_orchestrator_connections_fill_the_spec(tmp_path):
    from migrator.airflow.tasks import load

    d = spec_with(
        lambda d: d.update(
            objects={
                "user_prefix": "u/{user}/",
                "stores": {"us": {"bucket": "media-us", "endpoint": "conn:s3_us"}, "ie": {"bucket": "media-ie"}},
            }
        )
    )
    d["regions"]["ie"]["dsn"] = "conn:pg_ie"
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    spec = load(
        str(p),
        resolve_conn=lambda i: f"postgresql://u:pw@{i}/db",
        resolve_s3=lambda i: {"endpoint": f"http://{i}:9000", "access_key": "AK", "secret_key": "SK"},
        batch_users=7,
    )
    assert spec.regions["ie"].url == "postgresql://u:pw@pg_ie/db"
    assert spec.objects.stores["us"].endpoint == "http://s3_us:9000"
    assert spec.objects.stores["us"].secret_key.get_secret_value() == "SK"
    assert spec.copy_.batch_users == 7


def test_verify_takes_the_costliest_tables_first():
    from migrator.control.context import Context
    from migrator.shard.digest import largest_first

    ctx = Context(
        parse_spec(
            spec_with(
                lambda d: d["entity_graph"]["tables"].append(
                    {"table": "logins", "parent": "users", "fk": {"user_id": "user_id"}}
                )
            )
        )
    )
    rows = {"users": 100, "videos": 300, "comments": 200, "logins": 350}
    # comments are reached through videos: a join more per row than logins
    assert largest_first(ctx, list(rows), rows) == ["comments", "logins", "videos", "users"]
    assert sorted(largest_first(ctx, list(rows), {})) == sorted(rows)  # unknown sizes: every table still once


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(128, 65536))
def test_verify_hash_memory_is_bounded_and_grows_with_the_shard(a, b, cap):
    from migrator.stores.sqlgen import HASH_ENTRY_BYTES, MIN_HASH_MB, hash_mb

    small, large = sorted((a, b))
    assert MIN_HASH_MB <= hash_mb(small, cap) <= hash_mb(large, cap) <= max(cap, MIN_HASH_MB)
    if large * HASH_ENTRY_BYTES <= cap * 2**20 * 0.8:  # within the cap: room for every entry
        assert hash_mb(large, cap) * 2**20 >= large * HASH_ENTRY_BYTES


def test_describe_names_an_s3_error_by_code_and_call_never_by_its_message():
    from botocore.exceptions import ClientError

    from migrator.errors import describe

    exc = ClientError({"Error": {"Code": "NoSuchKey", "Message": "users/42/diary.txt: private words"}}, "GetObject")
    said = describe(exc)
    assert "NoSuchKey" in said and "GetObject" in said and "private" not in said and "42" not in said
    assert not is_transient(exc)
    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    assert "SlowDown" in describe(slow) and "PutObject" in describe(slow) and is_transient(slow)


def test_describe_names_an_unreachable_s3_endpoint():
    from botocore.exceptions import EndpointConnectionError

    from migrator.errors import describe

    exc = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/media-ie/users/7/a.jpg")
    assert "S3 endpoint http://127.0.0.1:9" in describe(exc) and "EndpointConnectionError" in describe(exc)
    assert is_transient(exc)


def test_dispatch_refusals_name_the_state_and_the_next_step():
    from migrator.control.state import State
    from migrator.lifecycle.gate import RUNS, Verdict, decide

    for phase in RUNS:
        for state in State:
            d = decide(state, phase)
            assert d.verdict in Verdict
            if d.verdict == Verdict.REFUSE:
                assert str(state) in d.why and "next:" in d.why


def test_each_history_declares_its_script_directorys_head():
    """The head each history declares (the one read a store's check costs) is the newest
    revision Alembic finds in its script directory."""
    from migrator.schema import history

    for h in history.HISTORIES.values():
        assert h.head == history.script_head(h), h.name
        assert history.revisions(h)[-1] == h.head


def test_a_task_process_imports_no_alembic():
    """What an Airflow task or a command imports to run a phase leaves Alembic and SQLAlchemy
    (half a second of every process's start) for an upgrade."""
    import subprocess
    import sys

    code = (
        "import sys, migrator.airflow.tasks, migrator.cli.main, migrator.airflow.glue; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'alembic', 'sqlalchemy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_airflow_home_preloads_what_tasks_import_and_airflow_starts_with_it(tmp_path):
    """The Airflow home the demo, tests and bench set up (and docker-compose.yml mounts) has
    an airflow_local_settings that imports what every task imports (the migrator's library,
    and Airflow's task decorators and approval operator, which parsing the DAG file needs),
    so the scheduler or worker that forks a task has it already. Airflow imports the file
    while it initialises: Airflow, started in that home, must come up with all of it."""
    import subprocess
    import sys

    from migrator.demo.airflow_run import airflow_env
    from tests.conftest import ROOT

    env = airflow_env(tmp_path, {})
    settings = tmp_path / "config" / "airflow_local_settings.py"
    assert env["AIRFLOW_HOME"] == str(tmp_path) and settings.is_file()
    preloaded = [
        "airflow.sdk.definitions.decorators",
        "airflow.providers.standard.operators.hitl",
        "migrator.airflow.approval",
        "migrator.airflow.tasks",
    ]
    code = (
        "import json, sys, airflow; "  # Airflow's own start: settings, then the home's local settings
        "print(json.dumps({'file': sys.modules['airflow_local_settings'].__file__, "
        f"'loaded': [m for m in {preloaded!r} if m in sys.modules]}}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"file": str(settings), "loaded": preloaded}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["airflow-scheduler"]["volumes"]
    source = next(m.split(":")[0] for m in mounts if ":/opt/airflow/config/airflow_local_settings.py" in m)
    assert (ROOT / source).read_text() == settings.read_text()


def test_an_unreachable_s3_endpoint_is_named_without_the_requests_key_or_prefix():
    from botocore.exceptions import EndpointConnectionError

    from migrator.errors import describe

    for url in (
        "http://127.0.0.1:5041/media-us?list-type=2&prefix=users%2F141%2F",
        "http://127.0.0.1:5041/media-us/users/141/avatar.png",
    ):
        said = describe(EndpointConnectionError(endpoint_url=url))
        assert said == "S3 endpoint http://127.0.0.1:5041/media-us cannot be reached (EndpointConnectionError)"


def test_a_phases_result_reads_as_one_line_in_the_task_log():
    from migrator.airflow.tasks import summary

    verified = {
        "shard_id": "w/ie-00",
        "phase": "verify",
        "state": "verified",
        "ran": True,
        "digest": "0123456789abcdef0123",
        "rows": {"videos": 30, "users": 10},
    }
    assert (
        summary(verified) == "shard w/ie-00: verify done; state verified; rows users 10, videos 30; digest 0123456789ab"
    )
    skipped = {"shard_id": "w/ie-00", "phase": "copy", "state": "verified", "ran": False, "skipped": "already copied"}
    assert summary(skipped) == "shard w/ie-00: copy skipped (already copied); state verified"


def test_a_record_of_processing_names_only_where_the_waves_shards_moved():
    from migrator.evidence.report import write_records

    spec = parse_spec(
        {
            **copy.deepcopy(BASE),
            "regions": {**BASE["regions"], "no": {"dsn": "postgresql://x@db-no/app"}},
            "policy": {"IE": "ie", "NO": "no", "US": "us"},
        }
    )

    def moved(sid: str, region: str, event: str) -> dict:
        return {"at": "2026-12-01T00:00:00+00:00", "shard_id": sid, "region": region, "users": 1, "event": event}

    doc = {
        "ok": True,
        "findings": [],
        "waves": {"w": {"shards": 4, "first": "2026-12-01T00:00:00+00:00", "last": "2026-12-01T00:00:00+00:00"}},
        "timeline": [
            moved("w/no-00", "no", "cut_over"),
            moved("w/ie-00", "ie", "cut_over"),
            moved("w/ie-01", "ie", "cut_over"),
            moved("w/ie-00", "ie", "rolled_back"),
        ],
    }
    import tempfile
    from pathlib import Path

    (path,) = write_records(doc, spec, Path(tempfile.mkdtemp()))
    text = path.read_text()
    assert "- Transfer: from region us to ie (residents of IE); no (residents of NO)" in text
    assert "2 of the wave's 4 shard(s) moved" in text
    doc["timeline"] = [moved("w/ie-00", "ie", "cut_over")]
    (path,) = write_records(doc, spec, path.parent)
    assert "to ie (residents of IE)\n" in path.read_text() and "no (" not in path.read_text()
    # a move again names its own origin
    doc["timeline"] = [moved("w/ie-00", "ie", "cut_over"), {**moved("w/ie-no-00", "no", "cut_over"), "from": "ie"}]
    (path,) = write_records(doc, spec, path.parent)
    assert "- Transfer: from region us to ie (residents of IE); from region ie to no (residents of NO)" in (
        path.read_text()
    )
