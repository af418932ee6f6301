"""Verify against reladiff, a peer tool, on the same rows."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from migrator.control.context import Context


def owner_where(table: str, codes: list[str]) -> str:
    eu = "SELECT user_id FROM users WHERE country_code IN (" + ", ".join(f"'{c}'" for c in codes) + ")"
    if table == "users":
        return f"user_id IN ({eu})"
    if table == "comments":
        return f"video_id IN (SELECT video_id FROM videos WHERE user_id IN ({eu}))"
    return f"user_id IN ({eu})"


def reladiff(ctx: Context, src: str, dst: str, codes: list[str], threads: int = 4) -> tuple[float, list[dict]]:
    """reladiff over every table of the graph, limited to the moved users; seconds and the
    differing rows it reported."""
    exe = shutil.which("reladiff") or str(Path(sys.executable).parent / "reladiff")
    found: list[dict] = []
    t0 = time.perf_counter()
    for name, table in ctx.tables.items():
        cmd = [exe, src, name, dst, name, "--json", "-j", str(threads), "-w", owner_where(name, codes)]
        for k in table.pk:
            cmd += ["-k", k]
        for c in table.columns:
            if c.name not in table.pk:
                cmd += ["-c", c.name]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if res.returncode != 0 or "ERROR" in res.stderr:  # it exits 0 on some failures
            raise RuntimeError(f"reladiff failed on {name}: {res.stderr[-500:]}")
        for line in res.stdout.splitlines():  # [sign, [key..., values...]], not always valid JSON
            if line.strip().startswith("["):
                strings = re.findall(r'"((?:[^"\\]|\\.)*)"', line)
                found.append({"table": name, "sign": strings[0], "key": strings[1 : 1 + len(table.pk)]})  # keys only
    return time.perf_counter() - t0, found
