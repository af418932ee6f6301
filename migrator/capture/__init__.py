"""Change capture and the write fence, both enforced by the databases themselves.

Design
------
Triggers, not logical decoding: they need no server configuration (wal_level, slots,
replication rights), work the same on every PostgreSQL the tool meets, capture only the
rows of users being moved, and the same trigger also enforces the fence, so a writer that
ignores the directory is refused by the database.

One BEFORE ROW trigger per table of the entity graph computes the row's owner (following
the foreign-key path, as the copy does) and then:
* if the owner is in `migrator.fenced_users` and their shard's fence in `migrator.fences`
  is up, raises SQLSTATE RMF01 ("fenced"): the write is refused and the writer may retry
  after cutover, at the user's new home;
* if the owner is in `migrator.capture_users`, appends (table, primary key, shard) to
  `migrator.changes` in the writer's own transaction, so a change is logged exactly when
  it commits.
The migrator's own apply sessions set `migrator.apply = on` and pass through both.

Triggers are installed before a shard's copy takes its first snapshot, so every change
not in a snapshot is in the log. Catch-up re-synchronises each logged primary key from the
current source row (upsert if present, delete if not), parents first and deletions
children first, in one destination transaction per pass: applying a pass twice is
harmless, so the applied position may lag what was applied.

The log is read in the order of the writers' transaction ids, never past the oldest
transaction still running (the horizon). Ids from the log's sequence are handed out in
the order writers reach the trigger, not the order they commit, so a position kept as
"the last id applied" would pass over a change whose transaction commits after a later id
was read; no transaction older than the horizon can still commit, so nothing is passed
over.

A fence waits until every transaction that began before it has ended (their changes are then in the log), bounded by
a deadline. The fence's user list is written before the window (`stage_fence`), and
raising, holding or lifting the fence is one row of `migrator.fences`, so the time the
users cannot write does not grow with the shard. After cutover the same machinery runs
the other way: destination writes are captured so a rollback can carry them back to the
source.
"""

from migrator.capture.fence import (
    EXPIRED,
    HELD,
    UP,
    arrive,
    depart,
    fence,
    fences,
    hold_fence,
    hold_now,
    lift,
    own_transaction,
    stage_fence,
)
from migrator.capture.log import (
    Position,
    apply,
    catch_up,
    far_session,
    finalize,
    lag,
    touched,
    touched_keys,
    written,
)
from migrator.capture.triggers import (
    APPLY,
    FENCED,
    install,
    start_capture,
    stop_capture,
    uninstall_if_unused,
)

__all__ = [
    "EXPIRED",
    "HELD",
    "UP",
    "arrive",
    "depart",
    "fence",
    "fences",
    "hold_fence",
    "hold_now",
    "lift",
    "own_transaction",
    "stage_fence",
    "Position",
    "apply",
    "catch_up",
    "far_session",
    "finalize",
    "lag",
    "touched",
    "touched_keys",
    "APPLY",
    "FENCED",
    "install",
    "start_capture",
    "stop_capture",
    "uninstall_if_unused",
    "written",
]
