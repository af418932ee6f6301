"""What a compare of two sides names when they differ: a row (its table and primary key) or
an object (its key), and the problem in words. Never a row's contents."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RowDifference:
    """A row that differs: missing at one side, extra at the other, or different."""

    table: str
    pk: tuple[tuple[str, Any], ...]  # (column, value) in the primary key's order
    problem: str

    @classmethod
    def of(cls, table: str, columns: Iterable[str], values: Iterable[Any], problem: str) -> RowDifference:
        return cls(table, tuple(zip(columns, values)), problem)

    def named(self) -> str:
        return f"{self.table} {dict(self.pk)}: {self.problem}"

    def record(self) -> dict[str, Any]:
        """As the audit trail and the JSON answers keep it."""
        return {"table": self.table, "pk": dict(self.pk), "problem": self.problem}


@dataclass(frozen=True)
class ObjectDifference:
    """An object that differs between the manifest, the source and the destination."""

    key: str
    problem: str

    def named(self) -> str:
        return f"object {self.key!r}: {self.problem}"

    def record(self) -> dict[str, Any]:
        return {"object": self.key, "problem": self.problem}


Difference = RowDifference | ObjectDifference


def records(differences: Iterable[Difference]) -> list[Mapping[str, Any]]:
    return [d.record() for d in differences]
