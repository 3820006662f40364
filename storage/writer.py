"""The group-commit writer: the only task that writes to the database.

Callers hand it write operations (functions of a SQLAlchemy ``Connection``). It
drains its queue, runs everything queued in one transaction on a worker thread,
commits, and only then completes each operation. So an acknowledgement always
follows a durable commit, and one fsync is shared by a whole batch.

If a batch fails, it is rolled back and its operations are retried one per
transaction, so one bad operation fails alone. Operations must therefore be
deterministic functions of the database state (they are replayed after a rollback)
and idempotent (a commit may land without its acknowledgement after a crash).

An operation can leave a note for the commit listeners (``note_commit``): they get
the notes of each transaction that committed, in commit order, in trio, before the
operations' callbacks run; notes of a rolled-back transaction are dropped.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import outcome
import trio
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from node.errors import Unavailable
from node.logs import get_logger

T = TypeVar("T")
WriteOp = Callable[[Connection], T]
CommitListener = Callable[[list[Any]], None]
log = get_logger("moot.storage.writer")
_NOTES = "moot.commit_notes"  # key in the connection's info dict


def note_commit(conn: Connection, note: Any) -> None:
    """Inside a write op: hand ``note`` to the commit listeners if, and once, this
    op's transaction commits."""
    conn.info.setdefault(_NOTES, []).append(note)


@dataclass(slots=True)
class _Pending(Generic[T]):
    op: WriteOp[T]
    on_done: Callable[[outcome.Outcome[T]], None] | None = None
    done: trio.Event | None = None
    result: outcome.Outcome[T] | None = field(default=None)


class GroupCommitWriter:
    def __init__(self, engine: Engine, *, max_batch: int = 2000) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[_Pending[Any]](math.inf)
        self._closed = False
        self.batches = 0
        self.writes = 0
        self._conn: Connection | None = None  # used only by the batch thread
        self._listeners: list[CommitListener] = []

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener(notes)`` in trio after each batch with notes (see ``note_commit``).
        It must not block; an exception it raises is logged."""
        self._listeners.append(listener)

    async def write(self, op: WriteOp[T]) -> T:
        """Run ``op`` in the next batch; return its result once the batch committed.

        Raises whatever ``op`` raised (its transaction rolled back), or Unavailable
        if the writer is shut down. Cancelling the caller does not cancel the write.
        """
        pending: _Pending[T] = _Pending(op, done=trio.Event())
        self._enqueue(pending)
        assert pending.done is not None
        await pending.done.wait()
        assert pending.result is not None
        return pending.result.unwrap()

    def submit_nowait(self, op: WriteOp[T], on_done: Callable[[outcome.Outcome[T]], None]) -> None:
        """Queue ``op`` and return at once; ``on_done`` runs in trio after the commit.

        This lets a connection pipeline writes without a task per write. ``on_done``
        must not block; it receives an ``outcome.Value`` or ``outcome.Error``.
        """
        self._enqueue(_Pending(op, on_done=on_done))

    def _enqueue(self, pending: _Pending[Any]) -> None:
        if self._closed:
            raise Unavailable("the node is shutting down")
        self._send.send_nowait(pending)

    def close(self) -> None:
        """Accept no new writes; ``serve`` finishes what is queued, then returns."""
        if not self._closed:
            self._closed = True
            self._send.close()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until ``close()`` and the queue is drained.

        Batches run on a worker thread that trio will not abandon: once started,
        a batch always completes and is acknowledged, even during shutdown.
        """
        task_status.started()
        async with self._receive:
            while True:
                try:
                    first = await self._receive.receive()
                except trio.EndOfChannel:
                    return
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                with trio.CancelScope(shield=True):
                    results, notes = await trio.to_thread.run_sync(self._commit, [p.op for p in batch])
                self.batches += 1
                self.writes += len(batch)
                if notes:
                    for listener in self._listeners:
                        try:
                            listener(notes)
                        except Exception:
                            log.exception("writer.listener_failed")
                for pending, result in zip(batch, results):
                    pending.result = result
                    if pending.on_done is not None:
                        try:
                            pending.on_done(result)
                        except Exception:
                            log.exception("writer.callback_failed")
                    elif pending.done is not None:
                        pending.done.set()

    def _commit(self, ops: list[WriteOp[Any]]) -> tuple[list[outcome.Outcome[Any]], list[Any]]:
        """Run ``ops`` (one transaction, or one each if that fails); their outcomes,
        and the notes of what committed."""
        notes: list[Any] = []
        try:
            with self._transaction(notes) as conn:
                values = [op(conn) for op in ops]
            return [outcome.Value(v) for v in values], notes
        except Exception as exc:
            if len(ops) == 1:
                return [outcome.Error(_translate(exc))], notes
        # Isolate the failing operation(s): everything else still commits.
        results: list[outcome.Outcome[Any]] = []
        for op in ops:
            try:
                with self._transaction(notes) as conn:
                    results.append(outcome.Value(op(conn)))
            except Exception as exc:
                results.append(outcome.Error(_translate(exc)))
        return results, notes

    @contextmanager
    def _transaction(self, notes: list[Any]) -> Iterator[Connection]:
        """A transaction on the writer's own connection (kept, so its page cache
        stays warm and no pool checkout is paid per batch); a broken one is replaced.
        Once it commits, the notes its ops left are appended to ``notes``."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._engine.connect()
        info = self._conn.info
        info.pop(_NOTES, None)
        try:
            with self._conn.begin():
                yield self._conn
            notes.extend(info.pop(_NOTES, ()))
        except BaseException:
            info.pop(_NOTES, None)
            if self._conn.invalidated:
                self._conn.close()
                self._conn = None
            raise

    def dispose(self) -> None:
        """Close the writer's connection (after ``serve`` returned)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _driver_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [SQLAlchemyError, sqlite3.Error]
    try:
        import psycopg
    except ImportError:  # PostgreSQL support not installed
        pass
    else:
        errors.append(psycopg.Error)
    return tuple(errors)


# Hot statements run on the DBAPI cursor, so driver errors arrive unwrapped too.
DRIVER_ERRORS = _driver_errors()


def _translate(exc: Exception) -> Exception:
    """Database errors become Unavailable; the operation's own errors pass through."""
    if isinstance(exc, DRIVER_ERRORS):
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        log.error("writer.db_error", error=type(exc).__name__, detail=detail)
        return Unavailable("storage error")
    return exc
