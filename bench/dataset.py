"""One scale's data on its own servers, and one run of each timed step on it."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

import psycopg
import yaml

from bench.floors import (
    TABLES,
    checksums_both,
    left,
    parallel_pipe,
    parallel_raw_purge,
    raw_pipe,
    raw_purge,
    unchecked,
)
from bench.peers import reladiff
from migrator.control.context import Context
from migrator.demo import seed
from migrator.demo.embedded import Cluster, bindir
from migrator.demo.relay import Relay
from migrator.phases.copy import copy_shard
from migrator.phases.plan import Plan, plan
from migrator.phases.verify import compare_shard
from migrator.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent


def server_settings(scale: float) -> dict[str, str]:
    """Both servers, for the pipe and the tool alike: buffers that hold the scale's data
    (about 0.9 GB at the source per unit of scale) and WAL sized for a bulk load, so a
    larger scale is not slowed by evictions and checkpoints that a smaller one escapes."""
    return {
        "shared_buffers": f"{max(1024, round(1280 * scale))}MB",
        "max_wal_size": "8GB",
        "checkpoint_timeout": "30min",
    }


def warm(ctx: Context, dsn: str) -> None:
    """Read each table once: a clone starts cold, and neither side of a comparison should pay
    for that alone."""
    with psycopg.connect(dsn) as c:
        for name in ctx.tables:
            c.execute(psycopg.sql.SQL("SELECT count(*) FROM {}").format(psycopg.sql.Identifier(name)))


def settle(*dsns: str) -> None:
    for d in dsns:
        with psycopg.connect(d, autocommit=True) as c:
            c.execute("CHECKPOINT")


def truncate(dsn: str) -> None:
    with psycopg.connect(dsn) as c:
        c.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")
        c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")


def reset_peak_rss() -> None:
    """Start the process's peak-RSS high-water mark afresh (Linux), so two scales measured
    in one process each get their own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Dataset:
    """One scale's data on its own source and destination servers, and one run of each
    timed step on it."""

    def __init__(self, scale: float, base: Path, batch_users: int, rtt_ms: float = 0.0, workers_at: str = "source"):
        self.scale, self.users = scale, max(100, int(500_000 * scale))
        self.settings = server_settings(scale)
        self.cluster = Cluster(["src", "dst"], base, settings=self.settings).start()
        self.src, self.dst = self.cluster["src"].create_database("app"), self.cluster["dst"].create_database("app")
        self.control = self.cluster["src"].create_database("control")
        for d in (self.src, self.dst):
            seed.create_schema(d)
        # Across an ocean: the far side behind a relay that holds each direction for half the
        # round trip; the tool and the hand-written pipes alike reach it through the relay.
        # Workers beside the source (the default) have the destination far; workers in the
        # destination's region have the source and the control database (on its server) far.
        self.relay: Relay | None = None
        self.workers_at = workers_at
        # as each region's own application reaches them
        self.src_near, self.dst_near, self.control_near = self.src, self.dst, self.control
        self._via: tuple[str, str] | None = None
        if rtt_ms > 0:
            port = self.cluster["dst" if workers_at == "source" else "src"].port
            self.relay = Relay(("127.0.0.1", port), rtt_ms=rtt_ms).start()
            self._via = (f":{port}/", f":{self.relay.port}/")
            if workers_at == "source":
                self.dst = self.dst.replace(*self._via)
            else:
                self.src, self.control = (d.replace(*self._via) for d in (self.src, self.control))
        seed.seed(self.src_near, self.users)
        spec = yaml.safe_load((ROOT / "migrator/demo/spec.yaml").read_text())
        spec.pop("objects")
        purge = spec.pop("purge")  # only the lifecycle runs purge
        purge["keys"] = {"ie": purge["keys"]["ie"]}
        os.environ.setdefault(purge["keys"]["ie"]["env"], "bench-pseudonym-key-" + "0" * 16)
        self.purge = purge
        spec.pop("evidence")
        spec["policy"] = {c: ("ie" if r != "us" else "us") for c, r in spec["policy"].items()}
        spec["regions"] = {"us": {"dsn": self.src}, "ie": {"dsn": self.dst}}
        spec["control"] = {"dsn": self.control}
        spec["sharding"] = {"shards_per_region": 1}
        spec["copy"] = {"batch_users": batch_users}
        self.spec = spec
        self.codes = [c for c, r in spec["policy"].items() if r == "ie"]
        self.pipe: list[float] = []
        self.ppipe: list[float] = []
        self.upipe: list[float] = []  # the parallel pipe with every trigger at the destination skipped
        self.lives: list[dict[str, float]] = []  # per run: plan, copy, verify, cutover, purge seconds
        self.rollbacks: list[dict[str, float]] = []  # per run: copy and rollback seconds
        self.raw_purges: list[float] = []  # per run: the hand-written purge's seconds
        self.raw_purges_parallel: list[float] = []  # with the tool's lanes and recheck, triggers skipped
        self.life_pipes: list[float] = []  # per run: the parallel pipe timed beside its lifecycle
        # per run: the unchecked parallel pipe and one pass of checksums on both sides, beside it
        self.life_floors: list[float] = []
        self.planned: list[float] = []
        self.copy: list[float] = []
        self.verify: list[float] = []
        self.rel: list[float] = []
        self.rows = 0
        self.peak_mb = 0.0
        self.plan: Plan | None = None
        self.ctx: Context | None = None

    def reset(self) -> Context:
        truncate(self.dst)
        for d in (self.control, self.src):
            with psycopg.connect(d) as c:
                c.execute("DROP SCHEMA IF EXISTS migrator CASCADE")
        return Context(parse_spec(self.spec))

    def run(self, run: int, with_reladiff: bool) -> None:
        psql = str(bindir() / "psql")
        reset_peak_rss()
        # Rotate which goes first, and checkpoint both servers before each timed step,
        # so none pays for another's writes.
        steps = ["pipe", "parallel pipe", "unchecked pipe", "tool"]
        for step in steps[run % len(steps) :] + steps[: run % len(steps)]:
            ctx = self.reset()
            settle(self.src, self.dst)
            if step == "pipe":
                self.pipe.append(raw_pipe(ctx, psql, self.src, self.dst, "ie"))
                continue
            if step == "parallel pipe":
                self.ppipe.append(parallel_pipe(ctx, psql, self.src, self.dst, "ie", ctx.spec.copy_.workers))
                continue
            if step == "unchecked pipe":
                self.upipe.append(parallel_pipe(ctx, psql, self.src, unchecked(self.dst), "ie", ctx.spec.copy_.workers))
                continue
            t0 = time.perf_counter()
            p = plan(ctx, f"bench-{run}")
            t1 = time.perf_counter()
            for s in p.shards:
                res = copy_shard(ctx, s.shard_id)
                self.rows = sum(res.rows.values())
            self.planned.append(t1 - t0)
            self.copy.append(time.perf_counter() - t1)
        self.ctx = ctx = self.reset()  # the tool's copy again, this time to be verified
        self.plan = p = plan(ctx, f"bench-verify-{run}")
        for s in p.shards:
            copy_shard(ctx, s.shard_id)
        settle(self.src, self.dst)
        t0 = time.perf_counter()
        for s in p.shards:
            assert compare_shard(ctx, s.shard_id).matched
        self.verify.append(time.perf_counter() - t0)
        self.peak_mb = max(self.peak_mb, peak_rss_mb())
        if with_reladiff:
            seconds, found = reladiff(ctx, self.src, self.dst, self.codes)
            assert not found, f"reladiff reports differences on an exact copy: {found[:3]}"
            self.rel.append(seconds)

    def lifecycle(self, run: int, last: str) -> None:
        """The whole life of the shard, each phase timed as `migrator` runs it: plan, copy,
        verify, cutover, then `last` (purge, on a copy of the source made for the run from
        the seeded database; or rollback of the cut-over shard, on the source itself)."""
        from migrator.lifecycle import dispatch

        spec = dict(self.spec, purge=dict(self.purge, after="0s"))
        src = self.src
        self.reset()  # before cloning: an earlier run's guard triggers would slow the hand-written purge
        if last == "purge":
            # the hand-written purge first, on a clone of its own; then once more on another,
            # with the tool's lanes and recheck and no trigger (no foreign key) checked; each
            # clone's tables read once first, as the tool's are before it
            raw_left = None
            ctx0 = Context(parse_spec(spec))
            for into in (self.raw_purges, self.raw_purges_parallel):
                raw = self.clone("app_raw")
                warm(ctx0, raw)
                settle(raw, self.dst)
                if into is self.raw_purges:
                    into.append(raw_purge(raw, self.codes))
                else:
                    into.append(parallel_raw_purge(ctx0, raw, self.codes, ctx0.spec.copy_.workers))
                now = left(raw)
                assert raw_left in (None, now), "the two hand-written purges did different work"
                raw_left = now
                self.drop("app_raw")
            src = self.clone("app_purge")
            spec["regions"] = dict(spec["regions"], us={"dsn": src})
        ctx = Context(parse_spec(spec))
        if last == "purge":
            # The lifecycle's own yardstick: the parallel pipe on the same source just before
            # it (it cannot go after: the purge changes the source), so both meet the same
            # database at the same hour. A clone starts cold; each table is read once first,
            # so neither the pipe nor the tool after it pays for that alone.
            warm(ctx, src)
            settle(src, self.dst)
            self.life_pipes.append(
                parallel_pipe(ctx, str(bindir() / "psql"), src, self.dst, "ie", ctx.spec.copy_.workers)
            )
            truncate(self.dst)
            # and its floor: what any tool that moves and checks the rows does at least, the
            # unchecked parallel pipe, then one pass of in-database checksums on both sides
            settle(src, self.dst)
            piped = parallel_pipe(ctx, str(bindir() / "psql"), src, unchecked(self.dst), "ie", ctx.spec.copy_.workers)
            self.life_floors.append(piped + checksums_both(ctx, src, self.dst, self.codes))
            truncate(self.dst)
        settle(src, self.dst)
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        p = plan(ctx, f"life-{last}-{run}")
        times["plan"] = time.perf_counter() - t0
        for phase in ("copy", "verify", "cutover", last):
            t0 = time.perf_counter()
            for s in p.shards:
                dispatch.run_phase(ctx, s.shard_id, phase, reason="benchmark")
            times[phase] = time.perf_counter() - t0
            want = {"copy": "copied", "verify": "verified", "cutover": "cut_over", "purge": "purged"}
            for s in p.shards:
                state = ctx.control.shard(s.shard_id).state.value
                assert state == want.get(phase, "rolled_back"), f"{phase}: shard {s.shard_id} is {state}"
        (self.lives if last == "purge" else self.rollbacks).append(times)
        if last == "purge":
            assert left(src) == raw_left, "the hand-written purge did other work than the tool's"
            self.drop("app_purge")

    def clone(self, name: str) -> str:
        """A copy of the seeded source database, for a run that changes it."""
        with psycopg.connect(self.cluster["src"].dsn(), autocommit=True) as c:
            # cloning needs the template to itself; earlier runs' contexts may keep idle sessions
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'app'")
            c.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {}").format(psycopg.sql.Identifier(name)))
            c.execute(
                psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE app STRATEGY FILE_COPY").format(
                    psycopg.sql.Identifier(name)
                )
            )
        dsn = self.cluster["src"].dsn(name)
        return dsn.replace(*self._via) if self._via and self.workers_at == "destination" else dsn

    def drop(self, name: str) -> None:
        with psycopg.connect(self.cluster["src"].dsn(), autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            c.execute(psycopg.sql.SQL("DROP DATABASE {}").format(psycopg.sql.Identifier(name)))

    def life_figures(self) -> dict:
        med = statistics.median
        out: dict = {}
        if self.lives:
            phases = list(self.lives[0])
            out["lifecycle_s"] = {k: round(med(t[k] for t in self.lives), 3) for k in phases}
            out["lifecycle_total_s"] = round(med(sum(t.values()) for t in self.lives), 3)
            # each lifecycle against the parallel pipe timed beside it (same source, same hour)
            pipes = self.life_pipes
            out["lifecycle_parallel_pipe_s"] = round(med(pipes), 3)
            out["lifecycle_vs_parallel_pipe"] = round(med(sum(t.values()) / p for t, p in zip(self.lives, pipes)), 3)
            out["purge_vs_copy"] = round(med(t["purge"] / t["copy"] for t in self.lives), 3)
            # up to the cutover: the lifecycle as it was before there was a purge
            out["lifecycle_to_cutover_vs_parallel_pipe"] = round(
                med(sum(v for k, v in t.items() if k != "purge") / p for t, p in zip(self.lives, pipes)), 3
            )
            out["lifecycle_copy_vs_parallel_pipe"] = round(med(t["copy"] / p for t, p in zip(self.lives, pipes)), 3)
            out["raw_purge_s"] = round(med(self.raw_purges), 3)
            out["purge_vs_raw_purge"] = round(med(t["purge"] for t in self.lives) / med(self.raw_purges), 3)
            # what any tool's lifecycle costs at least: the parallel pipe, then the hand-written purge
            out["pipe_and_raw_purge_vs_parallel_pipe"] = round(
                med((p + r) / p for p, r in zip(pipes, self.raw_purges)), 3
            )
            # the honest floors: the same work by hand, with the same lanes and checks skipped
            out["raw_purge_parallel_s"] = round(med(self.raw_purges_parallel), 3)
            out["purge_vs_parallel_raw_purge"] = round(
                med(t["purge"] for t in self.lives) / med(self.raw_purges_parallel), 3
            )
            out["lifecycle_floor_s"] = round(med(self.life_floors), 3)
            out["lifecycle_to_cutover_vs_floor"] = round(
                med(sum(v for k, v in t.items() if k != "purge") / f for t, f in zip(self.lives, self.life_floors)), 3
            )
        if self.rollbacks:
            out["rollback_s"] = round(med(t["rollback"] for t in self.rollbacks), 3)
            out["rollback_vs_copy"] = round(med(t["rollback"] / t["copy"] for t in self.rollbacks), 3)
        return out

    def figures(self) -> dict:
        med = statistics.median
        return {
            "scale": self.scale,
            "users": self.users,
            "rows": self.rows,
            "raw_pipe_s": round(med(self.pipe), 3),
            "plan_s": round(med(self.planned), 3),
            "copy_s": round(med(self.copy), 3),
            "verify_s": round(med(self.verify), 3),
            "peak_rss_mb": round(self.peak_mb, 1),
            "copy_vs_pipe": round(med(self.copy) / med(self.pipe), 3),
            "parallel_pipe_s": round(med(self.ppipe), 3),
            "copy_vs_parallel_pipe": round(med(self.copy) / med(self.ppipe), 3),
            "unchecked_parallel_pipe_s": round(med(self.upipe), 3),
            "copy_vs_unchecked_parallel_pipe": round(med(self.copy) / med(self.upipe), 3),
            "total_vs_pipe": round((med(self.copy) + med(self.verify)) / med(self.pipe), 3),
            **(
                {
                    "reladiff_s": round(med(self.rel), 3),
                    "verify_speedup_vs_reladiff": round(med(self.rel) / med(self.verify), 2),
                }
                if self.rel
                else {}
            ),
        }
