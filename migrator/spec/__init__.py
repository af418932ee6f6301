"""The migration spec: one YAML file, validated once at the edge.

Errors name the field and the bad value; DSNs are secrets, masked in every repr. The
sections are in `sections` (what data moves, how it is retired) and `running` (how the
phases run), what they share in `fields`; this module holds the whole spec and its loading.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from migrator.errors import SpecError
from migrator.spec.fields import COUNTRY, REGION, Strict, expand_env, mask_dsn
from migrator.spec.running import CopySettings, RetrySettings, Sharding, ThrottleSettings, VerifySettings
from migrator.spec.sections import (
    ChangeSettings,
    Child,
    EntityGraph,
    Evidence,
    KeyColumn,
    KeyRef,
    Objects,
    ObjectStore,
    Pseudonymise,
    Purge,
    RegionEvidence,
    Root,
    Store,
)

__all__ = [
    "ChangeSettings",
    "Child",
    "CopySettings",
    "EntityGraph",
    "Evidence",
    "KeyColumn",
    "KeyRef",
    "ObjectStore",
    "Objects",
    "Pseudonymise",
    "Purge",
    "RegionEvidence",
    "RetrySettings",
    "Root",
    "Sharding",
    "Spec",
    "Store",
    "ThrottleSettings",
    "VerifySettings",
    "expand_env",
    "load_spec",
    "mask_dsn",
    "parse_spec",
    "read_yaml",
    "to_wire",
]


class Spec(Strict):
    version: int = 1
    source_region: str = "us"
    regions: dict[str, Store]
    control: Store
    policy: dict[str, str] = Field(description="ISO 3166-1 alpha-2 country code -> region")
    entity_graph: EntityGraph
    sharding: Sharding = Sharding()
    copy_: CopySettings = Field(CopySettings(), alias="copy")
    verify: VerifySettings = VerifySettings()
    retry: RetrySettings = RetrySettings()
    objects: Objects | None = None
    changes: ChangeSettings = ChangeSettings()
    purge: Purge | None = None
    evidence: Evidence | None = None
    require_indexes: bool = Field(
        False,
        description="refuse to plan (exit 2) while an owner-key or foreign-key column of the graph has no index "
        "at the source or a destination, instead of warning (the command line's --strict)",
    )

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"spec version {v} is not supported (this release reads version 1)")
        return v

    @field_validator("regions")
    @classmethod
    def _regions(cls, v: dict[str, Store]) -> dict[str, Store]:
        for name in v:
            if not REGION.match(name):
                raise ValueError(f"region name {name!r} must be lower-case letters, digits or _")
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: dict[str, str]) -> dict[str, str]:
        for code in v:
            if not COUNTRY.match(code):
                raise ValueError(f"country code {code!r} is not ISO 3166-1 alpha-2 (two upper-case letters)")
        return v

    @model_validator(mode="after")
    def _refs(self) -> Spec:
        if self.source_region not in self.regions:
            raise ValueError(f"source_region {self.source_region!r} is not among the regions")
        for code, region in self.policy.items():
            if region not in self.regions:
                raise ValueError(f"policy {code}: region {region!r} is not among the regions")
        if self.objects is not None:
            g = self.entity_graph
            kc = self.objects.key_column
            if kc is not None and kc.table not in [g.root.table] + [t.table for t in g.tables]:
                raise ValueError(f"objects.key_column: table {kc.table!r} is not in the entity graph")
            for region in [self.source_region, *self.targets]:
                if region not in self.objects.stores:
                    raise ValueError(f"objects.stores: no store for region {region!r}")
        if self.purge is not None:
            self._check_purge(self.purge)
        return self

    def _check_purge(self, p: Purge) -> None:
        g = self.entity_graph
        names = [g.root.table] + [t.table for t in g.tables]
        for t in p.tables:
            if t not in names:
                raise ValueError(f"purge.tables.{t}: not a table of the entity graph")
        for child in g.tables:  # a kept row would hold a foreign key to a deleted parent
            if p.action(child.table) != "delete" and p.action(child.parent) == "delete":
                raise ValueError(
                    f"purge.tables.{child.table}: {p.action(child.table)} while its parent {child.parent} is deleted "
                    f"(its foreign key ({', '.join(child.fk)}) would point at deleted rows); keep or pseudonymise "
                    f"{child.parent} too, or delete {child.table}"
                )
        joined: dict[str, set[str]] = {g.root.table: {g.root.key}}  # columns rows are found or joined by
        for child in g.tables:
            joined.setdefault(child.table, set()).update(child.fk)
            joined.setdefault(child.parent, set()).update(child.fk.values())
        for t in p.tables:
            for col in p.columns(t):
                if col in joined.get(t, set()):
                    raise ValueError(
                        f"purge.tables.{t}: column {col} is a key the entity graph joins on; it cannot be pseudonymised"
                    )
                if g.root.table == t and col == g.root.residency:
                    raise ValueError(f"purge.tables.{t}: column {col} is the residency the purge is decided by")
        for r in p.keys:  # the source too: users who move back there retire their copy with its key
            if r not in self.regions:
                raise ValueError(f"purge.keys.{r}: not a region of the spec")

    @model_validator(mode="after")
    def _evidence(self) -> Spec:
        for r in self.evidence.regions if self.evidence else {}:  # the source too, for moves back there
            if r not in self.regions:
                raise ValueError(f"evidence.regions.{r}: not a region of the spec")
        return self

    @property
    def targets(self) -> list[str]:
        """Regions some policy entry sends users to, other than the source."""
        return sorted({r for r in self.policy.values() if r != self.source_region})

    def region_of(self, residency: str | None) -> str | None:
        """The region a residency code maps to; None when unknown (the user stays)."""
        if residency is None:
            return None
        return self.policy.get(residency.strip().upper())

    def __repr__(self) -> str:
        return f"Spec(regions={sorted(self.regions)}, control={self.control.masked})"


_SECRET_FIELD = re.compile(r"password|passwd|secret|key|token|dsn|credential", re.I)
_SECRET_VALUE = re.compile(r"://|@|=|password", re.I)
_STORE_SECTIONS = ("regions", "control")


def _shown(loc: tuple, bad: Any) -> str:
    """The bad value, for a message, only where it cannot be a secret: never anything under
    a store (regions, control, objects.stores), under a field named like a secret, or a
    string that looks like a DSN or credentials."""
    if bad is None or isinstance(bad, (dict, list)):
        return ""
    parts = [str(p) for p in loc]
    if (parts and parts[0] in _STORE_SECTIONS) or "stores" in parts or any(_SECRET_FIELD.search(p) for p in parts):
        return ""
    if isinstance(bad, str) and (_SECRET_VALUE.search(bad) or len(bad) > 64):
        return ""
    return f" (got {bad!r})"


def _describe(err: ValidationError) -> str:
    """Each problem's field and kind; a value only where `_shown` allows."""
    lines = []
    for e in err.errors(include_input=True, include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after",)) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}{_shown(e['loc'], e.get('input'))}")
    return "; ".join(lines)


def parse_spec(data: Any, origin: str = "spec") -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a mapping at the top level")
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{origin}: {_describe(err)}") from None


# libyaml's loader where PyYAML was built with it: a spec is read by every task process
# (and the DAG files read it when parsed), and the pure-Python loader takes tens of ms.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: str | Path) -> Any:
    """A spec file's data, not yet checked (exit 2 naming the file if it is missing or not YAML)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist")
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML ({err.__class__.__name__})") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{p}: not a text file (byte {err.start} is not UTF-8); a spec is YAML text") from None
    except OSError as err:
        raise SpecError(f"spec file {str(p)!r} cannot be read ({err.strerror})") from None


def load_spec(path: str | Path) -> Spec:
    return parse_spec(read_yaml(path), str(path))


def to_wire(spec: Spec) -> dict[str, Any]:
    """The spec as plain data with its secrets, for a helper process over a pipe (never a log)."""

    def plain(v: Any) -> Any:
        if isinstance(v, SecretStr):
            return v.get_secret_value()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return plain(spec.model_dump(by_alias=True))
