"""PostgreSQL connections with the session pinned, so every digest is computed alike.

TimeZone, DateStyle, IntervalStyle, extra_float_digits and bytea_output change the text
form of values; a digest computed under different settings on two sides would report
false mismatches, so every connection the migrator opens sets them the same way.
"""
from __future__ import annotations

import psycopg

PINNED = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "client_encoding": "UTF8",
    "application_name": "residency-migrator",
}


def connect(dsn: str, *, autocommit: bool = False, connect_timeout: int = 5) -> psycopg.Connection:
    opts = " ".join(f"-c {k}={v.replace(' ', '')}" for k, v in PINNED.items() if k not in ("client_encoding", "application_name"))
    conn = psycopg.connect(
        dsn,
        autocommit=autocommit,
        connect_timeout=connect_timeout,
        options=opts,
        application_name=PINNED["application_name"],
        client_encoding=PINNED["client_encoding"],
    )
    return conn
