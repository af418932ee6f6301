"""What every phase needs: the spec, the control database, the run id, and the tables as
the source and each destination have them (read and compared once, before any write)."""

from __future__ import annotations

import logging
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field

from migrator.control.store import Control, Shard
from migrator.errors import SchemaMismatch, SpecError, describe
from migrator.spec import EntityGraph, Spec
from migrator.stores import catalog, is_transient
from migrator.stores.catalog import Table
from migrator.stores.postgres import Conn, connect, name_store, where

log = logging.getLogger("migrator")

INTEGER_TYPES = {"smallint", "integer", "bigint"}


@dataclass
class Context:
    spec: Spec
    run_id: str = field(default_factory=lambda: f"cli-{uuid.uuid4().hex[:12]}")
    _source: dict[str, Table] | None = None
    _checked: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for region, store in self.spec.regions.items():
            name_store(store.url, f"region {region}")
        name_store(self.spec.control.url, "control database")
        standby = self.spec.copy_.throttle.standby
        if standby is not None:
            name_store(standby.url, f"the standby of region {self.spec.source_region}")
        self.control = Control(
            self.spec.control.url,
            self.run_id,
            outage_s=self.spec.retry.outage_s,
            dead_session_s=self.spec.changes.dead_session_s,
        )

    def dsn(self, region: str) -> str:
        return self.spec.regions[region].url

    @property
    def source_dsn(self) -> str:
        return self.dsn(self.spec.source_region)

    def origin(self, shard: Shard) -> str:
        """The region a shard's users move from: their home until it cuts over, and after
        its rollback (the source region for a first move, their home for a move again)."""
        return shard.origin or self.spec.source_region

    def origin_dsn(self, shard: Shard) -> str:
        return self.dsn(self.origin(shard))

    @property
    def tables(self) -> dict[str, Table]:
        """The graph's tables at the source, parents first."""
        if self._source is None:
            with connect(self.source_dsn, autocommit=True) as c:
                self._source = catalog.read_graph(c, self.spec.entity_graph, f"source {self.spec.source_region}")
        return self._source

    def check_unnamed_tables(self) -> None:
        """Refuse (a spec problem, exit 2) while a table with a foreign key into the graph is
        neither moved nor excluded; read afresh each time: a table may be added mid-move."""
        with connect(self.source_dsn, autocommit=True) as c:
            found = catalog.unnamed_tables(c, self.spec.entity_graph, f"source {self.spec.source_region}")
        if found:
            raise SchemaMismatch("; ".join(found))

    @property
    def key_type(self) -> str:
        g = self.spec.entity_graph
        return self.tables[g.root.table].column(g.root.key).type

    def sort_keys(self, keys: list[str]) -> list[str]:
        if self.key_type in INTEGER_TYPES:
            return sorted(keys, key=int)
        return sorted(keys)

    def index_warnings(self, regions: list[str]) -> list[str]:
        """Owner-key columns without an index, at the source and the given destinations
        (see `catalog.unindexed_owner_keys`); each is logged too."""
        sides = [(f"source {self.spec.source_region}", self.source_dsn)] + [
            (f"destination {r}", self.dsn(r)) for r in regions
        ]
        out: list[str] = []
        for side, dsn in sides:
            with connect(dsn, autocommit=True) as c:
                out += catalog.unindexed_owner_keys(c, self.spec.entity_graph, side)
        for w in out:
            log.warning(w)
        return out

    def lookalike_warnings(self) -> list[str]:
        """Tables at the source that look as if they held users' rows but have no foreign
        key into the graph (`catalog.lookalike_tables`); each is logged too."""
        side = f"source {self.spec.source_region}"
        with connect(self.source_dsn, autocommit=True) as c:
            out = catalog.lookalike_tables(c, self.spec.entity_graph, self.key_type, side)
        for w in out:
            log.warning(w)
        return out

    def preflight(self, regions: set[str]) -> None:
        """Spec problems against the databases (a missing table or column, an undeclared
        foreign key, a destination that differs), found before anything is written; a
        destination that cannot be reached now is left to the phase (a transient failure)."""
        _ = self.tables  # reads and checks the source's tables
        self.check_unnamed_tables()
        check_standby(self)
        for r in sorted(regions):
            try:
                self.check_destination(r)
            except SchemaMismatch:
                raise
            except Exception as exc:
                log.warning("destination %s not checked now: %s", r, describe(exc))

    def check_privileges(self, regions: list[str]) -> None:
        """Every privilege the migrator needs at the source, the given destinations and the
        control database, all named at once; raises before anything is written."""
        g = self.spec.entity_graph
        sides: list[tuple[str, str, EntityGraph | None, tuple[str, ...]]] = [
            (f"source {self.spec.source_region}", self.source_dsn, g, catalog.SOURCE_TABLE_PRIVILEGES)
        ]
        sides += [(f"destination {r}", self.dsn(r), g, catalog.DESTINATION_TABLE_PRIVILEGES) for r in regions]
        sides.append(("control database", self.spec.control.url, None, ()))
        found: list[str] = []
        for side, dsn, graph, privs in sides:
            with connect(dsn, autocommit=True) as c:
                found += catalog.missing_privileges(c, graph, privs, side)
        catalog.check_privileges(found)

    def check_destination(self, region: str, conn: Conn | None = None) -> None:
        """Refuse a destination whose schema differs from the source's; before any write
        (read on `conn` where given, a connection to the region)."""
        if region in self._checked:
            return
        if region not in self.spec.regions:
            raise SchemaMismatch(f"region {region!r} is not in the spec")
        with nullcontext(conn) if conn is not None else connect(self.dsn(region), autocommit=True) as c:
            dest = catalog.read_graph(c, self.spec.entity_graph, f"destination {region}")
        catalog.compare(self.tables, dest, f"destination {region}")
        self._checked.add(region)


def check_standby(ctx: Context) -> None:
    """A configured standby that answers must be one (in recovery): a spec problem, found
    before anything is written; one that does not answer now is left to the copy, which
    waits for it."""
    t = ctx.spec.copy_.throttle
    if t.standby is None:
        return
    try:
        with connect(t.standby.url, autocommit=True) as c:
            (standby,) = c.execute("SELECT pg_is_in_recovery()").fetchone()
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("%s not checked now: %s", where(t.standby.url), describe(exc))
        return
    if not standby:
        raise not_a_standby(t.standby.url)


def not_a_standby(dsn: str) -> SpecError:
    return SpecError(f"copy.throttle.standby: {where(dsn)} is not in recovery, so it is not a standby")
