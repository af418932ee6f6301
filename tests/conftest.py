"""Real PostgreSQL servers, one per data center, started once per test session; every test
gets databases of its own on them, so tests never see each other's rows."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml

from migrator import hooks
from migrator.demo import seed
from migrator.demo.embedded import Cluster
from tests import pauses

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()

# Every process the tests start (commands, Airflow's, workers) takes the tests' pause points.
os.environ[hooks.ENV] = pauses.HOOK
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def cluster():
    c = Cluster(["us", "ie", "no"]).start()
    yield c
    c.remove()


@dataclass
class World:
    cluster: Cluster
    dsn: dict[str, str]  # region -> app database
    control: str
    spec_path: Path
    spec: dict

    def write_spec(self, **changes) -> Path:
        self.spec.update(changes)
        self.spec_path.write_text(yaml.safe_dump(self.spec, sort_keys=False))
        return self.spec_path

    def migrator(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Runs the command line as a user would, in its own process."""
        return subprocess.run(
            [sys.executable, "-m", "migrator.cli", *args, "--config", str(self.spec_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )

    def rows(self, region: str, sql: str, args=()) -> list[tuple]:
        with psycopg.connect(self.dsn[region]) as c:
            c.execute("SET TimeZone = 'UTC'")
            return c.execute(sql, args).fetchall()

    def ctl(self, sql: str, args=()) -> list[tuple]:
        with psycopg.connect(self.control) as c:
            return c.execute(sql, args).fetchall()


def demo_spec(dsn: dict[str, str], control: str, batch_users: int = 50, shards: int = 2) -> dict:
    spec = yaml.safe_load((ROOT / "migrator/demo/spec.yaml").read_text())
    spec.pop("objects")  # tests that need object stores add their own
    spec.pop("purge")  # and those that purge, their purge section
    spec.pop("evidence")  # and those that keep manifests, their keys
    spec["regions"] = {r: {"dsn": d} for r, d in dsn.items()}
    spec["control"] = {"dsn": control}
    spec["copy"] = {"batch_users": batch_users}
    spec["sharding"] = {"shards_per_region": shards}
    spec["retry"] = {"attempts": 2, "initial_wait_s": 0.1, "max_wait_s": 0.2}
    return spec


def fresh_databases(cluster: Cluster, schema_sql: str | None) -> tuple[dict[str, str], str]:
    n = next(_counter)
    dsn = {}
    for r in ("us", "ie", "no"):
        dsn[r] = cluster[r].create_database(f"app_{os.getpid()}_{n}")
        if schema_sql:
            with psycopg.connect(dsn[r]) as c:
                c.execute(schema_sql)
    control = cluster["us"].create_database(f"control_{os.getpid()}_{n}")
    return dsn, control


@pytest.fixture
def world(cluster, tmp_path) -> World:
    """The demo schema everywhere and 400 seeded US users."""
    dsn, control = fresh_databases(cluster, seed.schema_sql())
    seed.seed(dsn["us"], 400)
    spec = demo_spec(dsn, control)
    w = World(cluster, dsn, control, tmp_path / "spec.yaml", spec)
    w.write_spec()
    return w


# The tables of the demo graph with their owner expression, written out independently of
# the migrator's own SQL so the tests compare with something the code under test did not build.
DEMO_OWNED = {
    "users": "SELECT * FROM users t WHERE t.user_id = ANY(%s) ORDER BY 1",
    "videos": "SELECT * FROM videos t WHERE t.user_id = ANY(%s) ORDER BY 1",
    "comments": "SELECT c.* FROM comments c JOIN videos v ON v.video_id = c.video_id "
    "WHERE v.user_id = ANY(%s) ORDER BY 1",
    "login_events": "SELECT * FROM login_events t WHERE t.user_id = ANY(%s) ORDER BY 1",
    "devices": "SELECT * FROM devices t WHERE t.user_id = ANY(%s) ORDER BY 1, 2",
}


# Files whose tests share a module or session fixture (the UI demo, the benchmark's run,
# the digest's tables, the S3 endpoints): each runs whole on one worker, so it is started
# once. Every other test goes to whichever worker is free: a whole file per worker left
# one idle for minutes at the suite's end while the other ran the five live-Airflow tests.
TOGETHER = (
    "tests/airflow/test_bench.py",
    "tests/airflow/test_ui_browser.py",
    "tests/integration/test_digest.py",
    "tests/integration/test_objects.py",
)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scheduling by scope, the scope being the file for TOGETHER and the test
    itself for every other (xdist's own `xdist_group` marks do not take under pytest 9)."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in TOGETHER else nodeid

    return Scheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tier a test is in is its folder's: `pytest -m unit` runs the tests that need no
    server (tests/unit), in seconds; integration and airflow start real servers."""
    for item in items:
        tier = item.path.parent.name
        if tier in ("unit", "integration", "airflow"):
            item.add_marker(tier)
