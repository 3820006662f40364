"""Accounts: registration, passwords, sessions, invites, and operator actions on users."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import nacl.exceptions
import nacl.pwhash
import trio

from node.config import NodeConfig
from node.errors import (
    AccountDisabled,
    BadCredentials,
    BadInvite,
    BadRequest,
    RateLimited,
    RegistrationClosed,
    TokenExpired,
    Unauthenticated,
    UnknownUser,
)
from node.logs import get_logger
from node.ratelimit import FailureLimiter
from storage.repos import AccountRepo, InviteRecord, UserRecord

log = get_logger("moot.accounts")
USERNAME_RE = re.compile(r"^[a-z0-9_.-]{1,32}$")
IP_FAILURE_FACTOR = 10
MIN_PASSWORD = 8
MAX_PASSWORD = 1024

_COSTS = {
    "interactive": (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE),
    "moderate": (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE),
    "min": (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN),
}


def token_hash(token: str) -> bytes:
    """Sessions and invites are stored as SHA-256 of the secret, never the secret."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Session:
    """An authenticated session: who is calling, from which device."""

    id: int
    user_id: int
    username: str
    address: str
    device_id: int | None
    expires_at: int


@dataclass(frozen=True, slots=True)
class LoginResult:
    token: str
    session: Session


class AccountService:
    def __init__(
        self,
        repo: AccountRepo,
        config: NodeConfig,
        node_name: str,
        *,
        clock_ms: Callable[[], int],
        on_sessions_revoked: Callable[[int, int | None], None] = lambda user_id, session_id: None,
    ) -> None:
        self.repo = repo
        self.config = config
        self.node_name = node_name
        self._clock_ms = clock_ms
        self._limiter = FailureLimiter(config.login_failures_allowed, config.login_failure_window_s)
        # One address may be a whole office behind NAT: it gets more tries than one name.
        self._ip_limiter = FailureLimiter(IP_FAILURE_FACTOR * config.login_failures_allowed, config.login_failure_window_s)
        self._ops, self._mem = _COSTS[config.password_hash_cost]
        # Closes live connections of revoked sessions (set by the composition root).
        self.on_sessions_revoked = on_sessions_revoked
        # Drops what other services cached about a user who was disabled, enabled or deleted.
        self.on_user_changed: Callable[[str], None] = lambda username: None

    def address(self, username: str) -> str:
        return f"{username}@{self.node_name}"

    # -- passwords ---------------------------------------------------------------

    async def _hash_password(self, password: str) -> str:
        _check_password(password)
        hashed: bytes = await trio.to_thread.run_sync(
            lambda: nacl.pwhash.argon2id.str(password.encode(), opslimit=self._ops, memlimit=self._mem)
        )
        return hashed.decode()

    @staticmethod
    def _verify_password(stored: str, password: str) -> bool:
        try:
            return bool(nacl.pwhash.verify(stored.encode(), password.encode()))
        except (nacl.exceptions.InvalidkeyError, nacl.exceptions.CryptoError):
            return False

    # -- registration and login ---------------------------------------------------

    async def register(self, username: str, password: str, invite: str | None = None, *, by_operator: bool = False) -> UserRecord:
        """Create a user. Operators bypass the registration mode and invites.

        Raises RegistrationClosed, BadInvite, BadRequest (name or password rules)
        or UsernameTaken.
        """
        username = _check_username(username)
        invite_hash = None
        if not by_operator:
            mode = self.config.registration
            if mode == "closed":
                raise RegistrationClosed("registration on this node is closed")
            if mode == "invite":
                if not invite:
                    raise BadInvite("this node needs an invite code to register")
                invite_hash = token_hash(invite)
        password_hash = await self._hash_password(password)
        await self.repo.create_user(username, password_hash, self._clock_ms(), invite_hash)
        user = await self.repo.get_user(username)
        assert user is not None
        log.info("user.registered", user=username, by_operator=by_operator)
        return user

    async def login(self, username: str, password: str, client: str, device_id: int | None = None) -> LoginResult:
        """Check the password and open a session (bound to ``device_id`` if given).

        Failures are limited per user name and per client address; past the limit,
        RateLimited is raised without checking the password.
        """
        now = self._clock_ms() / 1000
        user_key, ip_key = f"user:{username}", f"ip:{client}"
        wait = max(self._limiter.retry_after(user_key, now), self._ip_limiter.retry_after(ip_key, now))
        if wait > 0:
            log.warning("login.rate_limited", user=username, client=client)
            raise RateLimited("too many failed logins; try again later", retry_after=wait)
        user = await self.repo.get_user(username) if USERNAME_RE.match(username) else None
        ok = user is not None and await trio.to_thread.run_sync(self._verify_password, user.password_hash, password)
        if not ok or user is None:
            self._limiter.record_failure(user_key, now)
            self._ip_limiter.record_failure(ip_key, now)
            log.info("login.failed", user=username, client=client)
            raise BadCredentials("wrong user name or password")
        if user.disabled:
            raise AccountDisabled("this account is disabled")
        self._limiter.reset(user_key)
        token = secrets.token_urlsafe(32)
        now_ms = self._clock_ms()
        ttl_ms = self.config.session_ttl_s * 1000
        session_id = await self.repo.create_session(token_hash(token), user.id, device_id, now_ms, ttl_ms)
        log.info("login.ok", user=username, session=session_id)
        session = Session(session_id, user.id, user.username, self.address(user.username), device_id, now_ms + ttl_ms)
        return LoginResult(token, session)

    async def authenticate(self, token: str | None) -> Session:
        """The session a bearer token stands for; raises Unauthenticated or TokenExpired."""
        if not token:
            raise Unauthenticated("a session token is required")
        record = await self.repo.find_session(token_hash(token))
        if record is None or record.revoked:
            raise Unauthenticated("the session token is not valid")
        if record.expires_at <= self._clock_ms():
            raise TokenExpired("the session has expired; log in again")
        if record.user_disabled:
            raise AccountDisabled("this account is disabled")
        return Session(
            record.id, record.user_id, record.username, self.address(record.username), record.device_id, record.expires_at
        )

    async def logout(self, session: Session) -> None:
        await self.repo.revoke_session(session.id)
        self.on_sessions_revoked(session.user_id, session.id)
        log.info("logout", user=session.username, session=session.id)

    async def set_read_receipts(self, session: Session, enabled: bool) -> None:
        await self.repo.set_read_receipts(session.user_id, enabled)

    async def set_show_presence(self, session: Session, shown: bool) -> None:
        """Whether others see the user online, away, and when last seen."""
        await self.repo.set_show_presence(session.user_id, shown)

    # -- operator actions ---------------------------------------------------------

    async def require_user(self, username: str) -> UserRecord:
        user = await self.repo.get_user(username)
        if user is None:
            raise UnknownUser(f"no user {username!r} on this node")
        return user

    async def set_disabled(self, username: str, disabled: bool) -> None:
        user = await self.require_user(username)
        await self.repo.set_disabled(user.id, disabled)
        self.on_user_changed(username)
        if disabled:
            await self.repo.revoke_user_sessions(user.id)
            self.on_sessions_revoked(user.id, None)
        log.info("user.disabled" if disabled else "user.enabled", user=username)

    async def reset_password(self, username: str, password: str) -> None:
        user = await self.require_user(username)
        await self.repo.set_password_hash(user.id, await self._hash_password(password))
        await self.repo.revoke_user_sessions(user.id)
        self.on_sessions_revoked(user.id, None)
        log.info("user.password_reset", user=username)

    async def delete_user(self, username: str) -> None:
        user = await self.require_user(username)
        self.on_sessions_revoked(user.id, None)
        await self.repo.delete_user(user.id, self._clock_ms())
        self.on_user_changed(username)
        log.info("user.deleted", user=username)

    async def revoke_sessions(self, username: str) -> int:
        user = await self.require_user(username)
        count = await self.repo.revoke_user_sessions(user.id)
        self.on_sessions_revoked(user.id, None)
        return count

    async def create_invite(self, *, max_uses: int = 1, ttl_s: int | None = 7 * 24 * 3600, note: str = "") -> tuple[int, str]:
        """A new invite code (shown once: only its hash is stored) and its id."""
        if max_uses < 1:
            raise BadRequest("max_uses must be at least 1")
        code = secrets.token_urlsafe(12)
        now = self._clock_ms()
        expires = now + ttl_s * 1000 if ttl_s else None
        invite_id = await self.repo.create_invite(token_hash(code), now, expires, max_uses, note[:200])
        log.info("invite.created", invite=invite_id, max_uses=max_uses)
        return invite_id, code

    async def list_invites(self) -> list[InviteRecord]:
        return await self.repo.list_invites()

    async def revoke_invite(self, invite_id: int) -> None:
        if not await self.repo.revoke_invite(invite_id):
            raise BadRequest(f"no invite {invite_id}")
        log.info("invite.revoked", invite=invite_id)


def _check_username(username: str) -> str:
    if not isinstance(username, str) or not USERNAME_RE.match(username):
        raise BadRequest("user names are 1-32 characters: lower-case letters, digits, '_', '.' and '-'")
    return username


def _check_password(password: str) -> None:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise BadRequest(f"passwords are {MIN_PASSWORD} to {MAX_PASSWORD} characters")
