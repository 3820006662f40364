"""Shared fixtures. Storage tests run on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.nodes import NodeProcess, free_port
from tests.pgserver import PgServer

# --- a deadline for every trio test ---

# A hung trio test fails with TooSlowError and the traceback of where it waited,
# instead of sitting in the event loop until pytest-timeout's thread dump (which
# shows only trio's epoll call). Well above the slowest test, which takes ~20 s.
TRIO_TEST_DEADLINE_S = 150


def _with_deadline(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def bounded(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(TRIO_TEST_DEADLINE_S):
            await fn(*args, **kwargs)

    return bounded


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fn = getattr(item, "obj", None)
        if inspect.iscoroutinefunction(fn):
            item.obj = _with_deadline(fn)  # type: ignore[attr-defined]


# --- databases ---

_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL server for the whole session, started on first use."""
    server = PgServer.start()
    try:
        yield server
    finally:
        server.stop()


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'moot.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database per test, on each supported backend in turn."""
    if request.param == "sqlite":
        return _sqlite_url(tmp_path)
    # Looked up lazily, so a run that selects only SQLite never starts PostgreSQL.
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database(f"moot_test_{next(_database_numbers)}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file, for tests that need only one backend."""
    return _sqlite_url(tmp_path)


# --- node fixtures ---


# --- a node process for tests that drive it from outside (browsers, the CLI) ---


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A ``moot run`` process on SQLite, stopped by PID afterwards (test_admin has its own ``node``)."""
    proc = NodeProcess(tmp_path / "node", free_port())
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
