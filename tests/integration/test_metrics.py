"""The command line's metrics file: Prometheus text a dashboard's collector reads, with the
rows copied per table equal to what the source holds for the moved users (counted here)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEMO_OWNED, World

pytestmark = pytest.mark.integration


def test_a_run_writes_its_metrics_for_a_dashboard(world: World, tmp_path):
    out = tmp_path / "migrator.prom"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "migrator.cli",
            "--metrics-file",
            str(out),
            "run",
            "--config",
            str(world.spec_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    samples = [s for fam in text_string_to_metric_families(out.read_text()) for s in fam.samples]
    rows: dict[tuple[str, str], float] = {}
    for s in samples:
        if s.name == "migrator_rows_copied_total":
            key = (s.labels["region"], s.labels["table"])
            rows[key] = rows.get(key, 0) + s.value
    shards = world.ctl("SELECT shard_id, region FROM migrator.shard")
    for region in ("ie", "no"):
        ids = [int(k) for (k,) in world.ctl("SELECT user_key FROM migrator.directory WHERE home = %s", (region,))]
        for table, q in DEMO_OWNED.items():
            assert rows[(region, table)] == len(world.rows("us", q, (ids,))), (region, table)
    fences = {s.labels["shard"]: s.value for s in samples if s.name == "migrator_fence_window_ms"}
    assert set(fences) == {sid for sid, _ in shards} and all(v > 0 for v in fences.values())
    batches = sum(s.value for s in samples if s.name == "migrator_batches_copied_total")
    assert batches == world.ctl("SELECT sum(batches) FROM migrator.shard")[0][0]
    assert all(s.value > 0 for s in samples if s.name == "migrator_bytes_copied_total")
    assert "@example" not in out.read_text()  # labels are shard ids and regions, never a user
