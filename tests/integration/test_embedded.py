"""The throwaway servers the tests and the demo start: one keeps working when a directory
above it is closed to others after it started (pytest does that to its temporary root as
each session starts, so two sessions at once would otherwise break each other's servers)."""

from __future__ import annotations

import os

import psycopg
import pytest

from migrator.demo.embedded import LocalPostgres

pytestmark = pytest.mark.integration


def test_a_server_is_started_queried_and_stopped_after_its_parent_is_closed(tmp_path):
    parent = tmp_path / "closed"
    first = LocalPostgres("first", parent).init().start()
    try:
        os.chmod(parent, 0o700)  # as another pytest session does to its root
        os.chmod(tmp_path, 0o700)
        second = LocalPostgres("second", parent).init().start()  # initdb and pg_ctl walk down to it again
        with psycopg.connect(second.dsn()) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        second.stop()
        os.chmod(parent, 0o700)
        first.stop()
        assert not (first.data / "postmaster.pid").exists() and not (second.data / "postmaster.pid").exists()
    finally:
        first.stop()
