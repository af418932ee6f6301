"""Connections to the stores of each data center, and the one classification of errors:
each store says which of its driver's errors a retry can mend, here and nowhere else."""

from __future__ import annotations

from migrator.errors import MigratorError, ShardBusy, TransientError
from migrator.stores import postgres, s3


def is_transient(exc: BaseException) -> bool:
    """Whether a retry can mend `exc`: the migrator's own transient kinds, and what each
    store's driver raises for a lost connection, a restart, throttling or a timeout."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, MigratorError):
        return False
    return postgres.transient(exc) or s3.transient(exc) or isinstance(exc, (ConnectionError, TimeoutError))


def retry_later(exc: BaseException) -> bool:
    """Whether an orchestrator should run the task again later: a transient error, or a
    shard another worker still holds (its holder finishes or dies, and a dead holder's
    lock ends with its database session). The command line waits for a busy shard
    itself (`engine.each`)."""
    return isinstance(exc, ShardBusy) or is_transient(exc)
