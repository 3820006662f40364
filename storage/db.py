"""Opening the database: engine, migrations, the writer task and the read pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError

from node.errors import Unavailable
from node.logs import get_logger
from storage.writer import GroupCommitWriter, WriteOp

T = TypeVar("T")
log = get_logger("moot.storage")
MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An engine with the pragmas that make SQLite durable and concurrent.

    SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when it
    returns, and readers do not block the writer.
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url, pool_size=pool_size, max_overflow=4, connect_args={"check_same_thread": False, "timeout": 30}
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=4, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    """The node's database: one writer task for all writes, a thread pool for reads."""

    def __init__(self, engine: Engine, writer: GroupCommitWriter, read_threads: int) -> None:
        self.engine = engine
        self.writer = writer
        self.dialect = engine.dialect.name
        self._read_limiter = trio.CapacityLimiter(read_threads)

    async def write(self, op: WriteOp[T]) -> T:
        return await self.writer.write(op)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a pooled connection in a worker thread; return its result."""
        return await trio.to_thread.run_sync(self._run_read, fn, limiter=self._read_limiter)

    def _run_read(self, fn: Callable[[Connection], T]) -> T:
        try:
            with self.engine.connect() as conn:
                return fn(conn)
        except SQLAlchemyError as exc:
            log.error("db.read_failed", error=type(exc).__name__, detail=str(exc).splitlines()[0][:200])
            raise Unavailable("storage error") from exc


@asynccontextmanager
async def open_database(url: str, *, max_batch: int = 2000, read_threads: int = 8) -> AsyncIterator[Database]:
    """Open, migrate and serve the database; on exit, drain the writer and dispose.

    Everything acknowledged before exit is committed: the writer finishes its queue
    before the engine is closed.
    """
    engine = await trio.to_thread.run_sync(lambda: make_engine(url, pool_size=read_threads + 2))
    writer = GroupCommitWriter(engine, max_batch=max_batch)
    try:
        await trio.to_thread.run_sync(migrate, engine)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.serve)
            try:
                yield Database(engine, writer, read_threads)
            finally:
                writer.close()
    finally:
        writer.dispose()
        engine.dispose()
