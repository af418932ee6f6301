"""A deterministic synthetic US dataset for the demo, the tests and the benchmark."""

from __future__ import annotations

from importlib import resources

import psycopg

# 100 slots: the share of each residency code (None: never recorded; ZZ and GB: codes the
# demo policy does not place, so those users stay in the US and are reported).
COUNTRIES = (
    ["US"] * 40
    + ["CA"] * 5
    + ["BR"] * 5
    + ["MX"] * 3
    + ["JP"] * 3
    + ["IE"] * 5
    + ["DE"] * 6
    + ["FR"] * 5
    + ["IT"] * 3
    + ["ES"] * 3
    + ["NL"] * 2
    + ["PL"] * 2
    + ["NO"] * 4
    + ["SE"] * 3
    + ["DK"] * 2
    + ["FI"] * 2
    + ["IS"] * 1
    + [None] * 3
    + ["ZZ"] * 2
    + ["GB"] * 1
)
assert len(COUNTRIES) == 100

START = "2026-11-20T00:00:00Z"
SPAN_DAYS = 10


def schema_sql() -> str:
    return resources.files("migrator.demo").joinpath("schema.sql").read_text()


def create_schema(dsn: str) -> None:
    with psycopg.connect(dsn) as c:
        c.execute(schema_sql())


def seed(dsn: str, users: int, videos_per_user: int = 3, logins_per_user: int = 5) -> dict[str, int]:
    """Fill the (empty) US database; the same arguments always give the same rows."""
    codes = "ARRAY[" + ",".join("NULL" if c is None else f"'{c}'" for c in COUNTRIES) + "]::text[]"
    step = SPAN_DAYS * 86400.0 / max(users, 1)
    with psycopg.connect(dsn) as c:
        c.execute("SET TimeZone = 'UTC'")
        c.execute(f"""
            INSERT INTO users
            SELECT i, 'user' || i || '@example.test',
                   CASE WHEN i % 11 = 0 THEN NULL ELSE 'User ' || i END,
                   ({codes})[1 + (i * 7919) % 100],
                   timestamptz '{START}' + make_interval(secs => i * {step}),
                   CASE WHEN i % 5 = 0 THEN NULL
                        ELSE jsonb_build_object('lang', (ARRAY['en','de','fr','nb','sv'])[1 + i % 5],
                                                'score', round((i % 997) / 7.0, 3),
                                                'tags', jsonb_build_array(i % 3, 'x')) END
            FROM generate_series(1::bigint, {users}) AS i""")
        c.execute(f"""
            INSERT INTO videos
            SELECT (i - 1) * {videos_per_user} + j, i, 'Video ' || j || ' of ' || i,
                   CASE WHEN (i + j) % 13 = 0 THEN NULL ELSE ((i * j) % 36000) / 100.0 END,
                   'videos/' || i || '/' || ((i - 1) * {videos_per_user} + j) || '.mp4',
                   timestamptz '{START}' + make_interval(secs => i * {step} + j * 60)
            FROM generate_series(1::bigint, {users}) AS i, generate_series(1, {videos_per_user}) AS j""")
        c.execute(f"""
            INSERT INTO comments
            SELECT v.video_id, v.video_id, 1 + (v.video_id * 31) % {users},
                   CASE WHEN v.video_id % 17 = 0 THEN NULL
                        ELSE 'Comment on ' || v.video_id || E' \\\\ ''quoted'' ,; ' END,
                   v.created_at + interval '1 hour'
            FROM videos v""")
        c.execute(f"""
            INSERT INTO login_events
            SELECT (i - 1) * {logins_per_user} + j, i,
                   CASE WHEN j % 4 = 0
                        THEN ('2001:db8::' || to_hex(i / 65536) || ':' || to_hex(i % 65536) || ':' || j)::inet
                        ELSE ('198.51.' || (i % 250) || '.' || (j * 7 % 250))::inet END,
                   timestamptz '{START}' + make_interval(secs => i * {step} + j * 3600.123456),
                   (i + j) % 9 <> 0
            FROM generate_series(1::bigint, {users}) AS i, generate_series(1, {logins_per_user}) AS j""")
        c.execute(f"""
            INSERT INTO devices
            SELECT i, d, CASE WHEN i % 7 = 0 THEN NULL ELSE '+1555' || lpad((i * 37 + d)::text, 7, '0') END,
                   (ARRAY['phone-a','phone-b','tablet'])[1 + (i + d) % 3]
            FROM generate_series(1::bigint, {users}) AS i, generate_series(1, 2) AS d
            WHERE d = 1 OR i % 2 = 0""")
        c.execute("ANALYZE")
        counts = {}
        for t in ("users", "videos", "comments", "login_events", "devices"):
            (counts[t],) = c.execute(f"SELECT count(*) FROM {t}").fetchall()[0]
    return counts


def seed_objects(endpoint: str, bucket: str, dsn: str, threads: int = 8) -> int:
    """Small deterministic objects under each user's prefix: an avatar and a profile card."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    c.create_bucket(Bucket=bucket)
    with psycopg.connect(dsn) as conn:
        users = [u for (u,) in conn.execute("SELECT user_id FROM users")]
    keys = [f"users/{u}/avatar.png" for u in users] + [f"users/{u}/card.json" for u in users if u % 3 == 0]

    def put(k: str) -> None:
        c.put_object(Bucket=bucket, Key=k, Body=(k.encode() * 64)[: 256 + len(k) * 11])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, keys))
    return len(keys)
