"""A loopback relay that stands for the link between two data centers: each byte is held
for half the round trip in each direction (order kept), optionally under a bandwidth cap,
and the link can be frozen (nothing passes, nothing is closed: a lost host, a cut cable)
and thawed. It counts the round trips its connections make: a round trip is a turn of
the conversation, the client sending after it has read the server's answer.

Started by the benchmark (`--rtt-ms`) and the tests in a thread of their own:

    with Relay(("127.0.0.1", server_port), rtt_ms=80) as relay:
        dsn = f"host=127.0.0.1 port={relay.port} ..."
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass
class Counts:
    """What crossed the link: connections opened, round trips, bytes each way."""

    connections: int = 0
    round_trips: int = 0
    sent: int = 0  # client -> server
    received: int = 0  # server -> client
    _answered: dict[int, bool] = field(default_factory=dict)


class Relay:
    def __init__(self, target: tuple[str, int], rtt_ms: float = 80.0, mbit_s: float | None = None):
        self.target, self.delay_s, self.mbit_s = target, rtt_ms / 2000.0, mbit_s
        self.counts = Counts()
        self._lock = threading.Lock()
        self._frozen = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self.port = 0

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> Relay:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = started.result(timeout=10)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # the link's state ------------------------------------------------------------------
    def freeze(self) -> None:
        """Nothing passes either way, and no connection is closed."""
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counts]:
        """The counts of what crosses the link inside the block."""
        with self._lock:
            before = Counts(**{k: getattr(self.counts, k) for k in ("connections", "round_trips", "sent", "received")})
        out = Counts()
        try:
            yield out
        finally:
            with self._lock:
                for k in ("connections", "round_trips", "sent", "received"):
                    setattr(out, k, getattr(self.counts, k) - getattr(before, k))

    # the relay itself ------------------------------------------------------------------
    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.close()
            return
        for w in (cwriter, swriter):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = id(cwriter)
        with self._lock:
            self.counts.connections += 1
            self.counts._answered[cid] = True  # the first message starts a round trip
        try:
            await asyncio.gather(
                self._pipe(creader, swriter, cid, upstream=True),
                self._pipe(sreader, cwriter, cid, upstream=False),
                return_exceptions=True,
            )
        except asyncio.CancelledError:  # the relay stopping: end quietly (asyncio reports a cancelled callback)
            for w in (cwriter, swriter):
                w.close()
        with self._lock:
            self.counts._answered.pop(cid, None)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cid: int, upstream: bool) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            next_free = 0.0
            while True:
                due, data = await queue.get()
                if not data:
                    break
                if self.mbit_s:  # the link's capacity: one chunk after another
                    start = max(due, next_free)
                    next_free = start + len(data) * 8 / (self.mbit_s * 1e6)
                    due = next_free
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                while self._frozen.is_set():
                    await asyncio.sleep(0.05)
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(CHUNK)
                while self._frozen.is_set():  # a frozen link takes nothing in either
                    await asyncio.sleep(0.05)
                with self._lock:
                    if upstream:
                        self.counts.sent += len(data)
                        if data and self.counts._answered.get(cid):
                            self.counts.round_trips += 1
                            self.counts._answered[cid] = False
                    else:
                        self.counts.received += len(data)
                        if data:
                            self.counts._answered[cid] = True
                await queue.put((time.monotonic() + self.delay_s, data))
                if not data:
                    break
        finally:
            await queue.put((0.0, b""))
            with contextlib.suppress(Exception):
                await sender
