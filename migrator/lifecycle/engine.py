"""Runs shards through their phases (copy -> verify -> cutover, or one phase by name), one
shard at a time per worker, each through `dispatch`. A shard that fails is recorded and the
others go on; a shard another worker holds is waited for, so concurrent runs each report
the shard's final state. The caller learns which failed from the outcomes."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from migrator.control.context import Context, check_standby
from migrator.control.state import IN_FLIGHT, MOVED
from migrator.control.store import Shard
from migrator.differences import Difference
from migrator.errors import ChecksumMismatch, MigratorError, ShardBusy, SpecError, describe
from migrator.lifecycle import dispatch, gate
from migrator.phases.plan import Plan, plan

log = logging.getLogger("migrator.lifecycle.engine")

Progress = Callable[[str, int, int], None]
BUSY_WAIT_S = 3600.0  # how long a run waits for a shard another worker holds


@dataclass
class Outcome:
    shard_id: str
    ok: bool
    state: str = ""
    error: str | None = None
    differences: tuple[Difference, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)


def select(ctx: Context, wave: str | None, names: list[str] | None, region: str | None) -> list[Shard]:
    if not ctx.control.exists():
        return []
    return ctx.control.shards(wave=wave, names=names, region=region)


def _outcome(ctx: Context, sid: str, fn: Callable[[], list[dispatch.Result]], want: set[str] | None) -> Outcome:
    """Run `fn` for the shard; ok when it raised nothing and (with `want`) the shard ended in
    one of those states or was superseded by a later wave."""
    try:
        results = fn()
        state = results[-1].state if results else ctx.control.shard(sid).state.value
        detail = {r.phase: (r.skipped or r.detail) for r in results}
        superseded = any((r.skipped or "").startswith(gate.SUPERSEDED) for r in results)
        ok = want is None or state in want or superseded
        return Outcome(sid, ok, state, None if ok else f"shard {sid} is {state}", detail=detail)
    except (ShardBusy, SpecError):  # a spec problem is the command's, not the shard's: exit 2
        raise
    except ChecksumMismatch as exc:
        return Outcome(sid, False, _state(ctx, sid), error=str(exc), differences=exc.differences)
    except MigratorError as exc:
        return Outcome(sid, False, _state(ctx, sid), error=str(exc))
    except Exception as exc:  # driver errors: classified and named, never their text (it may hold row data)
        log.error("shard %s failed: %s", sid, describe(exc))
        return Outcome(sid, False, _state(ctx, sid), error=describe(exc))


def _state(ctx: Context, sid: str) -> str:
    try:
        return ctx.control.shard(sid).state.value
    except Exception:
        return "unknown"


def each(
    ctx: Context, shards: list[Shard], fn: Callable[[str], list[dispatch.Result]], want: set[str] | None = None
) -> list[Outcome]:
    """`fn` for every shard; a shard another worker holds is done last, once that worker lets go."""
    outcomes: dict[str, Outcome] = {}
    busy: list[str] = []
    for s in shards:
        try:
            outcomes[s.shard_id] = _outcome(ctx, s.shard_id, functools.partial(fn, s.shard_id), want)
        except ShardBusy:
            busy.append(s.shard_id)
    for sid in busy:
        end = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                outcomes[sid] = _outcome(ctx, sid, functools.partial(fn, sid), want)
                break
            except ShardBusy as exc:
                if time.monotonic() > end:
                    outcomes[sid] = Outcome(sid, False, _state(ctx, sid), error=str(exc))
                    break
                time.sleep(0.5)
    return [outcomes[s.shard_id] for s in shards]


def one_phase(ctx: Context, shards: list[Shard], phase: str, reason: str = "") -> list[Outcome]:
    return each(ctx, shards, lambda sid: [dispatch.run_phase(ctx, sid, phase, reason)])


def run(
    ctx: Context,
    wave: str,
    *,
    names: list[str] | None = None,
    region: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress | None = None,
    strict: bool = False,
) -> tuple[Plan, list[Outcome]]:
    check_standby(ctx)
    p = plan(ctx, wave, since=since, until=until, regions=[region] if region else None, strict=strict)
    # every name must be a shard of the wave (exit 2 naming it), as in every other verb
    shards = ctx.control.resolve(wave, names, region) if names else select(ctx, wave, names, region)

    def go(sid: str) -> list[dispatch.Result]:
        cb = (lambda d, t: progress(sid, d, t)) if progress else None
        return dispatch.advance(ctx, sid, progress=cb)

    return p, each(ctx, shards, go, want={s.value for s in MOVED})  # cut over, or purged since


def line(ctx: Context, base: str) -> list[str]:
    """`base` and the waves planned after it by commands given no wave (base-2, base-3, ...),
    oldest first; empty before the first plan."""
    if not ctx.control.exists():
        return []
    same = re.compile(rf"^{re.escape(base)}(-[0-9]+)?$")
    return [w for w in ctx.control.waves() if same.match(w)]


def next_wave(
    ctx: Context, base: str, region: str | None, since: datetime | None, until: datetime | None, strict: bool
) -> str | None:
    """The wave a command given no wave plans next: once no shard of the line's latest wave is
    in a move under way, the next of the line if a plan would move anyone (users who signed
    up or moved since, a country remapped); None otherwise. A wave is planned once, so this
    is how a rerun keeps residency true."""
    waves = line(ctx, base)
    if not waves:
        return None
    if any(s.state in IN_FLIGHT for s in select(ctx, waves[-1], None, region)):
        return None
    numbers = [int(w.rsplit("-", 1)[1]) for w in waves if w != base]
    name = f"{base}-{max(numbers, default=1) + 1}"
    would = plan(ctx, name, since=since, until=until, regions=[region] if region else None, dry_run=True, strict=strict)
    return name if would.shards else None
