"""Errors the node reports to clients, each with a stable wire code and HTTP status.

The web layer turns a ``MootError`` into ``{"error": {"code", "message"}}`` (HTTP) or an
``error`` frame (WebSocket). Codes are part of the client protocol (docs/protocol.md):
never rename one.
"""

from __future__ import annotations


class MootError(Exception):
    """Base of every error a client may see."""

    code = "internal"
    status = 500

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details


class BadRequest(MootError):
    code, status = "bad_request", 400


class BadFrame(BadRequest):
    code = "bad_frame"


class UnknownFrameType(BadRequest):
    code = "unknown_type"


class MissingField(BadRequest):
    code = "missing_field"


class TooLarge(MootError):
    code, status = "too_large", 413


class LengthRequired(BadRequest):
    code, status = "length_required", 411


class RangeNotSatisfiable(MootError):
    code, status = "bad_range", 416


class Unauthenticated(MootError):
    code, status = "unauthenticated", 401


class TokenExpired(Unauthenticated):
    code = "token_expired"


class BadCredentials(Unauthenticated):
    code = "bad_credentials"


class Forbidden(MootError):
    code, status = "forbidden", 403


class AccountDisabled(Forbidden):
    code = "account_disabled"


class RegistrationClosed(Forbidden):
    code = "registration_closed"


class BadInvite(Forbidden):
    code = "bad_invite"


class SenderMismatch(Forbidden):
    code = "sender_mismatch"


class NoDevice(Forbidden):
    code = "no_device"


class NotFound(MootError):
    code, status = "not_found", 404


class UnknownUser(NotFound):
    code = "unknown_user"


class UnknownNode(NotFound):
    code = "unknown_node"


class UnknownDevice(NotFound):
    code = "unknown_device"


class Conflict(MootError):
    code, status = "conflict", 409


class UsernameTaken(Conflict):
    code = "username_taken"


class IdConflict(Conflict):
    code = "id_conflict"


class RateLimited(MootError):
    code, status = "rate_limited", 429

    def __init__(self, message: str = "", *, retry_after: float) -> None:
        super().__init__(message or "too many attempts", retry_after=round(retry_after, 1))
        self.retry_after = retry_after


class Unavailable(MootError):
    code, status = "unavailable", 503
