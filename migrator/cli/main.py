"""The `migrator` command line: a thin layer over the library, for runbooks' manual reruns.

Exit status: 0 success, 1 a shard failed, 2 a usage or spec error.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from migrator import metrics
from migrator.cli import shards, upkeep  # noqa: F401 - their verbs register on `app`
from migrator.cli.common import app, err
from migrator.errors import MigratorError, SpecError, StateConflict, describe


def _is(exc: BaseException, kind: str) -> bool:
    """Whether `exc` is click's `kind`: typer carries a click of its own (`typer._click`),
    whose classes are not those of the click package, so the kind is known by its name."""
    return any(c.__name__ == kind and "click" in c.__module__ for c in type(exc).__mro__)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (SpecError, StateConflict) as e:
        err.print(f"[red]error:[/] {e}")
        sys.exit(e.exit_code)
    except MigratorError as e:
        err.print(f"[red]error:[/] {e}")
        sys.exit(e.exit_code)
    except Exception as e:
        if _is(e, "UsageError"):  # a command, option or value the command line does not take
            err.print(f"[red]usage:[/] {e.format_message()}")  # type: ignore[attr-defined]
            sys.exit(2)
        if _is(e, "Abort"):
            sys.exit(130)
        err.print(f"[red]error:[/] {describe(e)}")  # a driver error: its class, never its text (it may quote a row)
        sys.exit(1)
    finally:
        try:
            metrics.write()
        except OSError as e:
            err.print(
                f"[red]error:[/] the metrics file {os.environ.get(metrics.FILE_ENV)} could not be written: "
                f"{e.strerror or describe(e)}"
            )
