"""Each figure's target and whether a run met it; how time grew between two scales."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A figure's target (the benchmark issues'): its path in the document, the comparison,
    the bound (or how to work it out from the document), and which runs it is set for."""

    name: str
    path: tuple[str, ...]
    op: str  # "<=", ">=" or "<"
    bound: float | Callable[[dict], float]
    where: str = ""
    applies: Callable[[dict], bool] = lambda doc: True


def _far(doc: dict) -> bool:
    return bool(doc.get("rtt_ms"))


# Against honest floors (the same work by hand, with the same parallelism and the same checks
# skipped), on loopback and across an 80 ms link (`--rtt-ms 80`) alike.
TARGETS = [
    Target(
        "copy_vs_unchecked_parallel_pipe",
        ("copy_vs_unchecked_parallel_pipe",),
        "<=",
        lambda d: 1.2 if _far(d) else 1.05,
        "1.05 on loopback, 1.2 across a link",
    ),
    Target("lifecycle_to_cutover_vs_floor", ("lifecycle_to_cutover_vs_floor",), "<=", 1.5),
    Target("rollback_vs_copy", ("rollback_vs_copy",), "<=", 1.0),
    Target("purge_vs_parallel_raw_purge", ("purge_vs_parallel_raw_purge",), "<=", 1.2),
    Target("verify_speedup_vs_reladiff", ("verify_speedup_vs_reladiff",), ">=", 5.0),
    Target("peak_rss_mb", ("peak_rss_mb",), "<=", 300.0),
    # growth as good as linear, within a tenth: 4.4 for scale 4 against 1
    Target("growth_time_ratio", ("growth", "time_ratio"), "<=", lambda d: 1.1 * d["growth"]["rows_ratio"]),
    Target("objects_vs_plain", ("object_copy", "objects_vs_plain"), ">=", 0.9),
    Target("fence_ms_p99", ("live_writes", "fence_ms_p99"), "<", 300.0),
    Target("writer_during_vs_alone_throttled", ("live_writes", "writer_during_vs_alone_throttled"), ">=", 0.6),
    Target("airflow_vs_cli", ("airflow", "airflow_vs_cli"), "<=", 1.15, "at scale 1", lambda d: d.get("scale") == 1),
    Target(
        "airflow_celery_vs_cli",
        ("airflow_celery", "airflow_vs_cli"),
        "<=",
        1.15,
        "at scale 1",
        lambda d: d.get("scale") == 1,
    ),
]


def targets(doc: dict) -> dict[str, dict]:
    """Each target this run measured: its value, the target, and whether it was met (None
    where the target is set for another scale)."""
    out: dict[str, dict] = {}
    for t in TARGETS:
        v: object = doc
        for k in t.path:
            v = v.get(k) if isinstance(v, dict) else None
        if not isinstance(v, int | float):
            continue
        b = t.bound(doc) if callable(t.bound) else t.bound
        met = v <= b if t.op == "<=" else v >= b if t.op == ">=" else v < b
        out[t.name] = {
            "value": v,
            "target": f"{t.op} {b:.3g}" + (f" ({t.where})" if t.where else ""),
            "met": met if t.applies(doc) else None,
        }
    return out


def growth(small: dict, large: dict) -> dict:
    """How the copy and verify times and the peak memory grew from the smaller scale to this
    one, both measured in this run: linear growth gives a time ratio equal to the rows ratio."""
    t_small = small["copy_s"] + small["verify_s"]
    t_large = large["copy_s"] + large["verify_s"]
    return {
        "against_scale": small["scale"],
        "rows_ratio": round(large["rows"] / small["rows"], 3),
        "time_ratio": round(t_large / t_small, 3),
        "copy_time_ratio": round(large["copy_s"] / small["copy_s"], 3),
        "verify_time_ratio": round(large["verify_s"] / small["verify_s"], 3),
        "raw_pipe_time_ratio": round(large["raw_pipe_s"] / small["raw_pipe_s"], 3),
        "plan_time_ratio": round(large["plan_s"] / small["plan_s"], 3),
        "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "small": small,
    }
