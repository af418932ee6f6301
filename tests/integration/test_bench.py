"""A tiny run of the benchmark keeps it working; its figures are not asserted on."""

from __future__ import annotations

import pytest

from tests.helpers import bench

pytestmark = pytest.mark.integration


def test_bench_smoke(tmp_path):
    doc = bench(
        *("--scale", "0.02", "--runs", "1", "--objects", "20", "--object-kb", "64", "--object-runs", "1"),
        *("--writes", "--against-scale", "0.01", "--chart", str(tmp_path / "bench.png")),
        timeout=600,
    )
    assert doc["users"] == 10000 and doc["rows"] > 2000
    for key in (
        "raw_pipe_s",
        "parallel_pipe_s",
        "plan_s",
        "copy_s",
        "verify_s",
        "copy_vs_pipe",
        "copy_vs_parallel_pipe",
        "unchecked_parallel_pipe_s",
        "copy_vs_unchecked_parallel_pipe",
        "total_vs_pipe",
        "lifecycle_total_s",
        "lifecycle_vs_parallel_pipe",
        "rollback_vs_copy",
        "purge_vs_copy",
        "raw_purge_s",
        "purge_vs_raw_purge",
        "lifecycle_to_cutover_vs_parallel_pipe",
        "lifecycle_parallel_pipe_s",
        "lifecycle_copy_vs_parallel_pipe",
        "pipe_and_raw_purge_vs_parallel_pipe",
        "raw_purge_unchecked_s",
        "unchecked_pipe_and_raw_purge_vs_parallel_pipe",
        "peak_rss_mb",
        "cores",
    ):
        assert doc[key] > 0, key
    assert set(doc["lifecycle_s"]) == {"plan", "copy", "verify", "cutover", "purge"}
    # the Airflow figure (a live scheduler): tests/airflow/test_bench_airflow.py
    assert doc["object_copy"]["objects"] == 20 and doc["object_copy"]["objects_vs_plain"] > 0
    assert doc["changed_row"]["tool_found"] and doc["changed_row"]["reladiff_found"]
    assert doc["verify_speedup_vs_reladiff"] > 0
    w = doc["live_writes"]
    assert w["lost_writes"] == 0 and not w["writer_errors"] and w["shards"] > 0 and w["fence_ms_p99"] > 0
    assert w["writer_during_vs_alone_throttled"] > 0 and w["throttle_rows_per_s_per_shard"] > 0
    assert w["writer_planned_vs_alone"] > 0 and w["writer_captured_vs_alone"] > 0
    # one throttled run per setting (a third, then a quarter of the free copy's rate): the
    # headline is the last, and a lower ceiling is a lower ceiling
    held = w["throttle_settings"]
    assert [t["divisor"] for t in held] == [3, 4] and w["throttle_divisor"] == 4
    assert w["throttle_rows_per_s_per_shard"] == held[-1]["rows_per_s_per_shard"]
    assert held[1]["rows_per_s_per_shard"] < held[0]["rows_per_s_per_shard"]
    g = doc["growth"]
    assert g["against_scale"] == 0.01 and g["rows_ratio"] > 1 and g["time_ratio"] > 0 and g["small"]["copy_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # each target the run measured, with the figure's own value and whether it was met
    t = doc["targets"]
    assert {"copy_vs_parallel_pipe", "lifecycle_vs_parallel_pipe", "rollback_vs_copy", "purge_vs_copy"} <= set(t)
    assert {"fence_ms_p99", "writer_during_vs_alone_throttled", "growth_time_ratio", "objects_vs_plain"} <= set(t)
    assert t["rollback_vs_copy"]["value"] == doc["rollback_vs_copy"]
    assert t["rollback_vs_copy"]["met"] is (doc["rollback_vs_copy"] <= 1.0)
    assert t["fence_ms_p99"]["met"] is (w["fence_ms_p99"] < 300)
    assert all(isinstance(x["met"], bool) for x in t.values())
