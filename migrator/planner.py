"""Forms a wave's shards: which users move, to which region, in which shard and batch.

Membership is written to the control database once, so every later phase (and a rerun)
works on exactly the same users and batches. A wave that already exists is not planned
again: its shards are returned as they are.
"""
from __future__ import annotations

import collections
import functools
import io
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from psycopg import sql

from migrator import sqlgen
from migrator.context import Context
from migrator.control import SCHEMA, shard_id
from migrator.errors import SpecError
from migrator.partition import batches, shard_index, shard_name
from migrator.state import Phase
from migrator.stores.postgres import connect


@dataclass
class ShardPlan:
    shard_id: str
    wave: str
    name: str
    region: str
    idx: int
    keys: list[str]
    batch_users: int
    rows: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    recorded: dict | None = None  # users and batches of a shard planned earlier (keys not loaded)

    @functools.cached_property
    def batches(self) -> list[list[str]]:
        """The keys split into batches, formed once (recording reads them several times)."""
        return batches(self.keys, self.batch_users)

    @property
    def users(self) -> int:
        return self.recorded["users"] if self.recorded else len(self.keys)

    def summary(self) -> dict:
        n_batches = self.recorded["batches"] if self.recorded else len(self.batches)
        return {
            "shard_id": self.shard_id, "name": self.name, "region": self.region, "users": self.users,
            "batches": n_batches, "rows": self.rows, "approx_bytes": self.bytes,
        }


@dataclass
class Plan:
    wave: str
    shards: list[ShardPlan]
    unplaced: dict[str, int]  # residency code (or 'NULL') -> users left where they are
    already_planned: bool = False

    def summary(self) -> dict:
        return {
            "wave": self.wave, "already_planned": self.already_planned,
            "shards": [s.summary() for s in self.shards], "unplaced_users": self.unplaced,
        }


def _taken(ctx: Context) -> set[str]:
    """Users not at the source, or already in a live shard of some wave."""
    if not ctx.control.exists():
        return set()
    with ctx.control.connect(autocommit=True) as c:
        moved = c.execute(f"SELECT user_key FROM {SCHEMA}.directory WHERE home <> %s", (ctx.spec.source_region,)).fetchall()
        busy = c.execute(
            f"SELECT su.user_key FROM {SCHEMA}.shard_user su JOIN {SCHEMA}.shard s USING (shard_id) WHERE s.state <> %s",
            (Phase.ROLLED_BACK.value,),
        ).fetchall()
    return {r[0] for r in moved} | {r[0] for r in busy}


def _interval(ctx: Context, since: datetime | None, until: datetime | None) -> tuple[list[sql.Composable], list]:
    root = ctx.spec.entity_graph.root
    where: list[sql.Composable] = []
    args: list = []
    if since is not None or until is not None:
        if root.created_at is None:
            raise SpecError("entity_graph.root.created_at is needed to select users by an interval")
        if since is not None:
            where.append(sql.SQL("{} >= %s").format(sql.Identifier(root.created_at)))
            args.append(since)
        if until is not None:
            where.append(sql.SQL("{} < %s").format(sql.Identifier(root.created_at)))
            args.append(until)
    return where, args


def _residencies(ctx: Context, since: datetime | None, until: datetime | None) -> dict[str | None, int]:
    """Users per stored residency value (as stored: the policy's own rule maps each value)."""
    g = ctx.spec.entity_graph
    where, args = _interval(ctx, since, until)
    q = sql.SQL("SELECT {}::text, count(*) FROM {}.{}").format(
        sql.Identifier(g.root.residency), sql.Identifier(g.schema_), sql.Identifier(g.root.table))
    if where:
        q = q + sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
    q = q + sql.SQL(" GROUP BY 1")
    with connect(ctx.source_dsn, autocommit=True) as c:
        return dict(c.execute(q, args).fetchall())


def _candidates(ctx: Context, since: datetime | None, until: datetime | None, values: list[str]):
    """(key, residency) of the users whose stored residency is one of `values`."""
    g = ctx.spec.entity_graph
    root = g.root
    where, args = _interval(ctx, since, until)
    where.append(sql.SQL("{}::text = ANY(%s::text[])").format(sql.Identifier(root.residency)))
    args.append(values)
    q = sql.SQL("SELECT {}::text, {}::text FROM {}.{} WHERE ").format(
        sql.Identifier(root.key), sql.Identifier(root.residency), sql.Identifier(g.schema_), sql.Identifier(root.table)
    ) + sql.SQL(" AND ").join(where)
    with connect(ctx.source_dsn) as c, c.cursor(name="migrator_plan") as cur:
        cur.itersize = 20000
        cur.execute(q, args)
        yield from cur


def _measure(ctx: Context, shards: list[ShardPlan]) -> None:
    """Rows per table for each shard, one pass per table at the source, and approximate
    bytes from each table's mean row size (zero for a table never analyzed)."""
    if not shards:
        return
    buf = io.StringIO()
    for i, s in enumerate(shards):
        for k in s.keys:
            buf.write(f"{k}\t{i}\n")
    with connect(ctx.source_dsn) as c:
        c.execute(sql.SQL("CREATE TEMP TABLE rm_keys (k {} NOT NULL, b int NOT NULL) ON COMMIT DROP").format(sql.SQL(ctx.key_type)))
        with c.cursor().copy("COPY rm_keys (k, b) FROM STDIN") as cp:
            cp.write(buf.getvalue())
        c.execute("ANALYZE rm_keys")
        for name, table in ctx.tables.items():
            (per_row,) = c.execute(sqlgen.mean_row_bytes(ctx.spec.entity_graph, table)).fetchone()
            for b, n in c.execute(sqlgen.count_by_group(ctx.spec.entity_graph, table, "rm_keys")).fetchall():
                shards[b].rows[name] = n
                shards[b].bytes += int(n * (per_row or 0))
        c.rollback()
    for s in shards:
        for name in ctx.tables:
            s.rows.setdefault(name, 0)


def plan(
    ctx: Context,
    wave: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    regions: list[str] | None = None,
    dry_run: bool = False,
) -> Plan:
    spec = ctx.spec
    for r in regions or []:
        if r not in spec.targets:
            raise SpecError(f"--region {r!r}: no policy entry sends users there (targets: {', '.join(spec.targets)})")
    ctx.tables  # reads and checks the source's tables
    # A wave always covers every target region, so a later `--region` run finds its
    # shards; `regions` only narrows what is returned.
    targets = spec.targets
    for r in targets:
        ctx.check_destination(r)

    if ctx.control.exists():
        existing = ctx.control.shards(wave=wave)
        if existing:
            out = [
                ShardPlan(s.shard_id, s.wave, s.name, s.region, s.idx, [], spec.copy_.batch_users, s.plan.get("rows", {}),
                          s.plan.get("approx_bytes", 0), recorded={"users": s.users, "batches": s.batches})
                for s in existing if not regions or s.region in regions
            ]
            return Plan(wave, out, {}, already_planned=True)

    taken = _taken(ctx)
    n = spec.sharding.shards_per_region
    groups: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    unplaced: collections.Counter[str] = collections.Counter()
    # Each stored residency value is mapped once; only the users of values that move are read.
    moving: list[str] = []
    for residency, count in _residencies(ctx, since, until).items():
        region = spec.region_of(residency)
        if region is None:
            unplaced["NULL" if residency is None else "unknown:" + residency.strip().upper()[:8]] += count
        elif region != spec.source_region and region in targets:
            moving.append(residency)
    for key, residency in _candidates(ctx, since, until, moving) if moving else ():
        if key in taken:
            continue
        groups[(spec.region_of(residency), shard_index(key, n))].append(key)

    shards = []
    for (region, idx), keys in sorted(groups.items()):
        name = shard_name(region, idx)
        shards.append(ShardPlan(shard_id(wave, name), wave, name, region, idx, ctx.sort_keys(keys), spec.copy_.batch_users))
    result = Plan(wave, shards, dict(unplaced))
    # Measuring reads the source; recording writes the control database: both at once.
    with ThreadPoolExecutor(max_workers=1) as pool:
        measured = pool.submit(_measure, ctx, shards)
        if dry_run:
            measured.result()
        else:
            _record(ctx, result, measured)
    result.shards = [s for s in shards if not regions or s.region in regions]
    return result


def _record(ctx: Context, p: Plan, measured: Future) -> None:
    """Membership first; each shard's row counts join its record once `measured` is done,
    in the same transaction."""
    ctl = ctx.control
    ctl.ensure()
    with ctl.connect() as c:
        c.execute("SELECT pg_advisory_xact_lock(hashtext('migrator:plan'))")
        if c.execute(f"SELECT 1 FROM {SCHEMA}.shard WHERE wave = %s LIMIT 1", (p.wave,)).fetchone():
            measured.result()
            return  # another planner won the race; its plan stands
        for s in p.shards:
            c.execute(
                f"INSERT INTO {SCHEMA}.shard (shard_id, wave, name, region, idx, state, users, batches, plan) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, '{}')",
                (s.shard_id, s.wave, s.name, s.region, s.idx, Phase.PLANNED.value, len(s.keys), len(s.batches)),
            )
            with c.cursor().copy(f"COPY {SCHEMA}.shard_user (shard_id, user_key, batch_no) FROM STDIN") as cp:
                for b, keys in enumerate(s.batches):
                    for k in keys:
                        cp.write_row((s.shard_id, k, b))
            c.execute(
                f"INSERT INTO {SCHEMA}.directory (user_key, home) SELECT user_key, %s FROM {SCHEMA}.shard_user "
                "WHERE shard_id = %s ON CONFLICT (user_key) DO NOTHING",
                (ctx.spec.source_region, s.shard_id),
            )
        measured.result()
        for s in p.shards:
            c.execute(f"UPDATE {SCHEMA}.shard SET plan = %s WHERE shard_id = %s", (json.dumps(s.summary()), s.shard_id))
            ctl.audit(c, s.shard_id, None, Phase.PLANNED.value, {"users": len(s.keys), "rows": s.rows, "batches": len(s.batches)})
        ctl.audit(c, None, None, None, {"event": "plan", "wave": p.wave, "shards": len(p.shards), "unplaced": p.unplaced})
