"""Which users move, read at the source: each stored residency value is mapped once by the
policy, then only the users of the values that move are streamed (as the plan's candidates)."""

from __future__ import annotations

import collections
from datetime import datetime

from psycopg import sql

from migrator.control.context import Context
from migrator.errors import SpecError
from migrator.partition import shard_index_sql
from migrator.stores.postgres import connect


def interval(ctx: Context, since: datetime | None, until: datetime | None) -> tuple[list[sql.Composable], list]:
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


def _residencies(ctx: Context, since: datetime | None, until: datetime | None) -> dict[str | None, int]:
    """Users per stored residency value (as stored: the policy's own rule maps each value)."""
    g = ctx.spec.entity_graph
    where, args = interval(ctx, since, until)
    q = sql.SQL("SELECT {}::text, count(*) FROM {}.{}").format(
        sql.Identifier(g.root.residency), sql.Identifier(g.schema_), sql.Identifier(g.root.table)
    )
    if where:
        q = q + sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
    q = q + sql.SQL(" GROUP BY 1")
    with connect(ctx.source_dsn, autocommit=True) as c:
        return dict(c.execute(q, args).fetchall())


def candidates(
    ctx: Context, since: datetime | None, until: datetime | None, moving: dict[str, str]
) -> tuple[sql.Composed, list]:
    """A COPY of (key, region, shard index) of the users whose stored residency moves."""
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
