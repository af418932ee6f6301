"""The house's shape, read from the code's own imports: arrows run downward only (faces ->
lifecycle -> phases -> what the phases share -> control and capture -> stores -> spec), no
module imports itself round a circle, imports sit at the top of their module (a handful
of named exceptions), and no module grows past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "migrator"

# Each part of the package and the parts below it that it may import. A part's own
# modules import each other freely (without a circle).
LAYERS: list[tuple[str, ...]] = [
    ("cli", "airflow", "demo", "routing"),  # the faces (routing: the application's)
    ("lifecycle",),
    ("phases",),
    ("evidence",),
    ("shard",),
    ("capture",),
    ("throttle",),
    ("control",),
    ("schema",),
    ("stores",),
    ("spec",),
    ("errors", "differences", "hooks", "lanes", "metrics", "partition", "migrator"),
]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}

# Imports of the project's own modules inside a function, each with its reason.
DEFERRED = {
    ("cli/upkeep.py", "migrator.demo"): "the demo comes with the [demo] extra, which a deployment leaves out",
    ("schema/history.py", "migrator.schema"): "SQLAlchemy's metadata only for an upgrade: half a second of every start",
    (
        "airflow/glue.py",
        "migrator.airflow",
    ): "the outage's trigger imports Airflow's core; glue stays importable without",
}


def _modules() -> dict[str, ast.Module]:
    return {
        str(p.relative_to(PACKAGE)): ast.parse(p.read_text())
        for p in PACKAGE.rglob("*.py")
        if "versions" not in p.parts and p.name != "env.py"
    }


def _name(rel: str) -> str:
    parts = ["migrator", *Path(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(rel: str, tree: ast.Module) -> set[str]:
    """The project's modules a module imports (a package's name for `from pkg import mod`
    resolved to the module where it is one)."""
    known = {_name(r) for r in _modules_cache}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("migrator"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("migrator"))
    out.discard(_name(rel))
    return out


_modules_cache = _modules()


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


@pytest.mark.parametrize("rel", sorted(_modules_cache))
def test_arrows_run_downward(rel):
    here = _part(_name(rel))
    assert here in RANK, f"migrator/{rel}: its part {here!r} is in no layer of this test"
    upward = sorted(m for m in _imports(rel, _modules_cache[rel]) if RANK[_part(m)] < RANK[here])
    assert not upward, f"migrator/{rel} imports {upward}, above its own layer"


def test_no_module_imports_itself_round_a_circle():
    graph = {_name(r): _imports(r, t) for r, t in _modules_cache.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n) :] + [n]))
            if n in graph and not state.get(n):
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


def test_imports_sit_at_the_top_but_the_named_few():
    found = set()
    for rel, tree in _modules_cache.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("migrator"):
                        found.add((rel, node.module))
    assert found <= set(DEFERRED), f"imports inside functions without a reason here: {sorted(found - set(DEFERRED))}"


def test_no_module_over_400_lines():
    long = {rel: n for rel in _modules_cache if (n := len((PACKAGE / rel).read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def _imported(tree: ast.Module) -> set[str]:
    return {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
        if isinstance(n, ast.Import) or n.module
    }


def test_errors_are_classified_in_the_stores_and_retried_at_one_level():
    """Which errors are transient is said where each store's driver is called; the only
    retry loops are the dispatcher's (a phase again from its checkpoint) and the control
    database's riding out of its own outages."""
    retrying = {rel for rel, tree in _modules_cache.items() if any(m.startswith("tenacity") for m in _imported(tree))}
    assert retrying == {"control/membership.py"}, retrying
    step = ast.unparse(
        next(
            n
            for n in ast.walk(_modules_cache["lifecycle/dispatch.py"])
            if isinstance(n, ast.FunctionDef) and n.name == "step"
        )
    )
    assert "while True" in step and "is_transient(exc)" in step
    classifying = {
        rel
        for rel, tree in _modules_cache.items()
        if "psycopg.errors" in _imported(tree) or any(m.startswith("botocore.exceptions") for m in _imported(tree))
    }
    assert classifying <= {"stores/postgres.py", "stores/s3.py"}, classifying
    defined = {
        rel
        for rel, tree in _modules_cache.items()
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and n.name in ("is_transient", "transient")
    }
    assert defined == {"stores/__init__.py", "stores/postgres.py", "stores/s3.py"}, defined
