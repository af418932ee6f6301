"""Independent batches worked on by a few threads at once: the copy, the rollback's
deletes and the purge each commit one batch per transaction, with its own ledger row, so
batches may commit in any order.

`in_lanes` yields each batch's result as it commits, in the caller's thread (which records
it). After the first error no lane starts another batch; the batches in flight finish and
are yielded before the error is raised, so nothing committed goes unrecorded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, cast

Item = TypeVar("Item")
Out = TypeVar("Out")


def in_lanes(
    items: Iterable[Item],
    work: Callable[[Any, Item], Out],
    lanes: int,
    name: str,
    setup: Callable[[], Any] = lambda: None,
    teardown: Callable[[Any], None] = lambda _: None,
) -> Iterator[tuple[Item, Out]]:
    """Run `work(lane_state, item)` for every item on up to `lanes` threads; each thread
    makes its state with `setup` (e.g. its connections) and ends it with `teardown`."""
    todo: queue.SimpleQueue[Item] = queue.SimpleQueue()
    count = 0
    for item in items:
        todo.put(item)
        count += 1
    if not count:
        return
    out: queue.SimpleQueue[tuple[Item, Out | None, BaseException | None]] = queue.SimpleQueue()
    stop = threading.Event()

    def lane() -> None:
        state = setup()
        try:
            while not stop.is_set():
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    out.put((item, work(state, item), None))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    stop.set()
                    out.put((item, None, exc))
                    return
        finally:
            teardown(state)

    threads = [threading.Thread(target=lane, name=f"{name}-{i}", daemon=True) for i in range(min(lanes, count))]
    for t in threads:
        t.start()
    error: BaseException | None = None
    try:
        while any(t.is_alive() for t in threads) or not out.empty():
            try:
                item, res, exc = out.get(timeout=0.2)
            except queue.Empty:
                continue
            if exc is not None:
                error = error or exc
            else:
                yield item, cast(Out, res)
    finally:
        stop.set()
        for t in threads:
            t.join()
    if error is not None:
        raise error
