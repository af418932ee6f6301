"""The spec's sections, each validated once at the edge; errors name the field."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from migrator.spec.fields import DURATION, ENV_NAME, Strict, expand_env, ident, mask_dsn


class Store(Strict):
    """A PostgreSQL server; the DSN may be '${ENV_VAR}' or contain such references."""

    dsn: SecretStr

    @field_validator("dsn", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return expand_env(v)

    @property
    def url(self) -> str:
        return self.dsn.get_secret_value()

    @property
    def masked(self) -> str:
        return mask_dsn(self.url)

    def __repr__(self) -> str:
        return f"Store({self.masked})"


class Root(Strict):
    table: str
    key: str
    residency: str
    created_at: str | None = None
    updated_at: str | None = None  # set by the application on every change: intervals read changed users too

    @field_validator("table", "key", "residency", "created_at", "updated_at")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return None if v is None else ident(v, "name")


class Child(Strict):
    """A table whose rows belong to a user through a foreign key to its parent."""

    table: str
    parent: str
    fk: dict[str, str] = Field(description="this table's column -> parent's column")

    @field_validator("table", "parent")
    @classmethod
    def _names(cls, v: str) -> str:
        return ident(v, "table")

    @field_validator("fk")
    @classmethod
    def _fk(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("needs at least one column pair")
        for a, b in v.items():
            ident(a, "column")
            ident(b, "column")
        return v


class Excluded(Strict):
    """A table that references the graph's tables but holds no personal data to move (a
    lookup, a counter): left where it is on purpose, with the reason the audit names."""

    table: str = Field(description="a table of the graph's schema, or schema.table")
    reason: str = Field(description="why its rows may stay where they are")

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        for part in v.split(".", 1):
            ident(part, "table")
        return v

    @field_validator("reason")
    @classmethod
    def _reason(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("needs a reason (the audit names it)")
        return v


class EntityGraph(Strict):
    schema_: str = Field("public", alias="schema")
    root: Root
    tables: list[Child] = []
    exclude: list[Excluded] = Field(
        [],
        description="tables with a foreign key into the graph that stay where they are, each with its reason; "
        "any other such table is refused",
    )

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: str) -> str:
        return ident(v, "schema")

    @model_validator(mode="after")
    def _paths(self) -> EntityGraph:
        names = [self.root.table] + [t.table for t in self.tables]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"table {sorted(dup)[0]!r} is listed twice")
        known = set(names)
        for x in self.exclude:
            if x.table in known:
                raise ValueError(f"table {x.table!r} is both moved (root or tables) and excluded")
        for t in self.tables:
            if t.parent not in known:
                raise ValueError(f"table {t.table!r}: parent {t.parent!r} is not in the entity graph")
        for t in self.tables:  # every chain must reach the root without a cycle
            seen, cur = {t.table}, t
            while cur.parent != self.root.table:
                cur = self.child(cur.parent)
                if cur.table in seen:
                    raise ValueError(f"table {t.table!r}: its path to the root loops through {cur.table!r}")
                seen.add(cur.table)
        return self

    def child(self, name: str) -> Child:
        for t in self.tables:
            if t.table == name:
                return t
        raise KeyError(name)

    def path(self, name: str) -> list[Child]:
        """The hops from `name` up to (not including) the root."""
        hops: list[Child] = []
        while name != self.root.table:
            c = self.child(name)
            hops.append(c)
            name = c.parent
        return hops

    def ordered(self) -> list[str]:
        """Tables parents-first: the order to load; reversed, the order to delete."""
        out = [self.root.table]
        rest = list(self.tables)
        while rest:
            for t in list(rest):
                if t.parent in out:
                    out.append(t.table)
                    rest.remove(t)
        return out


class ObjectStore(Strict):
    """An S3 API endpoint and bucket of one region; keys may be '${ENV_VAR}' references."""

    endpoint: str | None = None
    bucket: str
    region_name: str = "us-east-1"
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None

    @field_validator("endpoint", "access_key", "secret_key", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return expand_env(v)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", v):
            raise ValueError(f"bucket name {v!r} is not a valid S3 bucket name")
        return v


class KeyColumn(Strict):
    table: str
    column: str


class Objects(Strict):
    """Where each user's objects are: keys held in a column, and/or a per-user key prefix."""

    key_column: KeyColumn | None = None
    user_prefix: str | None = Field(None, description="e.g. 'users/{user}/'; {user} is the user's key")
    stores: dict[str, ObjectStore]
    threads: int = Field(8, ge=1, le=64)
    multipart_threshold_mb: int = Field(8, ge=5, le=5000)
    part_size_mb: int = Field(8, ge=5, le=5000)

    @model_validator(mode="after")
    def _where(self) -> Objects:
        if self.key_column is None and self.user_prefix is None:
            raise ValueError("objects: give key_column and/or user_prefix")
        if self.user_prefix is not None and "{user}" not in self.user_prefix:
            raise ValueError(f"objects.user_prefix {self.user_prefix!r} must contain {{user}}")
        return self


class ChangeSettings(Strict):
    """Writes made while a shard moves: captured, caught up, fenced at cutover."""

    capture: bool = True
    fence_window_s: float = Field(5.0, gt=0, le=600)
    catch_up_below: int = Field(100, ge=0, description="fence only once this few changes are pending")
    dead_session_s: float = Field(
        30.0,
        ge=2,
        le=3600,
        description="how long a lost worker (a dead host, a cut link) can hold its shard or a cutover's locks: "
        "the server ends the shard lock's session, kept alive by the worker, and a cutover's or rollback's "
        "flip once either stays silent this long, and `recover` can then finish the shard",
    )
    lock_wait_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="how long a catch-up pass outside the fence waits for a lock held by another transaction "
        "at either side before it gives up (a transient error: the step is retried later)",
    )


class KeyRef(Strict):
    """Where a region's key is found by the worker: an environment variable, named here;
    its value never appears in the spec, the control database, a log or the audit."""

    env: str

    @field_validator("env")
    @classmethod
    def _env(cls, v: str) -> str:
        if not ENV_NAME.match(v):
            raise ValueError(f"{v!r} is not an environment variable name (upper-case letters, digits, _)")
        return v


class Pseudonymise(Strict):
    pseudonymise: list[str] = Field(description="columns whose values are replaced by keyed pseudonyms")

    @field_validator("pseudonymise")
    @classmethod
    def _cols(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one column")
        for c in v:
            ident(c, "column")
        return v


class Purge(Strict):
    """Retiring the source copy of a cut-over shard after its retention (`migrator purge`)."""

    after: str = Field("7d", description="retention after cutover before the source copy goes: 30m, 12h, 7d, 0s")
    tables: dict[str, Literal["delete", "keep"] | Pseudonymise] = Field(
        {}, description="per table of the graph: delete (the default), keep, or {pseudonymise: [columns]}"
    )
    keys: dict[str, KeyRef] = Field({}, description="per destination region, where its pseudonymisation key is")
    batch_pause_s: float = Field(0.0, ge=0, le=60, description="pause between batches, to spare the source")

    @field_validator("after")
    @classmethod
    def _after(cls, v: str) -> str:
        if not DURATION.match(v.strip()):
            raise ValueError(f"{v!r} is not a duration such as 30m, 12h or 7d")
        return v.strip()

    @property
    def after_s(self) -> float:
        m = DURATION.match(self.after)
        assert m is not None
        return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]

    def action(self, table: str) -> str:
        a = self.tables.get(table, "delete")
        return "pseudonymise" if isinstance(a, Pseudonymise) else a

    def columns(self, table: str) -> list[str]:
        a = self.tables.get(table)
        return list(a.pseudonymise) if isinstance(a, Pseudonymise) else []


class RegionEvidence(Strict):
    """A destination region's evidence keys, held where that region's workers run."""

    signing: KeyRef = Field(description="Ed25519 private key: 64 hex digits (its 32-byte seed)")
    pseudonym: KeyRef | None = Field(None, description="HMAC key naming the users in its manifests")
    public_key: str | None = Field(None, description="the Ed25519 public key (64 hex digits), for `migrator audit`")

    @field_validator("public_key", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return expand_env(v)

    @field_validator("public_key")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be 64 lower-case hex digits (a raw Ed25519 public key)")
        return v


class Evidence(Strict):
    """Signed manifests per shard, kept in its destination region (`migrator.evidence`)."""

    regions: dict[str, RegionEvidence] = Field(description="per destination region")
