"""The run's chart."""

from __future__ import annotations

from pathlib import Path


def chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    life = doc.get("lifecycle_s") or {}
    bars_of = {
        "pipe": doc["raw_pipe_s"],
        f"{doc['copy_workers']} pipes": doc["parallel_pipe_s"],
        "unchecked": doc.get("unchecked_parallel_pipe_s", 0),
        "plan": doc["plan_s"],
        "copy": doc["copy_s"],
        "verify": doc["verify_s"],
        "reladiff": doc.get("reladiff_s") or 0,
        "cutover": life.get("cutover", 0),
        "rollback": doc.get("rollback_s", 0),
        "purge": life.get("purge", 0),
        "hand purge": doc.get("raw_purge_s", 0),
    }
    labels, values = list(bars_of), list(bars_of.values())
    fig, ax = plt.subplots(figsize=(10, 3.4))
    colors = ["#888", "#555", "#bbb", "#7a7", "#2a7", "#27a", "#c63", "#a7a", "#aa7", "#7aa", "#999"]
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt="%.2f s")
    ax.set_ylabel("seconds (median)")
    ax.set_title(
        f"{doc['rows']:,} rows, scale {doc['scale']}, {doc['cores']} cores: "
        f"copy/{doc['copy_workers']} pipes {doc['copy_vs_parallel_pipe']}, "
        f"lifecycle/{doc['copy_workers']} pipes {doc.get('lifecycle_vs_parallel_pipe')}, "
        f"verify x{doc.get('verify_speedup_vs_reladiff')}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
