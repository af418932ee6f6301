"""A shard's rows as one side holds them, digested inside that side's database: per table
and batch of users (count, sum of canonical row hashes; see `sqlgen`), in one pass per
table, the tables shared out between a few connections. The verify compares two sides'
digests; the cutover keeps the source copy's as it froze, which the purge compares again."""

from __future__ import annotations

import hashlib
import queue
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from psycopg import sql

from migrator.control.context import Context
from migrator.stores import sqlgen
from migrator.stores.catalog import Table
from migrator.stores.postgres import connect
from migrator.throttle import Throttle

Aggregate = dict[tuple[str, int], tuple[int, str]]  # (table, batch) -> (rows, digest)


@dataclass(frozen=True)
class CopyDigest:
    """One side's copy of a shard's rows: its digest, and rows and digest per table."""

    digest: str
    tables: Mapping[str, tuple[int, str]]
    columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # hashed, per table (when known)
    # later shards that took some of the shard's users back to where this copy is: their
    # rows there are that shard's now, and are left out (see `phases.move_back`)
    without: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        agg: dict[tuple[str, int], tuple[int, str]],
        columns: Mapping[str, tuple[str, ...]] | None = None,
        without: tuple[str, ...] = (),
    ) -> CopyDigest:
        tables = {
            t: (
                sum(n for (t2, _), (n, _) in agg.items() if t2 == t),
                shard_digest({k: v for k, v in agg.items() if k[0] == t}),
            )
            for t in sorted({t for t, _ in agg})
        }
        return cls(shard_digest(agg), tables, dict(columns or {}), tuple(without))

    def record(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "tables": {
                t: {"rows": n, "digest": d, **({"columns": list(self.columns[t])} if t in self.columns else {})}
                for t, (n, d) in self.tables.items()
            },
            **({"without": list(self.without)} if self.without else {}),
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> CopyDigest:
        return cls(
            r["digest"],
            {t: (v["rows"], v["digest"]) for t, v in r["tables"].items()},
            {t: tuple(v["columns"]) for t, v in r["tables"].items() if "columns" in v},
            tuple(r.get("without", ())),
        )

    def differing(self, other: CopyDigest) -> list[str]:
        """The tables whose rows differ between the two (by count, or else by content)."""
        return [
            t for t in sorted(self.tables.keys() | other.tables.keys()) if self.tables.get(t) != other.tables.get(t)
        ]


def digest_copy(ctx: Context, sid: str, dsn: str, like: CopyDigest | None = None) -> CopyDigest:
    """The shard's rows as one side holds them now, read as the verify reads a side; with
    `like`, over the columns `like` hashed (a column added since is left out, so a schema
    change made everywhere does not read as a change of the rows) and without the users
    `like` leaves out. A column `like` hashed that is gone raises `ColumnsGone`."""
    hashed = hashed_columns(ctx, like)
    without = like.without if like is not None else ()
    agg = digest_parts(ctx, sid, dsn, hashed, left_out(ctx, sid, without))
    return CopyDigest.of(agg, {t: tuple(table.names) for t, table in hashed.items()}, without)


def left_out(ctx: Context, sid: str, later: tuple[str, ...]) -> list[str]:
    """The shard's users that the `later` shards took back to its origin."""
    if not later:
        return []
    taken = ctx.control.taken_back(sid, ctx.origin(ctx.control.shard(sid)))
    return sorted({k for s in later for k in taken.get(s, [])})


def digest_parts(
    ctx: Context, sid: str, dsn: str, hashed: Mapping[str, Table], without: Sequence[str], apart: Sequence[str] = ()
) -> Aggregate:
    """Per (table, batch) the rows and sum of their hashes of the shard's users but
    `without`; the users `apart` counted apart, under batch -1 - b."""
    shard = ctx.control.shard(sid)
    est = shard.plan.get("rows", {})
    order = largest_first(ctx, list(ctx.tables), est)
    n = max(1, min(ctx.spec.verify.workers, len(order)))
    work: queue.SimpleQueue[str] = queue.SimpleQueue()
    for t in order:
        work.put(t)
    agg: dict[tuple[str, int], tuple[int, str]] = {}
    with ThreadPoolExecutor(max_workers=n) as pool:
        for f in [
            pool.submit(aggregate, ctx, dsn, sid, work, shard.users, est, tables=hashed, without=without, apart=apart)
            for _ in range(n)
        ]:
            agg.update(f.result())
    return agg


class ColumnsGone(Exception):
    """A column an earlier digest hashed is no longer in its table."""


def hashed_columns(ctx: Context, like: CopyDigest | None) -> dict[str, Table]:
    """The graph's tables as a digest reads them: every column, or those `like` hashed."""
    out = {}
    for name, table in ctx.tables.items():
        want = like.columns.get(name) if like is not None else None
        if want is not None:
            gone = sorted(set(want) - set(table.names))
            if gone:
                raise ColumnsGone(f"table {name}: column(s) {', '.join(gone)} hashed earlier are gone")
            table = replace(table, columns=tuple(c for c in table.columns if c.name in want))
        out[name] = table
    return out


def shard_digest(agg: dict[tuple[str, int], tuple[int, str]]) -> str:
    text = "\n".join(f"{t}|{b}|{n}|{s}" for (t, b), (n, s) in sorted(agg.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def build_rows(ctx: Context, users: int, rows: dict[str, int], table: str) -> int:
    """The most rows a hash join of the table's one-pass aggregate holds: the shard's users,
    or the shard's rows of a parent table on the table's way to its owner."""
    parents = (
        [hop.parent for hop in ctx.spec.entity_graph.path(table)] if table != ctx.spec.entity_graph.root.table else []
    )
    return max([users] + [rows.get(p, 0) for p in parents])


def aggregate(
    ctx: Context,
    dsn: str,
    sid: str,
    work: queue.SimpleQueue[str],
    users: int = 0,
    rows: dict[str, int] | None = None,
    throttle: Throttle | None = None,
    tables: Mapping[str, Table] | None = None,
    without: Sequence[str] = (),
    apart: Sequence[str] = (),
) -> dict[tuple[str, int], tuple[int, str]]:
    """One connection to one side: load the shard's keys, then digest tables taken from the
    side's shared queue until it is empty, each in a transaction of its own (a statement
    sees its own snapshot either way), so a `throttle`'s pause between them is spent
    outside any transaction."""
    out: dict[tuple[str, int], tuple[int, str]] = {}
    with connect(dsn) as c:
        # the session's own table, gone when the connection closes
        c.execute(sql.SQL("CREATE TEMP TABLE rm_keys (k {} NOT NULL, b int NOT NULL)").format(sql.SQL(ctx.key_type)))
        ctx.control.send_members(sid, c, "rm_keys")  # streamed: the shard's keys are never held here
        if without:
            c.execute("DELETE FROM rm_keys WHERE k::text = ANY(%s)", (list(without),))
        if apart:
            c.execute("UPDATE rm_keys SET b = -1 - b WHERE k::text = ANY(%s)", (list(apart),))
        c.execute("ANALYZE rm_keys")
        c.commit()
        while True:
            try:
                name = work.get_nowait()
            except queue.Empty:
                break
            if throttle is not None:
                throttle.wait()
            sqlgen.one_pass_settings(c)
            sqlgen.set_hash_mb(c, sqlgen.hash_mb(build_rows(ctx, users, rows or {}, name), ctx.spec.verify.max_hash_mb))
            q = sqlgen.digest_by_batch(ctx.spec.entity_graph, (tables or ctx.tables)[name], "rm_keys")
            read = 0
            for b, n, s in c.execute(q).fetchall():
                out[(name, b)] = (n, s)
                read += n
            c.commit()
            if throttle is not None:
                throttle.done(read)
    return out


def largest_first(ctx: Context, tables: list[str], rows: dict[str, int]) -> list[str]:
    """Tables by their estimated cost, the costliest first: each connection takes the next
    table when it is done with one, so a side's connections finish close together whatever
    the sizes (a table joined through its parents costs more per row)."""
    g = ctx.spec.entity_graph
    return sorted(tables, key=lambda t: (-rows.get(t, 0) * (1 + sqlgen.ownership(g, t).joined), t))
