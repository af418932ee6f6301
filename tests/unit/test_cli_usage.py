"""The command line's answer to a usage error, as a user meets it: exit 2 and a message that
names the command, option or value it did not take (no server is needed to be refused)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    (["migrate"], "No such command 'migrate'"),
    (["plan", "--regoin", "ie", "--config", "spec.yaml"], "--regoin"),
    (["run", "--since", "yesterday-ish", "--config", "spec.yaml"], "'--since'"),
    (["cutover", "--shard"], "--shard"),
    (["status", "--json", "extra-argument", "--config", "spec.yaml"], "extra-argument"),
]


@pytest.mark.parametrize("args, named", CASES, ids=[" ".join(a[:2]) for a, _ in CASES])
def test_a_usage_error_exits_2_naming_what_was_wrong(args, named):
    res = subprocess.run([sys.executable, "-m", "migrator.cli", *args], capture_output=True, text=True, timeout=60)
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 2, out
    assert named in out and "usage:" in out and "Traceback" not in out, out


def test_the_ui_demos_retention_is_checked_before_anything_starts(tmp_path):
    folder = tmp_path / "ui"
    res = subprocess.run(
        [sys.executable, "-m", "migrator.cli", "demo", "--ui", str(folder), "--retention", "soon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "--retention 'soon'" in res.stderr, res.stderr
    assert not folder.exists()


def test_the_demos_spec_takes_the_retention_asked_for(tmp_path):
    import yaml

    from migrator.demo.run import write_spec

    assert yaml.safe_load(write_spec(tmp_path, retention="0s").read_text())["purge"]["after"] == "0s"
    assert yaml.safe_load(write_spec(tmp_path).read_text())["purge"]["after"] == "7d"
