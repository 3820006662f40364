"""Small helpers for trio nurseries."""

from __future__ import annotations

import trio


def first_error(group: BaseExceptionGroup) -> BaseException:  # type: ignore[type-arg]
    """The exception that ended a nursery (the first that is not a cancellation)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = first_error(exc)
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group
