"""Which users move, read where they live: each stored residency value is mapped once by
the policy, then only the users of the values that move are streamed (as the plan's
candidates). At the source that is every user the policy sends to a destination; at every
other region it is the users whose residency, read at their home (which owns their writes),
the policy now sends elsewhere: people who moved, a profile corrected, a country remapped
or a region drained. The plan keeps those the directory homes there."""

from __future__ import annotations

import collections
import logging
from datetime import datetime

from psycopg import sql

from migrator.control.context import Context
from migrator.control.state import IN_FLIGHT
from migrator.control.store import SCHEMA
from migrator.errors import SpecError, describe
from migrator.partition import shard_index_sql
from migrator.stores import is_transient
from migrator.stores.postgres import Conn, connect, pipe

log = logging.getLogger("migrator.phases.plan")


def interval(ctx: Context, since: datetime | None, until: datetime | None) -> tuple[list[sql.Composable], list]:
    """The conditions (and their arguments) of the users an interval reads at the source:
    those created in it, and with `root.updated_at` those whose row changed in it too (a
    long-standing user whose country changed)."""
    root = ctx.spec.entity_graph.root
    if since is None and until is None:
        return [], []
    if root.created_at is None:
        raise SpecError("entity_graph.root.created_at is needed to select users by an interval")
    cols = [root.created_at] + ([root.updated_at] if root.updated_at is not None else [])
    either: list[sql.Composable] = []
    args: list = []
    for col in cols:
        bounds = [(">=", since), ("<", until)]
        either.append(
            sql.SQL("({})").format(
                sql.SQL(" AND ").join(
                    sql.SQL("{} {} %s").format(sql.Identifier(col), sql.SQL(op)) for op, at in bounds if at is not None
                )
            )
        )
        args += [at for _, at in bounds if at is not None]
    return [sql.SQL("({})").format(sql.SQL(" OR ").join(either))], args


def residencies(
    ctx: Context, since: datetime | None = None, until: datetime | None = None
) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """(unplaced, staying, moving) for the users created in the interval: users whose
    residency the policy does not place, by code; users the policy keeps at the source, by
    region; and the stored residency values that move, with their region. Each stored value
    is mapped once; only the users of values that move are read later."""
    spec = ctx.spec
    unplaced: collections.Counter[str] = collections.Counter()
    staying: collections.Counter[str] = collections.Counter()
    moving: dict[str, str] = {}
    for residency, count in _residencies(ctx, since, until).items():
        region = spec.region_of(residency)
        if region is None:
            unplaced["NULL" if residency is None else "unknown:" + residency.strip().upper()[:8]] += count
        elif region == spec.source_region:
            staying[region] += count
        elif residency is not None and region in spec.targets:
            moving[residency] = region
    return dict(unplaced), dict(staying), moving


def leaving(ctx: Context, home: str) -> dict[str, str]:
    """The stored residency values at `home` (a region other than the source) that the
    policy sends to another region, with that region: the values of the users who are to
    move again. Rows there of users homed elsewhere (a copy kept until its purge) are among
    them; the plan keeps the users the directory homes there. A region without the graph's
    root table homes nobody."""
    g = ctx.spec.entity_graph
    with connect(ctx.dsn(home), autocommit=True) as c:
        root = c.execute("SELECT to_regclass(%s)", (sql.Identifier(g.schema_, g.root.table).as_string(c),))
        if root.fetchone()[0] is None:
            return {}
        q, args = _per_value(ctx, None, None)
        stored = [v for v, _ in c.execute(q, args).fetchall()]
    out: dict[str, str] = {}
    for residency in stored:
        region = ctx.spec.region_of(residency)
        if residency is not None and region is not None and region != home:
            out[residency] = region
    return out


def _residencies(ctx: Context, since: datetime | None, until: datetime | None) -> dict[str | None, int]:
    """Users per stored residency value at the source (as stored: the policy's own rule
    maps each value)."""
    q, args = _per_value(ctx, since, until)
    with connect(ctx.source_dsn, autocommit=True) as c:
        return dict(c.execute(q, args).fetchall())


def _per_value(ctx: Context, since: datetime | None, until: datetime | None) -> tuple[sql.Composed, list]:
    """The query of users per stored residency value (created in the interval)."""
    g = ctx.spec.entity_graph
    where, args = interval(ctx, since, until)
    q = sql.SQL("SELECT {}::text, count(*) FROM {}.{}").format(
        sql.Identifier(g.root.residency), sql.Identifier(g.schema_), sql.Identifier(g.root.table)
    )
    if where:
        q = q + sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
    return q + sql.SQL(" GROUP BY 1"), args


def candidates(
    ctx: Context, since: datetime | None, until: datetime | None, moving: dict[str, str]
) -> tuple[sql.Composed, list]:
    """A COPY of (key, region, shard index) of the users whose stored residency moves (at
    the source, or at the region the caller reads it from)."""
    g = ctx.spec.entity_graph
    root = g.root
    where, args = interval(ctx, since, until)
    where.append(sql.SQL("{}::text = ANY(%s::text[])").format(sql.Identifier(root.residency)))
    values = sorted(moving)
    key_text = sql.SQL("{}::text").format(sql.Identifier(root.key))
    q = sql.SQL(
        "COPY (SELECT {}, (%s::text[])[array_position(%s::text[], {}::text)], {} FROM {}.{} WHERE {}) TO STDOUT"
    ).format(
        key_text,
        sql.Identifier(root.residency),
        shard_index_sql(key_text, ctx.spec.sharding.shards_per_region),
        sql.Identifier(g.schema_),
        sql.Identifier(root.table),
        sql.SQL(" AND ").join(where),
    )
    return q, [[moving[v] for v in values], values, *args, values]


def leaving_everywhere(ctx: Context, warnings: list[str]) -> dict[str, dict[str, str]]:
    """Per region other than the source, the residency values stored there that the policy
    sends elsewhere (`residency.leaving`). A region that cannot be reached now is read at
    the next run; its users stay where they are until then (a warning says so)."""
    out: dict[str, dict[str, str]] = {}
    for home in sorted(r for r in ctx.spec.regions if r != ctx.spec.source_region):
        try:
            out[home] = leaving(ctx, home)
        except Exception as exc:
            if not is_transient(exc):
                raise
            warnings.append(
                f"region {home} cannot be reached ({describe(exc)}); whether its users are to move again is "
                "read at the next run"
            )
            log.warning(warnings[-1])
    return out


def load(
    ctx: Context,
    c: Conn,
    since: datetime | None,
    until: datetime | None,
    moving: dict[str, str],
    leaving: dict[str, dict[str, str]],
) -> None:
    """Fill the temporary table rm_plan (user_key, region, idx, origin) with the users to
    move: at the source, those whose residency moves (created in the interval); at every
    other region, those whose residency the policy now sends elsewhere (`leaving`). Kept
    are users homed where they were read (at the source also users the directory does not
    know yet), in no move under way and not held. A user may move back to a region an
    earlier move of theirs left (`move_back`)."""
    src = ctx.spec.source_region
    c.execute(
        "CREATE TEMP TABLE rm_plan (user_key text NOT NULL, region text NOT NULL, idx int NOT NULL, "
        "origin text NOT NULL DEFAULT '') ON COMMIT DROP"
    )
    reads = [(src, since, until, moving)] + [(home, None, None, values) for home, values in leaving.items()]
    for home, a, b, values in reads:
        if values:
            q, args = candidates(ctx, a, b, values)
            with connect(ctx.dsn(home)) as there:
                pipe(there, q, args, c, "COPY rm_plan (user_key, region, idx) FROM STDIN")
            c.execute("UPDATE rm_plan SET origin = %s WHERE origin = ''", (home,))
    c.execute("ANALYZE rm_plan")
    if c.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.shard_user",)).fetchone()[0]:
        c.execute(
            f"DELETE FROM rm_plan p USING {SCHEMA}.directory d WHERE d.user_key = p.user_key AND d.home <> p.origin"
        )
        c.execute(
            f"DELETE FROM rm_plan p WHERE p.origin <> %s AND NOT EXISTS "
            f"(SELECT 1 FROM {SCHEMA}.directory d WHERE d.user_key = p.user_key)",
            (src,),
        )
        c.execute(
            f"DELETE FROM rm_plan p USING {SCHEMA}.shard_user su JOIN {SCHEMA}.shard s USING (shard_id) "
            "WHERE su.user_key = p.user_key AND s.state = ANY(%s)",
            ([x.value for x in IN_FLIGHT],),
        )
    else:  # nothing has moved yet: every user is homed at the source
        c.execute("DELETE FROM rm_plan WHERE origin <> %s", (src,))
    if c.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.held_users",)).fetchone()[0]:
        c.execute(f"DELETE FROM rm_plan p USING {SCHEMA}.held_users h WHERE h.user_key = p.user_key")
