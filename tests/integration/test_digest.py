"""The canonical digest on a real server: two rows hash alike exactly when they are equal,
whatever the session's time zone, and NULL, '' and 'NULL' are told apart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from migrator.stores import catalog, sqlgen
from migrator.stores.postgres import connect

pytestmark = pytest.mark.integration

DDL = """CREATE TABLE IF NOT EXISTS probe (id int PRIMARY KEY, t text, j jsonb, b bytea, n numeric,
         ts timestamptz, f float8)"""

values = st.tuples(
    st.one_of(st.none(), st.sampled_from(["", "NULL", "a,b", "'q'", "x"])),
    st.one_of(st.none(), st.sampled_from([{}, {"a": 1}, {"a": 1.5}, [1, "a"]])),
    st.one_of(st.none(), st.sampled_from([b"", b"\x00", b"ab"])),
    st.one_of(st.none(), st.sampled_from([Decimal("1"), Decimal("1.0"), Decimal("-2.5")])),
    st.one_of(
        st.none(),
        st.sampled_from(
            [
                datetime(2026, 1, 1, tzinfo=UTC),
                datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
                datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
            ]
        ),
    ),
    st.one_of(st.none(), st.sampled_from([0.1, 0.30000000000000004, 1e300, float("inf"), 0.0, -0.0])),
)


@pytest.fixture(scope="module")
def db(cluster):
    dsn = cluster["us"].create_database("digest_probe")
    with psycopg.connect(dsn) as c:
        c.execute(DDL)
    with psycopg.connect(dsn) as c:
        table = catalog.read_table(c, "public", "probe")
    # hash the values only: the ids differ by construction
    return dsn, catalog.Table(table.schema, table.name, table.columns[1:], table.pk)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=values, b=values, tz=st.sampled_from(["UTC", "Asia/Kolkata", "America/New_York"]))
def test_equal_rows_hash_alike_and_different_rows_do_not(db, a, b, tz):
    dsn, table = db
    with connect(dsn) as c:
        c.execute("DELETE FROM probe")
        for i, row in enumerate((a, b)):
            c.execute(
                "INSERT INTO probe VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (i, row[0], None if row[1] is None else Jsonb(row[1]), *row[2:]),
            )
        c.execute(f"SET TimeZone = '{tz}'")  # the digest must not depend on it
        stored = c.execute("SELECT t, j, b, n, ts, f FROM probe ORDER BY id").fetchall()
        q = psycopg.sql.SQL("SELECT {} FROM probe t0 ORDER BY id").format(sqlgen.row_hash(table))
        hashes = [h for (h,) in c.execute(q).fetchall()]
        c.rollback()
    same = [repr(v) for v in stored[0]] == [repr(v) for v in stored[1]]
    assert (hashes[0] == hashes[1]) == same


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
        min_size=1,
        max_size=20,
    )
)
def test_keys_travel_intact_as_one_array_literal(db, keys):
    """Any text keys (quotes, backslashes, commas, braces, 'NULL', '') reach the server as
    they are, whether the statement binds in the server or, as COPY does, in the client."""
    dsn, _ = db
    with connect(dsn, autocommit=True) as c:
        got = c.execute("SELECT %(keys)s::text[]", sqlgen.keys_arg(keys)).fetchone()[0]
        assert got == keys
        with (
            c.cursor() as cur,
            cur.copy("COPY (SELECT unnest(%(keys)s::text[])) TO STDOUT", sqlgen.keys_arg(keys)) as cp,
        ):
            copied = [row[0] for row in cp.rows()]
        assert copied == keys


def test_values_equal_to_the_type_but_written_differently_hash_apart(db):
    """Types whose equality is looser than their value's text (interval, numeric scale,
    trailing spaces in char(n)) and types with no hash of their own (point) hash by text."""
    dsn, _ = db
    with connect(dsn) as c:
        c.execute("CREATE TEMP TABLE loose (id int, iv interval, n numeric, ch char(4), pt point, v varchar(8))")
        c.execute(
            "INSERT INTO loose VALUES (1, '1 day', 1.0, 'a', '(1,2)', 'x'), (2, '24 hours', 1.00, 'a  ', '(1,2)', 'x')"
        )
        cols = [
            catalog.Column(n, t, False)
            for n, t in c.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'loose'::regclass "
                "AND attnum > 1 AND NOT attisdropped ORDER BY attnum"
            ).fetchall()
        ]
        for col in cols:
            t = catalog.Table("pg_temp", "loose", [col], ["id"])
            q = psycopg.sql.SQL("SELECT {} FROM loose t0 ORDER BY id").format(sqlgen.row_hash(t))
            h = [x for (x,) in c.execute(q).fetchall()]
            texts = [
                x
                for (x,) in c.execute(
                    psycopg.sql.SQL("SELECT {}::text FROM loose ORDER BY id").format(psycopg.sql.Identifier(col.name))
                ).fetchall()
            ]
            assert (h[0] == h[1]) == (texts[0] == texts[1]), col


def test_rows_that_trade_a_column_value_change_the_sum(db):
    """Two rows swapping their values of one column: each row differs, and so must the
    set's (count, sum), which a hash linear in the columns would leave unchanged."""
    dsn, table = db
    with connect(dsn) as c:
        c.execute("DELETE FROM probe")
        c.execute("INSERT INTO probe (id, t, n) VALUES (1, 'a', 1), (2, 'b', 2)")
        q = psycopg.sql.SQL("SELECT count(*), sum({}) FROM probe t0").format(sqlgen.row_hash(table))
        before = c.execute(q).fetchone()
        c.execute("UPDATE probe SET n = 3 - n")
        after = c.execute(q).fetchone()
        c.rollback()
    assert before[0] == after[0] and before[1] != after[1]


def test_one_pass_settings_alone_give_hashes_the_floor_not_the_server_default(db):
    """A caller that does not size work_mem itself still gets MIN_HASH_MB for its hashes,
    for its transaction only."""
    dsn, _ = db
    with connect(dsn) as c:
        before = c.execute("SHOW work_mem").fetchone()[0]
        sqlgen.one_pass_settings(c)
        inside = c.execute("SELECT current_setting('work_mem'), current_setting('enable_nestloop')").fetchone()
        c.rollback()
        after = c.execute("SHOW work_mem").fetchone()[0]
    assert after == before != f"{sqlgen.MIN_HASH_MB}MB"
    assert inside == (f"{sqlgen.MIN_HASH_MB}MB", "off")
