"""The local admin socket: how `moot` talks to a running node.

Wire: newline-delimited JSON over a Unix socket at ``<data_dir>/admin.sock`` whose
file mode is 0600, so only the node's owner can connect; that file mode is the whole
of the authentication. A request is ``{"id": n, "op": "user.add", "args": {...}}``;
the answer is ``{"id": n, "ok": true, "result": ...}`` or
``{"id": n, "ok": false, "error": {"code": ..., "message": ...}}``. Requests on one
connection are answered in order. A request line longer than 64 KiB is answered
with ``too_large`` and the connection is closed; any other bad request gets an
error answer and the connection keeps serving.

The module has three parts: the codec (pure functions and a line buffer, no I/O),
the operations (one small function per op over the ``AdminOps`` protocol) and the
trio glue (``serve_admin`` for the node, ``admin_call`` for the CLI).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket as stdlib_socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from node.errors import BadRequest, MissingField, MootError, TooLarge
from node.logs import get_logger

if TYPE_CHECKING:
    from node.accounts import AccountService
    from node.profiles import ProfileService
    from storage.repos import UserRecord

log = get_logger("moot.admin")

MAX_REQUEST_LINE = 64 * 1024
# Answers carry user and invite lists, so the client accepts far longer lines.
MAX_RESPONSE_LINE = 64 * 1024 * 1024
_RECV_BYTES = 64 * 1024

RequestId = int | str | None


class BadJson(BadRequest):
    code = "bad_json"


class UnknownOp(BadRequest):
    code = "unknown_op"


class AdminError(Exception):
    """The node answered a request with an error (client side)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class NodeNotRunning(Exception):
    """No node listens on the admin socket: the file is missing or refuses connections."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"no node is listening on {path}")
        self.path = path


class AdminSocketInUse(OSError):
    """Another live process serves the admin socket path (or it is not a socket).

    An OSError, like EADDRINUSE for a TCP port: the node cannot start.
    """


# -- codec (sans-IO) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminRequest:
    id: RequestId
    op: str
    args: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AdminResponse:
    id: RequestId
    ok: bool
    result: Any = None
    error_code: str = ""
    error_message: str = ""


class LineBuffer:
    """Splits a byte stream into lines, refusing any line longer than ``max_line``.

    ``feed(data)`` adds bytes; ``next_line()`` returns one complete line without its
    newline, or None until more data arrives. Raises TooLarge once a line (complete
    or not) exceeds the limit; the buffer is unusable afterwards.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes already known to hold no newline

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buf)
            if len(self._buf) > self.max_line:
                raise TooLarge(f"lines are limited to {self.max_line} bytes")
            return None
        if end > self.max_line:
            raise TooLarge(f"lines are limited to {self.max_line} bytes")
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        self._scanned = 0
        return line


def encode_request(request_id: RequestId, op: str, args: Mapping[str, Any] | None = None) -> bytes:
    return _line({"id": request_id, "op": op, "args": dict(args or {})})


def parse_request(line: bytes) -> AdminRequest:
    """Parse one request line; raises BadJson or BadRequest (with the id when known)."""
    try:
        raw = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadJson("the request is not valid JSON") from exc
    if not isinstance(raw, dict):
        raise BadRequest("a request is a JSON object")
    request_id = raw.get("id")
    if not isinstance(request_id, int | str | None) or isinstance(request_id, bool):
        raise BadRequest("'id' must be an integer, a string or null")
    op = raw.get("op")
    if not isinstance(op, str) or not op:
        raise BadRequest("'op' must be a non-empty string", id=request_id)
    args = raw.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest("'args' must be a JSON object", id=request_id)
    return AdminRequest(request_id, op, args)


def encode_result(request_id: RequestId, result: Any) -> bytes:
    """Raises TypeError if ``result`` is not JSON-serialisable."""
    return _line({"id": request_id, "ok": True, "result": result})


def encode_error(request_id: RequestId, code: str, message: str) -> bytes:
    return _line({"id": request_id, "ok": False, "error": {"code": code, "message": message}})


def parse_response(line: bytes) -> AdminResponse:
    """Parse one answer line; raises AdminError("bad_response") on anything malformed."""
    try:
        raw = json.loads(line)
        if raw["ok"] is True:
            return AdminResponse(raw.get("id"), True, result=raw.get("result"))
        error = raw["error"]
        return AdminResponse(raw.get("id"), False, error_code=str(error["code"]), error_message=str(error["message"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise AdminError("bad_response", "the node sent a malformed answer") from exc


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


# -- operations ---------------------------------------------------------------------


class AdminOps(Protocol):
    """What the running node hands the admin server."""

    @property
    def accounts(self) -> AccountService: ...

    def status(self) -> dict[str, Any]:
        """Uptime, node name, web URL, connected sessions and similar, JSON-ready."""
        ...

    @property
    def profiles(self) -> ProfileService: ...

    @property
    def federation(self) -> Any:
        """federation.service.FederationService, or None when the node does not federate."""
        ...


Handler = Callable[["AdminOps", Mapping[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _Op:
    handler: Handler
    arg_names: frozenset[str]


_OPS: dict[str, _Op] = {}
_REQUIRED: Any = object()


def _op(name: str, *arg_names: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _OPS[name] = _Op(handler, frozenset(arg_names))
        return handler

    return register


def _arg(args: Mapping[str, Any], name: str, kind: type, default: Any = _REQUIRED) -> Any:
    value = args.get(name)
    if value is None:
        if default is _REQUIRED:
            raise MissingField(f"missing argument {name!r}", field=name)
        return default
    # bool is an int to Python, never to an operator.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"argument {name!r} must be a {'string' if kind is str else 'integer'}", field=name)
    return value


def user_fields(ops: AdminOps, user: UserRecord) -> dict[str, Any]:
    """What the operator sees of a user: everything except the password hash."""
    return {
        "id": user.id,
        "username": user.username,
        "address": ops.accounts.address(user.username),
        "created_at": user.created_at,
        "disabled": user.disabled,
        "read_receipts": user.read_receipts,
        "last_seen": user.last_seen,
    }


@_op("status")
async def _status(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    return ops.status()


@_op("user.add", "username", "password")
async def _user_add(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    user = await ops.accounts.register(_arg(args, "username", str), _arg(args, "password", str), by_operator=True)
    return user_fields(ops, user)


@_op("user.list", "prefix", "limit")
async def _user_list(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    limit = _arg(args, "limit", int, 1000)
    if not 1 <= limit <= 100_000:
        raise BadRequest("'limit' must be between 1 and 100000", field="limit")
    users = await ops.accounts.repo.list_users(prefix=_arg(args, "prefix", str, ""), limit=limit)
    return [user_fields(ops, u) for u in users]


@_op("user.show", "username")
async def _user_show(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    user = await ops.accounts.require_user(_arg(args, "username", str))
    address = ops.accounts.address(user.username)
    profile = await ops.profiles.repo.get(user.username)
    shown: dict[str, Any] = {**user_fields(ops, user), **await ops.accounts.repo.user_stats(user.id)}
    if profile is not None:
        avatar = profile.avatar
        shown.update({
            "display_name": profile.display_name, "status_text": profile.status_text, "listed": profile.listed,
            "avatar": f"{avatar.content_type}, {avatar.size} bytes" if avatar else None,
            "profile_updated_at": profile.updated_at,
        })
    shown["storage"] = storage = await ops.profiles.repo.storage_used(user.id, address)
    attachments = getattr(ops, "attachments", None)
    if attachments is not None:
        used = await attachments.storage_used(user.id)
        storage.update(used)
        storage["total_bytes"] += used["attachment_bytes"]
    return shown


@_op("user.disable", "username")
async def _user_disable(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    await ops.accounts.set_disabled(_arg(args, "username", str), True)
    return None


@_op("user.enable", "username")
async def _user_enable(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    await ops.accounts.set_disabled(_arg(args, "username", str), False)
    return None


@_op("user.delete", "username")
async def _user_delete(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    await ops.accounts.delete_user(_arg(args, "username", str))
    return None


@_op("user.reset-password", "username", "password")
async def _user_reset_password(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    await ops.accounts.reset_password(_arg(args, "username", str), _arg(args, "password", str))
    return None


@_op("user.logout", "username")
async def _user_logout(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    return {"revoked": await ops.accounts.revoke_sessions(_arg(args, "username", str))}


@_op("invite.create", "max_uses", "ttl_s", "note")
async def _invite_create(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    ttl_s = _arg(args, "ttl_s", int, 7 * 24 * 3600)
    if ttl_s < 0:
        raise BadRequest("'ttl_s' must not be negative (0 means no expiry)", field="ttl_s")
    invite_id, code = await ops.accounts.create_invite(
        max_uses=_arg(args, "max_uses", int, 1), ttl_s=ttl_s or None, note=_arg(args, "note", str, "")
    )
    return {"id": invite_id, "code": code}


@_op("invite.list")
async def _invite_list(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    return [dataclasses.asdict(invite) for invite in await ops.accounts.list_invites()]


@_op("invite.revoke", "id")
async def _invite_revoke(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    await ops.accounts.revoke_invite(_arg(args, "id", int))
    return None


def _federation(ops: AdminOps) -> Any:
    if ops.federation is None:
        raise BadRequest("this node does not federate (federation_listen is empty)")
    return ops.federation


@_op("peers.list")
async def _peers_list(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    return await _federation(ops).peers()


@_op("peers.add", "address")
async def _peers_add(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    return {"node": await _federation(ops).add_peer(_arg(args, "address", str))}


@_op("peers.pin", "address")
async def _peers_pin(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    return await _federation(ops).pin_peer(_arg(args, "address", str))


@_op("peers.block", "node")
async def _peers_block(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    await _federation(ops).set_blocked(_arg(args, "node", str), True)
    return None


@_op("peers.unblock", "node")
async def _peers_unblock(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    await _federation(ops).set_blocked(_arg(args, "node", str), False)
    return None


@_op("peers.retry", "node")
async def _peers_retry(ops: AdminOps, args: Mapping[str, Any]) -> Any:
    await _federation(ops).retry(_arg(args, "node", str))
    return None


OP_NAMES = frozenset(_OPS)


async def handle_request(ops: AdminOps, line: bytes) -> bytes:
    """Answer one request line. Never raises, except for cancellation.

    A MootError becomes its code and message; any other exception is logged and
    answered as ``internal``.
    """
    try:
        request = parse_request(line)
    except MootError as exc:
        # parse_request attaches the request's id when it could read one.
        known_id = exc.details.get("id")
        return encode_error(known_id if isinstance(known_id, int | str) else None, exc.code, exc.message)
    try:
        op = _OPS.get(request.op)
        if op is None:
            raise UnknownOp(f"unknown operation {request.op!r}")
        unknown = sorted(set(request.args) - op.arg_names)
        if unknown:
            raise BadRequest(f"{request.op} takes no argument {unknown[0]!r}", field=unknown[0])
        return encode_result(request.id, await op.handler(ops, request.args))
    except MootError as exc:
        return encode_error(request.id, exc.code, exc.message)
    except Exception:
        log.exception("admin.op_failed", op=request.op)
        return encode_error(request.id, "internal", "the operation failed; see the node's log")


# -- trio glue ----------------------------------------------------------------------


async def _serve_connection(ops: AdminOps, stream: trio.SocketStream) -> None:
    buffer = LineBuffer(MAX_REQUEST_LINE)
    try:
        async with stream:
            while True:
                try:
                    line = buffer.next_line()
                except TooLarge as exc:
                    await stream.send_all(encode_error(None, exc.code, exc.message))
                    return
                if line is None:
                    data = await stream.receive_some(_RECV_BYTES)
                    if not data:
                        return
                    buffer.feed(data)
                elif line.strip():
                    await stream.send_all(await handle_request(ops, line))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to answer
    except Exception:
        log.exception("admin.connection_failed")


def _bind_private(path: Path) -> stdlib_socket.socket:
    """A listening Unix socket at ``path`` that only this user can connect to.

    The umask makes the file 0600 from the moment it exists (a chmod after bind
    would leave a window). The bind is a synchronous stdlib call on purpose: trio
    binds Unix sockets in a worker thread, and the process-wide umask must not stay
    changed while other tasks run.
    """
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file left by a node that died; refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AdminSocketInUse(f"{path} exists and is not a socket; remove it if it is not needed")
    probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        await probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise AdminSocketInUse(f"another node is already serving {path}")


async def serve_admin(path: Path, ops: AdminOps, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin protocol on a Unix socket at ``path`` until cancelled.

    Removes a stale socket file first (raises AdminSocketInUse if another process
    still answers on it), reports readiness through ``task_status.started()`` once
    the socket listens, serves each connection in its own task, and unlinks the
    socket file on exit if it is still the one this call created.
    """
    path = Path(path)
    await _remove_stale_socket(path)
    sock = _bind_private(path)
    inode = os.stat(path).st_ino
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    log.info("admin.listening", path=str(path))
    try:
        task_status.started()
        await trio.serve_listeners(lambda stream: _serve_connection(ops, stream), [listener])
    finally:
        listener.socket.close()
        try:
            if os.stat(path).st_ino == inode:
                path.unlink()
        except FileNotFoundError:
            pass


class AdminConnection:
    """One client connection to the admin socket; requests are answered in order."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = LineBuffer(MAX_RESPONSE_LINE)
        self._next_id = 1

    async def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run one operation; returns its result or raises AdminError."""
        request_id, self._next_id = self._next_id, self._next_id + 1
        try:
            await self._stream.send_all(encode_request(request_id, op, args))
            response = parse_response(await self._receive_line())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise AdminError("connection_lost", "the node closed the admin connection") from exc
        if response.id != request_id and response.id is not None:
            raise AdminError("bad_response", f"answer to request {response.id!r}, expected {request_id}")
        if not response.ok:
            raise AdminError(response.error_code, response.error_message)
        return response.result

    async def _receive_line(self) -> bytes:
        while True:
            try:
                line = self._buffer.next_line()
            except TooLarge as exc:
                raise AdminError("bad_response", "the node's answer is too long") from exc
            if line is not None:
                return line
            data = await self._stream.receive_some(_RECV_BYTES)
            if not data:
                raise AdminError("connection_lost", "the node closed the admin connection without answering")
            self._buffer.feed(data)


@asynccontextmanager
async def open_admin_connection(path: Path) -> AsyncIterator[AdminConnection]:
    """Connect to a node's admin socket; raises NodeNotRunning or AdminError."""
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise NodeNotRunning(Path(path)) from exc
    except PermissionError as exc:
        sock.close()
        raise AdminError("forbidden", f"no permission to use {path}; run moot as the node's owner") from exc
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOTSOCK:
            raise NodeNotRunning(Path(path)) from exc
        raise AdminError("unreachable", f"cannot connect to {path}: {exc.strerror or exc}") from exc
    async with trio.SocketStream(sock) as stream:
        yield AdminConnection(stream)


async def admin_call(path: Path, op: str, args: Mapping[str, Any] | None = None) -> Any:
    """Run one operation on the node serving ``path``.

    Returns the operation's result. Raises NodeNotRunning when no node listens
    there and AdminError(code, message) when the node answers with an error.
    """
    async with open_admin_connection(path) as conn:
        return await conn.call(op, args)


__all__ = [
    "MAX_REQUEST_LINE", "OP_NAMES", "AdminConnection", "AdminError", "AdminOps", "AdminRequest",
    "AdminResponse", "AdminSocketInUse", "BadJson", "LineBuffer", "NodeNotRunning", "UnknownOp",
    "admin_call", "encode_error", "encode_request", "encode_result", "handle_request",
    "open_admin_connection", "parse_request", "parse_response", "serve_admin", "user_fields",
]
