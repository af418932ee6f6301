"""Forms a wave's shards: which users move, from where, to which region, in which shard
and batch.

Every plan reconciles: the source's users whose residency the policy sends to a
destination (created in the interval, for a scheduled run), and at every other region the
users homed there whose residency, read at their home, the policy now sends elsewhere
(`residency`). A shard moves users between one pair of regions: `ie-02` moves users from
the source to ie, `ie-no-02` users homed at ie to no (a move again).

Membership is written to the control database once, so every later phase (and a rerun)
works on exactly the same users and batches. A wave that already exists is not planned
again: its shards are returned as they are.

The moving users are never held here: each region read streams (key, region, shard) of
each candidate straight into a temporary table of the control database, which leaves out
the users not homed there, in a move under way or held, numbers the batches in key order
and records the membership. So planning takes the same memory for a thousand users as for
ten million.

A shard's batches hold at most `copy.batch_users` users each, as evenly as they divide,
and their number is a multiple of the lanes that copy, roll back and purge them
(`copy.workers`): three batches on two lanes would leave one lane idle for the last
third of every phase.

Each shard's rows per table are estimated, not counted: counting them exactly is a pass
over every table of the graph, about a fifth of the whole copy's time. A fixed sample of
each shard's users (MEASURE_SAMPLE, picked by a hash of the key, which is unrelated to
the rows a user owns) is streamed to the source and their rows counted through the
owner-key indexes; the count is scaled by users / sampled. A shard no larger than the
sample is counted exactly. The estimate sizes the work (how the verifier spreads tables
over its connections, what `status` shows before a batch lands); what was copied and
verified is counted exactly by those phases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from psycopg import sql

from migrator import hooks
from migrator.control.context import INTEGER_TYPES, Context
from migrator.control.state import State
from migrator.control.store import SCHEMA, shard_id
from migrator.errors import SpecError, StateConflict, describe
from migrator.partition import shard_name
from migrator.phases.purge_checks import check_policy
from migrator.phases.residency import leaving_everywhere, load, residencies
from migrator.stores import is_transient, replica, sqlgen
from migrator.stores.postgres import Conn, connect, pipe

log = logging.getLogger("migrator.phases.plan")


MEASURE_SAMPLE = 2000  # users per shard whose rows are counted to estimate the shard's rows


def batch_count(users: int, batch_users: int, lanes: int) -> int:
    """Batches of at most `batch_users`, rounded up to a multiple of `lanes` (never more
    batches than users)."""
    return min(users, math.ceil(math.ceil(users / batch_users) / lanes) * lanes)


@dataclass
class ShardPlan:
    shard_id: str
    wave: str
    name: str
    region: str
    idx: int
    users: int
    batches: int
    rows: dict[str, int] = field(default_factory=dict)  # estimated (see the module's note)
    bytes: int = 0
    sampled: int = 0  # users whose rows were counted for `rows`; equal to `users` when exact
    origin: str = ""  # the region its users move from (the source for a first move)

    @property
    def pair(self) -> str:
        return f"{self.origin}→{self.region}"

    def summary(self) -> dict:
        return {
            "shard_id": self.shard_id,
            "name": self.name,
            "region": self.region,
            "from": self.origin,
            "users": self.users,
            "batches": self.batches,
            "rows": self.rows,
            "rows_exact": self.sampled == self.users,
            "rows_sampled_users": self.sampled,
            "approx_bytes": self.bytes,
        }


@dataclass
class Plan:
    wave: str
    shards: list[ShardPlan]
    unplaced: dict[str, int]  # residency code (or 'NULL') -> users left where they are
    already_planned: bool = False
    warnings: list[str] = field(default_factory=list)
    staying: dict[str, int] = field(default_factory=dict)  # region -> users whose policy keeps them there

    @property
    def moves(self) -> dict[str, int]:
        """Users moving, by from→to pair."""
        out: dict[str, int] = {}
        for s in self.shards:
            out[s.pair] = out.get(s.pair, 0) + s.users
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        return {
            "wave": self.wave,
            "already_planned": self.already_planned,
            "moves": self.moves,
            "shards": [s.summary() for s in self.shards],
            "unplaced_users": self.unplaced,
            "staying_users": self.staying,
            "warnings": self.warnings,
        }


def _measure(ctx: Context, m: Conn, shards: dict[int, ShardPlan]) -> None:
    """Estimated rows and bytes per table for each shard from its sampled users (rm_keys at
    the source: key, shard number), scaled up to all of its users when it was sampled."""
    m.execute("ANALYZE rm_keys")
    for b, n in m.execute("SELECT b, count(*) FROM rm_keys GROUP BY b").fetchall():
        shards[b].sampled = n
    for name, table in ctx.tables.items():
        for b, n, size in m.execute(sqlgen.count_by_group(ctx.spec.entity_graph, table, "rm_keys")).fetchall():
            s = shards[b]
            scale = 1.0 if s.sampled == s.users else s.users / s.sampled
            s.rows[name] = round(n * scale)
            s.bytes += round(int(size) * scale)
    for s in shards.values():
        for name in ctx.tables:
            s.rows.setdefault(name, 0)


def _measure_all(ctx: Context, readers: list[Conn], shards: dict[int, ShardPlan]) -> None:
    for m in readers:
        _measure(ctx, m, shards)


def _same_graph(ctx: Context, done: Plan) -> None:
    """A planned wave's shards were counted over the graph's tables of that time; a spec
    whose graph has other tables now would copy and verify other rows than were planned."""
    for s in done.shards:
        if s.rows and set(s.rows) != set(ctx.tables):
            added, gone = sorted(set(ctx.tables) - set(s.rows)), sorted(set(s.rows) - set(ctx.tables))
            raise SpecError(
                f"wave {done.wave!r} was planned over other tables than the spec's entity graph has now"
                + (f" (added: {', '.join(added)})" if added else "")
                + (f" (removed: {', '.join(gone)})" if gone else "")
                + "; plan a new wave for the new graph"
            )


def _existing(ctx: Context, wave: str, regions: list[str] | None) -> Plan | None:
    if not ctx.control.exists():
        return None
    found = ctx.control.shards(wave=wave)
    if not found:
        return None
    return Plan(
        wave,
        [
            ShardPlan(
                s.shard_id,
                s.wave,
                s.name,
                s.region,
                s.idx,
                s.users,
                s.batches,
                s.plan.get("rows", {}),
                s.plan.get("approx_bytes", 0),
                s.plan.get("rows_sampled_users", s.users),
                ctx.origin(s),
            )
            for s in found
            if not regions or s.region in regions
        ],
        {},
        already_planned=True,
    )


def plan(
    ctx: Context,
    wave: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    regions: list[str] | None = None,
    dry_run: bool = False,
    strict: bool = False,
    only_regions: bool = False,
) -> Plan:
    spec = ctx.spec
    for r in regions or []:
        if r not in spec.targets:
            raise SpecError(f"--region {r!r}: no policy entry sends users there (targets: {', '.join(spec.targets)})")
    _ = ctx.tables  # reads and checks the source's tables
    ctx.check_unnamed_tables()  # no table holding users' rows may be left behind unnamed
    if spec.purge is not None:  # a rule the purge could not apply is found now, not at the purge
        check_policy(ctx)
    # A wave covers every target region, so a later `--region` run finds its shards;
    # `regions` only narrows what is returned. A wave that no later run will name (a
    # manual Airflow run's own) plans only `regions` (`only_regions`): the others' users
    # would otherwise sit in shards nothing runs, and every later wave would pass them by.
    targets = sorted(spec.targets)
    # A destination that cannot be reached now does not stop the plan: its shards are
    # planned and wait for it (their copy fails, resumable, until it is back), and the other
    # regions go on. A destination whose schema differs is a spec problem: nothing is planned.
    warnings: list[str] = []
    reachable = []
    for r in targets:
        try:
            ctx.check_destination(r)
            reachable.append(r)
        except Exception as exc:
            if not is_transient(exc):
                raise
            warnings.append(
                f"destination {r} cannot be reached ({describe(exc)}); its shards are planned and wait for it"
            )
            log.warning(warnings[-1])
    ctx.check_privileges(reachable)
    missing = ctx.index_warnings(reachable)
    if missing and (strict or spec.require_indexes):
        raise SpecError("indexes missing (strict): " + "; ".join(missing))
    warnings += missing + ctx.lookalike_warnings()
    unplaced, staying, moving = residencies(ctx, since, until)
    again = leaving_everywhere(ctx, warnings)
    if only_regions and regions:
        moving = {value: r for value, r in moving.items() if r in regions}
        again = {home: {v: r for v, r in values.items() if r in regions} for home, values in again.items()}
    if (done := _existing(ctx, wave, regions)) is not None:
        _same_graph(ctx, done)
        done.warnings, done.unplaced, done.staying = warnings, unplaced, staying
        return done

    ctl = ctx.control
    if not dry_run:
        ctl.ensure()
    size = spec.copy_.batch_users
    with ctl.connect() as c:
        if not dry_run:
            c.execute("SELECT pg_advisory_xact_lock(hashtext('migrator:plan'))")
            if c.execute(f"SELECT 1 FROM {SCHEMA}.shard WHERE wave = %s LIMIT 1", (wave,)).fetchone():
                c.rollback()  # another planner won the race; its plan stands
                won = _existing(ctx, wave, regions)
                if won is None:  # pragma: no cover - the winner's shards are there, or it rolled back
                    raise StateConflict(f"wave {wave}: another planner's plan vanished; plan again")
                won.warnings = warnings
                return won
        load(ctx, c, since, until, moving, again)
        src = spec.source_region
        shards: dict[int, ShardPlan] = {}  # numbered in (first moves first, origin, region, index) order
        for origin, region, idx, users in c.execute(
            "SELECT origin, region, idx, count(*) FROM rm_plan GROUP BY 1, 2, 3 ORDER BY origin <> %s, 1, 2, 3", (src,)
        ):
            # a move again names its origin too: ie-no-02 moves users homed at ie to no
            name = shard_name(region if origin == src else f"{origin}-{region}", idx)
            shards[len(shards)] = ShardPlan(
                shard_id(wave, name),
                wave,
                name,
                region,
                idx,
                users,
                batch_count(users, size, spec.copy_.lanes),
                origin=origin,
            )
        result = Plan(wave, list(shards.values()), unplaced, warnings=warnings, staying=staying)
        # Measuring reads each origin; recording writes the control database: both at once.
        with contextlib.ExitStack() as stack:
            readers = [
                _sample(ctx, c, stack.enter_context(connect(ctx.dsn(o), keyed=True)), shards, o)
                for o in sorted({s.origin for s in shards.values()})
            ]
            with ThreadPoolExecutor(max_workers=1) as pool:
                measured = pool.submit(_measure_all, ctx, readers, shards)
                if dry_run:
                    measured.result()
                    c.rollback()
                else:
                    _record(ctx, c, result, measured)
            for m in readers:
                m.rollback()
    result.shards = [s for s in result.shards if not regions or s.region in regions]
    return result


def _sample(ctx: Context, c: Conn, m: Conn, shards: dict[int, ShardPlan], origin: str) -> Conn:
    """Into rm_keys at `m` (the origin's server): a fixed sample of each of the origin's
    shards' users (MEASURE_SAMPLE, by a hash of the key) with the shard's number."""
    mine = {b: s for b, s in shards.items() if s.origin == origin}
    m.execute(
        sql.SQL("CREATE TEMP TABLE rm_keys (k {} NOT NULL, b int NOT NULL) ON COMMIT DROP").format(
            sql.SQL(ctx.key_type)
        )
    )
    pipe(
        c,
        "COPY (SELECT user_key, m.b FROM (SELECT user_key, origin, region, idx, "
        "row_number() OVER (PARTITION BY origin, region, idx ORDER BY hashtext(user_key)) AS r FROM rm_plan) s "
        "JOIN unnest(%s::text[], %s::int[], %s::int[]) AS m(region, idx, b) USING (region, idx) "
        "WHERE s.origin = %s AND r <= %s) TO STDOUT",
        ([s.region for s in mine.values()], [s.idx for s in mine.values()], list(mine), origin, MEASURE_SAMPLE),
        m,
        "COPY rm_keys (k, b) FROM STDIN",
    )
    return m


def _record(ctx: Context, c: Conn, p: Plan, measured: Future) -> None:
    """Membership first, batches numbered in key order; each shard's row counts join its
    record once `measured` is done, in the same transaction."""
    ctl = ctx.control
    for s in p.shards:
        c.execute(
            f"INSERT INTO {SCHEMA}.shard (shard_id, wave, name, region, idx, state, users, batches, plan, origin) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, '{}', %s)",
            (s.shard_id, s.wave, s.name, s.region, s.idx, State.PLANNED.value, s.users, s.batches, s.origin),
        )
    order = sql.SQL("p.user_key::numeric" if ctx.key_type in INTEGER_TYPES else 'p.user_key COLLATE "C"')
    # Every membership row names a shard inserted just above: its foreign key's per-row
    # check cannot fail, and it is about a fifth of the plan's time (replica.py).
    skip = ctx.spec.copy_.skip_edge_checks and replica.only_key_to(c, f"{SCHEMA}.shard_user", f"{SCHEMA}.shard")
    if skip:
        replica.skipping(c, True)
    c.execute(
        sql.SQL(
            f"INSERT INTO {SCHEMA}.shard_user (shard_id, user_key, batch_no) "
            # the shard's users in key order, cut into its batches as evenly as they go
            "SELECT m.shard_id, p.user_key, "
            "((row_number() OVER (PARTITION BY p.origin, p.region, p.idx ORDER BY {}) - 1) * m.batches "
            "/ count(*) OVER (PARTITION BY p.origin, p.region, p.idx))::int "
            "FROM rm_plan p JOIN unnest(%s::int[], %s::text[], %s::text[], %s::int[], %s::text[]) "
            "AS m(batches, origin, region, idx, shard_id) "
            "USING (origin, region, idx)"
        ).format(order),
        (
            [s.batches for s in p.shards],
            [s.origin for s in p.shards],
            [s.region for s in p.shards],
            [s.idx for s in p.shards],
            [s.shard_id for s in p.shards],
        ),
    )
    if skip:
        replica.skipping(c, False)
    hooks.point("membership written")  # inside the plan's transaction: a test kills it here
    c.execute(
        f"INSERT INTO {SCHEMA}.directory (user_key, home) SELECT user_key, %s FROM rm_plan "
        "ON CONFLICT (user_key) DO NOTHING",
        (ctx.spec.source_region,),
    )
    measured.result()
    for s in p.shards:
        c.execute(f"UPDATE {SCHEMA}.shard SET plan = %s WHERE shard_id = %s", (json.dumps(s.summary()), s.shard_id))
        ctl.audit(c, s.shard_id, None, State.PLANNED.value, {"users": s.users, "rows": s.rows, "batches": s.batches})
    ctl.audit(c, None, None, None, {"event": "plan", "wave": p.wave, "shards": len(p.shards), "unplaced": p.unplaced})
