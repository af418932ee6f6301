"""Named points in the phases where an embedder's callbacks run: a test stops the process
there (to kill it, or to change a store under it).

The tool registers no callback, so a point costs one check. A process takes callbacks from
`MIGRATOR_HOOKS` (`module:function`, comma-separated), imported at the first point reached,
so a test can put them into every command and Airflow worker it starts. A callback gets
the point's name and, where the point has them, the context and the shard id; a point
inside a store's transaction passes neither, so a callback writes nothing there.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

ENV = "MIGRATOR_HOOKS"

Callback = Callable[[str, Any, str | None], None]

_callbacks: list[Callback] = []
_loaded = False


def register(callback: Callback) -> None:
    _callbacks.append(callback)


def point(name: str, ctx: Any = None, sid: str | None = None) -> None:
    """Run every registered callback at the point `name`."""
    global _loaded
    if not _loaded:
        _loaded = True
        for ref in filter(None, (r.strip() for r in os.environ.get(ENV, "").split(","))):
            module, _, function = ref.partition(":")
            register(getattr(importlib.import_module(module), function))
    for callback in _callbacks:
        callback(name, ctx, sid)
