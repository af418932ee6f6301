"""What dashboards read: rows, bytes and batches copied, the fence window, rows that
differed at verify, the change log's lag, per shard and region.

Two sinks, both the well-kept libraries' own formats: a Prometheus registry, written as a
text file for node_exporter's textfile collector at the end of a command line run
(`--metrics-file` or MIGRATOR_METRICS_FILE), and, inside an Airflow task, Airflow's own
metrics (StatsD or OpenTelemetry, as the deployment configures `[metrics]`), as
`migrator.<name>` with the region as a tag. Labels carry shard ids and regions, never a user.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile

log = logging.getLogger("migrator.metrics")
FILE_ENV = "MIGRATOR_METRICS_FILE"

REGISTRY = CollectorRegistry()
ROWS = Counter("migrator_rows_copied", "rows copied, by table", ["shard", "region", "table"], registry=REGISTRY)
BYTES = Counter("migrator_bytes_copied", "bytes of COPY data streamed", ["shard", "region"], registry=REGISTRY)
BATCHES = Counter("migrator_batches_copied", "batches committed", ["shard", "region"], registry=REGISTRY)
FENCE = Gauge("migrator_fence_window_ms", "the last cutover's fence window", ["shard", "region"], registry=REGISTRY)
MISMATCHES = Counter("migrator_rows_mismatched", "rows that differed at verify", ["shard", "region"], registry=REGISTRY)
LAG = Gauge("migrator_capture_lag_changes", "changes captured, not yet applied", ["shard", "region"], registry=REGISTRY)


def _airflow(kind: str, name: str, value: float, region: str) -> None:
    """Airflow's metrics, when this runs inside an Airflow task (a no-op when they are off)."""
    if "AIRFLOW_CTX_DAG_ID" not in os.environ:
        return
    try:
        from airflow.sdk.observability.stats import Stats

        if kind == "incr":
            Stats.incr(f"migrator.{name}", int(value), tags={"region": region})
        elif kind == "gauge":
            Stats.gauge(f"migrator.{name}", value, tags={"region": region})
        else:
            Stats.timing(f"migrator.{name}", value, tags={"region": region})
    except Exception as exc:  # noqa: BLE001 - metrics never fail a phase
        log.debug("airflow metrics unavailable: %s", type(exc).__name__)


def batch_copied(sid: str, region: str, rows: dict[str, int], nbytes: int) -> None:
    for table, n in rows.items():
        ROWS.labels(sid, region, table).inc(n)
    BYTES.labels(sid, region).inc(nbytes)
    BATCHES.labels(sid, region).inc()
    _airflow("incr", "rows_copied", sum(rows.values()), region)
    _airflow("incr", "bytes_copied", nbytes, region)
    _airflow("incr", "batches_copied", 1, region)


def fence_window(sid: str, region: str, ms: float) -> None:
    FENCE.labels(sid, region).set(ms)
    _airflow("timing", "fence_window_ms", ms, region)


def mismatched(sid: str, region: str, rows: int) -> None:
    MISMATCHES.labels(sid, region).inc(rows)
    _airflow("incr", "rows_mismatched", rows, region)


def lag(sid: str, region: str, changes: int) -> None:
    LAG.labels(sid, region).set(changes)
    _airflow("gauge", "capture_lag_changes", changes, region)


def write(path: str | Path | None = None) -> Path | None:
    """Write the registry as a Prometheus text file (atomically); the path, or None when
    neither the argument nor MIGRATOR_METRICS_FILE names one."""
    target = path or os.environ.get(FILE_ENV)
    if not target:
        return None
    write_to_textfile(str(target), REGISTRY)
    return Path(target)
