"""The hand-written floors the tool is measured against: what a user would write by hand to
do the same work (the raw `psql \\copy` pipes, alone and in parallel, with and without the
destination's triggers; a pass of in-database checksums on both sides; the purge as a DBA
would run it, alone and with the tool's lanes and recheck)."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from migrator.control.context import Context
from migrator.stores import sqlgen

TABLES = ["users", "videos", "comments", "login_events", "devices"]


def raw_pipe(ctx: Context, psql: str, src: str, dst: str, region: str) -> float:
    codes = [c for c, r in ctx.spec.policy.items() if r == region]
    t0 = time.perf_counter()
    for name in ctx.tables:
        own = sqlgen.ownership(ctx.spec.entity_graph, name)
        q = psycopg.sql.SQL(
            "SELECT t0.* FROM {} WHERE {} IN (SELECT user_id FROM users WHERE country_code = ANY({}))"
        ).format(own.from_, own.owner, psycopg.sql.Literal(codes))
        with psycopg.connect(src) as c:
            text = q.as_string(c)
        cmd = (
            f"{psql} '{src}' -qc \"\\copy ({text}) TO STDOUT (FORMAT binary)\" | "
            f"{psql} '{dst}' -qc \"\\copy {name} FROM STDIN (FORMAT binary)\""
        )
        subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)
    return time.perf_counter() - t0


def parallel_pipe(ctx: Context, psql: str, src: str, dst: str, region: str, workers: int) -> float:
    """What a user would write by hand to match the tool's `copy.workers`: that many raw
    pipes at once, each moving every table (parents first, as the foreign keys need) for
    its share of the users (user_id modulo the workers)."""

    codes = [c for c, r in ctx.spec.policy.items() if r == region]
    texts: list[list[tuple[str, str]]] = []
    with psycopg.connect(src) as c:
        for k in range(workers):
            lane = []
            for name in ctx.tables:
                own = sqlgen.ownership(ctx.spec.entity_graph, name)
                q = psycopg.sql.SQL(
                    "SELECT t0.* FROM {} WHERE {} IN (SELECT user_id FROM users WHERE country_code = ANY({}) "
                    "AND user_id % {} = {})"
                ).format(own.from_, own.owner, psycopg.sql.Literal(codes), workers, k)
                lane.append((name, q.as_string(c)))
            texts.append(lane)

    def run_lane(lane: list[tuple[str, str]]) -> None:
        for name, text in lane:
            cmd = (
                f"{psql} '{src}' -qc \"\\copy ({text}) TO STDOUT (FORMAT binary)\" | "
                f"{psql} '{dst}' -qc \"\\copy {name} FROM STDIN (FORMAT binary)\""
            )
            subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run_lane, texts))
    return time.perf_counter() - t0


def row_of(c: psycopg.Connection, query: str, args: Any = None) -> tuple:
    """The one row a query returns (an aggregate's, a RETURNING's)."""
    r = c.execute(query, args).fetchone()
    assert r is not None, query
    return r


def unchecked(dsn: str) -> str:
    """The same database, every session with its triggers skipped (foreign-key checks among
    them): what a hand-written pipe that trusts its input could do."""
    return dsn + ("&" if "?" in dsn else "?") + "options=-csession_replication_role%3Dreplica"


def left(src: str) -> dict[str, int]:
    """Rows per table, and rows not yet pseudonymised in the pseudonymised tables."""
    with psycopg.connect(src) as c:
        out = {t: row_of(c, f"SELECT count(*) FROM {t}")[0] for t in TABLES}
        out["users in clear"] = row_of(c, "SELECT count(*) FROM users WHERE email NOT LIKE 'pz1_%'")[0]
        out["logins in clear"] = row_of(
            c,
            # (the seeded IPv6 addresses are documentation addresses already)
            "SELECT count(*) FROM login_events WHERE family(ip) = 4 AND NOT ip <<= inet '240.0.0.0/4'",
        )[0]
    return out


def _purge_statements(lane: str = "") -> list[str]:
    """The hand-written purge's statements, for the users `lane` further selects (SQL on
    user_id; empty: every EU user)."""
    eu = f"(SELECT user_id FROM users WHERE country_code = ANY(%(codes)s){lane})"
    return [
        f"DELETE FROM devices WHERE user_id IN {eu}",
        f"DELETE FROM comments c USING videos v WHERE c.video_id = v.video_id AND v.user_id IN {eu}",
        f"DELETE FROM videos WHERE user_id IN {eu}",
        "UPDATE login_events SET ip = CASE WHEN family(ip) = 4 THEN inet '240.0.0.1' ELSE inet '2001:db8::1' END "
        f"WHERE user_id IN {eu}",
        "UPDATE users SET email = 'pz1_' || md5(email), display_name = 'pz1_' || md5(display_name) "
        f"WHERE country_code = ANY(%(codes)s){lane}",
    ]


def raw_purge(src: str, codes: list[str]) -> float:
    """What a DBA would run by hand to retire the same users' source copy: one statement per
    table over all of them in one transaction, the rows the spec deletes deleted and the
    columns it pseudonymises overwritten with unkeyed values of the same shape (the same
    row versions, index entries and WAL as the tool's purge, none of its checks)."""
    t0 = time.perf_counter()
    with psycopg.connect(src) as c:
        for q in _purge_statements():
            c.execute(q, {"codes": codes})
    return time.perf_counter() - t0


def checksums(ctx: Context, dsn: str, codes: list[str]) -> float:
    """One pass of in-database checksums over the moving users' rows at `dsn`: per table, the
    count and the sum of the rows' hashes (the tool's own row hash, `sqlgen.row_hash`)."""
    graph = ctx.spec.entity_graph
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as c:
        for name, table in ctx.tables.items():
            own = sqlgen.ownership(graph, name)
            q = psycopg.sql.SQL(
                "SELECT count(*), coalesce(sum({}), 0) FROM {} WHERE {} IN "
                "(SELECT user_id FROM users WHERE country_code = ANY(%(codes)s))"
            ).format(sqlgen.row_hash(table), own.from_, own.owner)
            c.execute(q, {"codes": codes}).fetchall()
    return time.perf_counter() - t0


def checksums_both(ctx: Context, src: str, dst: str, codes: list[str]) -> float:
    """`checksums` at the source and the destination at once, as a hand-written verify would."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda d: checksums(ctx, d, codes), (src, dst)))
    return time.perf_counter() - t0


def parallel_raw_purge(ctx: Context, src: str, codes: list[str], lanes: int) -> float:
    """The hand-written purge with the tool's lanes and the tool's recheck: one pass of
    checksums over the shard at the source first (the tool compares its copy with what the
    cutover froze), then `raw_purge`'s statements with every trigger skipped (the tool
    skips the graph's own checks), each lane for its share of the users (user_id modulo
    the lanes) in a transaction of its own."""
    t0 = time.perf_counter()
    checksums(ctx, src, codes)

    def lane(k: int) -> None:
        with psycopg.connect(unchecked(src)) as c:
            for q in _purge_statements(f" AND user_id %% {lanes} = {k}"):
                c.execute(q, {"codes": codes})

    with ThreadPoolExecutor(lanes) as pool:
        list(pool.map(lane, range(lanes)))
    return time.perf_counter() - t0
