"""The link the WAN tests and the benchmark run through: each direction held for half the
round trip, order kept, round trips counted, and a freeze that passes nothing and closes
nothing. Against an echo server in this process (no store needed)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from migrator.demo.relay import Relay

pytestmark = pytest.mark.unit


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _ask(sock: socket.socket, msg: bytes) -> bytes:
    sock.sendall(msg)
    got = b""
    while len(got) < len(msg):
        got += sock.recv(65536)
    return got


def test_each_exchange_is_one_round_trip_of_at_least_the_links_delay_and_order_is_kept():
    srv, port = _echo_server()
    try:
        with Relay(("127.0.0.1", port), rtt_ms=60) as relay, relay.counting() as counts:
            with socket.create_connection(("127.0.0.1", relay.port)) as s:
                t0 = time.monotonic()
                for i in range(5):
                    assert _ask(s, b"x%d" % i * 1000) == b"x%d" % i * 1000
                took = time.monotonic() - t0
                # pipelined: three messages sent before any answer is one round trip
                s.sendall(b"a" * 10 + b"b" * 10 + b"c" * 10)
                got = b""
                while len(got) < 30:
                    got += s.recv(65536)
                assert got == b"a" * 10 + b"b" * 10 + b"c" * 10
        assert took >= 5 * 0.060  # never less than the link's round trip each
        assert counts.connections == 1 and counts.round_trips == 6, counts
        assert counts.sent == counts.received == sum(len(b"x%d" % i * 1000) for i in range(5)) + 30
    finally:
        srv.close()


def test_a_frozen_link_passes_nothing_and_closes_nothing_until_thawed():
    srv, port = _echo_server()
    try:
        with Relay(("127.0.0.1", port), rtt_ms=10) as relay:
            with socket.create_connection(("127.0.0.1", relay.port)) as s:
                assert _ask(s, b"before") == b"before"
                relay.freeze()
                s.sendall(b"during")
                s.settimeout(1.0)
                with pytest.raises(TimeoutError):
                    s.recv(100)  # no answer, and no close (a close would return b"")
                relay.thaw()
                s.settimeout(10)
                assert s.recv(100) == b"during"
    finally:
        srv.close()
