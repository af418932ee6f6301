"""A tiny run of the benchmark keeps it working; its figures are not asserted on."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_bench_smoke():
    res = subprocess.run([sys.executable, "-m", "bench", "--scale", "0.004", "--runs", "1", "--json", "--objects", "20", "--object-kb", "64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["users"] == 2000 and doc["rows"] > 2000
    for key in ("raw_pipe_s", "copy_s", "verify_s", "copy_vs_pipe", "total_vs_pipe", "peak_rss_mb", "cores"):
        assert doc[key] > 0, key
    assert doc["object_copy"]["objects"] == 20 and doc["object_copy"]["objects_vs_plain"] > 0
