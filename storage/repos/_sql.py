"""Dialect helpers shared by the repositories (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


def upsert_insert(conn: Connection, table: Table) -> Any:
    """An INSERT that supports ``on_conflict_do_nothing/do_update`` on this dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
