"""Storage: the schema, the group-commit writer and one repository per domain.

Exports ``open_database`` and ``Database``; repositories live in ``storage.repos``.
"""

from storage.db import Database, open_database

__all__ = ["Database", "open_database"]
