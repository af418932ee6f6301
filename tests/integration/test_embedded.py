"""The throwaway servers the tests and the demo start: one keeps working when a directory
above it is closed to others after it started (pytest does that to its temporary root as
each session starts, so two sessions at once would otherwise break each other's servers)."""

from __future__ import annotations

import os
import socket

import psycopg
import pytest

from migrator.demo.embedded import Cluster, LocalPostgres, LocalS3, free_port

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


def test_ports_lie_below_the_kernels_range_for_outgoing_connections():
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports), ports
    assert len(ports) > 1  # picked at random, so servers started at once rarely meet


def test_a_cluster_or_an_endpoint_that_cannot_start_says_why_and_leaves_nothing_running(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        s3 = LocalS3("ie", port)
        with pytest.raises(RuntimeError) as e:
            s3.start(timeout=20)
        assert "S3 endpoint ie" in str(e.value) and str(port) in str(e.value)
        assert s3.proc is None
        # the second server cannot bind its port: the first, already started, is stopped too
        cluster = Cluster(["us", "ie"], tmp_path / "servers", ports={"ie": port})
        with pytest.raises(RuntimeError) as e:
            cluster.start()
        assert "PostgreSQL server ie did not start" in str(e.value)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster["us"].dsn(), connect_timeout=2)
