"""A Celery broker for the CeleryExecutor's tests and benchmark: Debian's redis-server on a
port of its own, keeping nothing on disk, stopped with its process."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from migrator.demo.embedded import free_port


class MissingBroker(RuntimeError):
    """redis-server is not installed."""


def start_redis(folder: Path, timeout: float = 30) -> tuple[subprocess.Popen, str]:
    """A redis-server on a free loopback port (its working directory `folder`); the process
    and its URL, once it answers a PING."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise MissingBroker("redis-server is not installed (Debian's package redis-server; ./dev.sh test installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.2)


def stop_redis(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
