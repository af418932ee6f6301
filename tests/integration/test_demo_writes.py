"""The README's live-writes demo, as a user runs it: an application writing through the
whole migration, and the audit after it passes (its writes are drift, not findings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_demo_with_writes_passes_its_audit(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "migrator.cli", "demo", "--users", "400", "--with-writes", "--via", "cli", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc["writes"]["acknowledged_writes"] > 0 and doc["writes"]["lost_writes"] == 0
    assert doc["writes"]["errors"] == 0
    assert doc["audit"]["ok"] and doc["audit"]["findings"] == []
    assert {d["kind"] for d in doc["audit"]["drift"]} == {"the application wrote after cutover"}
    assert all(s["state"] == "cut_over" for s in doc["shards"])
