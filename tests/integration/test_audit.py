"""`migrator audit`: the audit chain and residency checked from the stores alone, by a role
that can only read; each kind of tampering and drift found and named."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import psycopg
import pytest
import yaml
from psycopg.types.json import Jsonb

from tests.conftest import ROOT, World

pytestmark = pytest.mark.integration

KEY = "ie-audit-key-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"  # Debian's package: browsers are not downloaded here


def _reader(world: World, tmp_path) -> str:
    """A spec whose every DSN logs in as a role with CONNECT and SELECT only."""
    for dsn in [*world.dsn.values(), world.control]:
        with psycopg.connect(dsn, autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = 'auditor'").fetchone():
                c.execute("CREATE ROLE auditor LOGIN")
            for schema in ("public", "migrator"):
                if c.execute("SELECT to_regnamespace(%s)", (schema,)).fetchone()[0]:
                    c.execute(f"GRANT USAGE ON SCHEMA {schema} TO auditor")
                    c.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO auditor")
    spec = json.loads(json.dumps(world.spec))
    spec["regions"] = {r: {"dsn": d.replace("postgres@", "auditor@")} for r, d in world.dsn.items()}
    spec["control"] = {"dsn": world.control.replace("postgres@", "auditor@")}
    path = tmp_path / "auditor.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _cli(spec: str, *args: str) -> subprocess.CompletedProcess:
    """The command line with this spec alone (World.migrator adds the world's own)."""
    return subprocess.run(
        [sys.executable, "-m", "migrator.cli", *args, "--config", spec],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _audit(world: World, spec: str) -> tuple[int, dict]:
    res = _cli(spec, "audit", "--json")
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else {"stderr": res.stderr}


def _kinds(doc: dict) -> set[str]:
    return {f["kind"] for f in doc["findings"]}


def test_the_audit_chain_is_checked_by_a_reader_and_tampering_is_named(world: World, tmp_path):
    assert world.migrator("run", "--region", "ie").returncode == 0
    spec = _reader(world, tmp_path)
    rc, doc = _audit(world, spec)
    assert rc == 0 and doc["ok"], doc
    assert doc["chain"]["sealed"] > 0 and doc["chain"]["heads"]["ie"] >= 1
    assert doc["residency"]["regions"]["ie"]["users_homed"] > 0
    with psycopg.connect(world.dsn["ie"]) as c:  # the head kept in Ireland is the chain's
        seq, sha = c.execute("SELECT seq, sha256 FROM migrator.audit_heads ORDER BY seq DESC LIMIT 1").fetchone()
    assert world.ctl("SELECT sha256 FROM migrator.audit WHERE seq = %s", (seq,)) == [(sha,)]
    # the US side changes an audit row: named by its place in the chain
    world.ctl('UPDATE migrator.audit SET detail = detail || \'{"reason": "edited"}\' WHERE seq = 3 RETURNING 1')
    rc, doc = _audit(world, spec)
    assert rc == 1 and "audit row changed (its columns differ from what was sealed)" in _kinds(doc)
    assert [f["seq"] for f in doc["findings"]] == [3]
    # ... and rewrites the chain from there so every hash agrees: the region's head says otherwise
    rows = world.ctl("SELECT seq, id, content FROM migrator.audit WHERE seq IS NOT NULL ORDER BY seq")
    prev = None
    with psycopg.connect(world.control) as c:
        for s, rid, content in rows:
            if s == 3:
                content = content.replace('"detail": {', '"detail": {"reason": "edited", ', 1)
            sha = hashlib.sha256(f"{prev or ''}\n{content}".encode()).hexdigest()
            c.execute(
                "UPDATE migrator.audit SET content = %s, prev_sha256 = %s, sha256 = %s WHERE id = %s",
                (content, prev, sha, rid),
            )
            prev = sha
    rc, doc = _audit(world, spec)
    assert rc == 1 and "audit history rewritten before a head kept in the region" in _kinds(doc), doc["findings"]
    # a row removed
    world.ctl("DELETE FROM migrator.audit WHERE seq = 2 RETURNING 1")
    rc, doc = _audit(world, spec)
    assert rc == 1 and "audit row missing or reordered" in _kinds(doc)


def test_residency_drift_is_found_and_a_store_away_is_no_false_ok(world: World, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_AUDIT_KEY_IE", KEY)
    world.write_spec(
        purge={
            "after": "0s",
            "tables": {"users": {"pseudonymise": ["email"]}},
            "keys": {"ie": {"env": "TEST_AUDIT_KEY_IE"}},
        }
    )
    assert world.migrator("run", "--region", "ie").returncode == 0
    assert world.migrator("purge").returncode == 0
    spec = _reader(world, tmp_path)
    rc, doc = _audit(world, spec)
    assert rc == 0 and doc["residency"]["purged_users"] > 0, doc
    purged = int(world.ctl("SELECT min(user_key::bigint) FROM migrator.shard_user")[0][0])
    staying = world.rows("us", "SELECT user_id FROM users WHERE country_code = 'US' ORDER BY 1 LIMIT 1")[0][0]
    # a stray row: a US user's row inserted at the Irish destination
    with psycopg.connect(world.dsn["us"]) as c:
        row = c.execute("SELECT * FROM users WHERE user_id = %s", (staying,)).fetchone()
    with psycopg.connect(world.dsn["ie"]) as c:
        c.execute("SET migrator.apply = 'on'")
        values = [Jsonb(v) if isinstance(v, dict) else v for v in row]
        c.execute(f"INSERT INTO users VALUES ({', '.join(['%s'] * len(row))})", values)
    # a purged user's video back at the source, past the guard, and an original email restored
    with psycopg.connect(world.dsn["us"]) as c:
        c.execute("SET migrator.apply = 'on'")
        c.execute(
            "INSERT INTO videos (video_id, user_id, title, object_key, created_at) "
            "VALUES (99999999, %s, 't', 'k', now())",
            (purged,),
        )
        c.execute("UPDATE users SET email = 'back@example.test' WHERE user_id = %s", (purged,))
    rc, doc = _audit(world, spec)
    assert rc == 1
    found = {(f["kind"], f.get("region"), f.get("table")) for f in doc["findings"]}
    assert ("stray rows at a destination", "ie", "users") in found
    assert ("purged users' rows back at the source", "us", "videos") in found
    assert ("original values in a pseudonymised column", "us", "users") in found
    assert "back@example.test" not in json.dumps(doc)  # no row content, no user key in a finding
    assert all(str(v) != str(purged) for f in doc["findings"] for k, v in f.items() if k not in ("users", "rows"))
    # a store that cannot be read: an error naming it, not "ok"
    bad = yaml.safe_load(open(spec))
    bad["regions"]["ie"]["dsn"] = "postgresql://auditor@127.0.0.1:1/app"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    res = _cli(str(tmp_path / "bad.yaml"), "audit", "--json")
    assert res.returncode == 1 and "region ie" in res.stderr and '"ok": true' not in res.stdout


@pytest.mark.browser
def test_the_html_report_and_records_read_in_a_browser(world: World, tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("TEST_AUDIT_KEY_IE", KEY)
    world.write_spec(purge={"after": "0s", "keys": {"ie": {"env": "TEST_AUDIT_KEY_IE"}}})
    assert world.migrator("run", "--region", "ie").returncode == 0
    assert world.migrator("purge").returncode == 0
    spec = _reader(world, tmp_path)
    page_path, records = tmp_path / "audit.html", tmp_path / "records"
    res = _cli(spec, "audit", "--json", "--html", str(page_path), "--records", str(records))
    assert res.returncode == 0, res.stderr
    (record,) = records.glob("records-*.md")
    text = record.read_text()
    assert "from region us to ie" in text and "Retention at the source after cutover: 0s" in text
    shots = ROOT / "tests" / "output"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 1400})
        page.goto(page_path.as_uri())
        assert page.locator("#status").inner_text() == "all checks passed"
        assert page.locator("img[alt='users moved over time']").evaluate("i => i.naturalWidth") > 100
        assert page.locator("img[alt='fence windows']").evaluate("i => i.naturalWidth") > 100
        cells = page.locator("td").all_inner_texts()
        assert "ie" in cells and "devices" in cells  # a region row and a purge receipt
        page.screenshot(path=str(shots / "audit-report.png"), full_page=True)
        browser.close()
    assert (shots / "audit-report.png").stat().st_size > 10_000
