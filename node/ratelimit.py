"""Failed-login limiting (sans-IO: time comes in as ``now``, in seconds)."""

from __future__ import annotations

from collections import deque


class FailureLimiter:
    """Allow at most ``allowed`` failures per key within a sliding ``window``.

    Keys are e.g. ``user:alice`` and ``ip:203.0.113.9``. Memory is bounded: at most
    ``allowed`` timestamps per key, and past ``max_keys`` keys the expired ones are
    pruned, then the oldest dropped.
    """

    def __init__(self, allowed: int, window: float, *, max_keys: int = 100_000) -> None:
        self.allowed = allowed
        self.window = window
        self.max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again; 0 if it may try now."""
        times = self._failures.get(key)
        if not times:
            return 0.0
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.allowed:
            return 0.0
        return times[0] + self.window - now

    def record_failure(self, key: str, now: float) -> None:
        times = self._failures.setdefault(key, deque(maxlen=self.allowed))
        times.append(now)
        if len(self._failures) > self.max_keys:
            self.prune(now)
            # Still too many (a flood of distinct names): forget the oldest keys.
            for stale in list(self._failures)[: len(self._failures) - self.max_keys // 2]:
                del self._failures[stale]

    def reset(self, key: str) -> None:
        self._failures.pop(key, None)

    def prune(self, now: float) -> None:
        stale = [k for k, t in self._failures.items() if not t or t[-1] <= now - self.window]
        for key in stale:
            del self._failures[key]
