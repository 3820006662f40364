"""The admin socket: the line codec without I/O, then a real server over a real SQLite
database, driven through the client helper and through raw sockets."""

from __future__ import annotations

import json
import os
import socket as stdlib_socket
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from node.accounts import AccountService
from node.admin import (
    MAX_REQUEST_LINE,
    AdminError,
    AdminSocketInUse,
    LineBuffer,
    NodeNotRunning,
    admin_call,
    encode_error,
    encode_request,
    open_admin_connection,
    parse_request,
    parse_response,
    serve_admin,
)
from node.config import load_config
from node.profiles import ProfileService
from node.remote import NoRemote
from node.errors import AccountDisabled, BadCredentials, BadRequest, TooLarge, Unauthenticated
from storage import open_database
from storage.repos import AccountRepo, ProfileRepo

# -- codec, no sockets -----------------------------------------------------------------


def test_request_bytes() -> None:
    wire = b'{"id":1,"op":"user.show","args":{"username":"alice"}}\n'
    assert encode_request(1, "user.show", {"username": "alice"}) == wire
    request = parse_request(wire.rstrip(b"\n"))
    assert (request.id, request.op, dict(request.args)) == (1, "user.show", {"username": "alice"})


def test_response_bytes() -> None:
    wire = b'{"id":"a","ok":false,"error":{"code":"unknown_user","message":"no user"}}\n'
    assert encode_error("a", "unknown_user", "no user") == wire
    response = parse_response(wire)
    assert (response.id, response.ok, response.error_code, response.error_message) == ("a", False, "unknown_user", "no user")
    with pytest.raises(AdminError) as caught:
        parse_response(b'{"id":1}')
    assert caught.value.code == "bad_response"


def test_line_buffer_splits_and_limits() -> None:
    buffer = LineBuffer(8)
    buffer.feed(b"ab")
    assert buffer.next_line() is None
    buffer.feed(b"c\nde\n\nf")
    assert [buffer.next_line(), buffer.next_line(), buffer.next_line(), buffer.next_line()] == [b"abc", b"de", b"", None]
    buffer.feed(b"2345678")  # "f2345678": exactly at the limit, still waiting
    assert buffer.next_line() is None
    buffer.feed(b"\n")
    assert buffer.next_line() == b"f2345678"
    buffer.feed(b"123456789")
    with pytest.raises(TooLarge):
        buffer.next_line()


def test_parse_request_rejects_malformed() -> None:
    for line, code in [
        (b"not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1, 2]", "bad_request"),
        (b'{"id": [1], "op": "status"}', "bad_request"),
        (b'{"id": 3, "op": 5}', "bad_request"),
        (b'{"id": 3, "op": "status", "args": [1]}', "bad_request"),
    ]:
        with pytest.raises(BadRequest) as caught:
            parse_request(line)
        assert caught.value.code == code, line


# -- a real server ------------------------------------------------------------------


@dataclass
class NodeOps:
    """What a node hands the admin server: its accounts and a status snapshot."""

    accounts: AccountService
    profiles: ProfileService | None = None
    fail_status: bool = False

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("status exploded")
        return {"node": "testnode", "uptime_s": 1.5, "connections": 0}


@dataclass
class AdminNode:
    path: Path
    ops: NodeOps

    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        with trio.fail_after(10):
            return await admin_call(self.path, op, args)

    async def error_code(self, op: str, args: dict[str, Any] | None = None) -> str:
        with pytest.raises(AdminError) as caught:
            await self.call(op, args)
        return caught.value.code


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[AdminNode]:
    config = load_config(tmp_path, overrides={"password_hash_cost": "min"}, environ={})
    async with open_database(f"sqlite:///{tmp_path}/t.db") as db:
        accounts = AccountService(AccountRepo(db), config, "testnode", clock_ms=lambda: int(time.time() * 1000))
        profiles = ProfileService(ProfileRepo(db), "testnode", NoRemote(), clock_ms=lambda: int(time.time() * 1000))
        ops = NodeOps(accounts, profiles)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_admin, config.admin_socket, ops)
            yield AdminNode(config.admin_socket, ops)
            nursery.cancel_scope.cancel()


async def _connect(path: Path) -> trio.SocketStream:
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    await sock.connect(os.fspath(path))
    return trio.SocketStream(sock)


async def _read_until_closed(stream: trio.SocketStream) -> list[dict[str, Any]]:
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def _read_lines(stream: trio.SocketStream, count: int) -> list[dict[str, Any]]:
    data = b""
    with trio.fail_after(10):
        while data.count(b"\n") < count:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def test_socket_file_is_private(node: AdminNode) -> None:
    mode = os.stat(node.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_status(node: AdminNode) -> None:
    assert await node.call("status") == {"node": "testnode", "uptime_s": 1.5, "connections": 0}


async def test_user_add_list_show(node: AdminNode) -> None:
    added = await node.call("user.add", {"username": "alice", "password": "correct horse"})
    assert added["username"] == "alice" and added["address"] == "alice@testnode"
    await node.call("user.add", {"username": "albert", "password": "correct horse"})
    await node.call("user.add", {"username": "bob", "password": "correct horse"})

    everyone = await node.call("user.list")
    assert [u["username"] for u in everyone] == ["albert", "alice", "bob"]
    assert [u["username"] for u in await node.call("user.list", {"prefix": "al"})] == ["albert", "alice"]
    assert [u["username"] for u in await node.call("user.list", {"prefix": "al", "limit": 1})] == ["albert"]

    shown = await node.call("user.show", {"username": "alice"})
    assert shown["id"] == added["id"] and shown["disabled"] is False and shown["last_seen"] is None
    assert {"devices": 0, "sessions": 0, "queued_events": 0}.items() <= shown.items()
    for user in [shown, added, *everyone]:
        assert "password_hash" not in user
        assert not any(str(v).startswith("$argon2") for v in user.values())


async def test_disable_enable_reset_logout_delete(node: AdminNode) -> None:
    accounts = node.ops.accounts
    await node.call("user.add", {"username": "alice", "password": "first password"})
    login = await accounts.login("alice", "first password", "127.0.0.1")

    assert await node.call("user.disable", {"username": "alice"}) is None
    assert (await node.call("user.show", {"username": "alice"}))["disabled"] is True
    with pytest.raises(Unauthenticated):
        await accounts.authenticate(login.token)  # disabling signs out
    with pytest.raises(AccountDisabled):
        await accounts.login("alice", "first password", "127.0.0.1")

    await node.call("user.enable", {"username": "alice"})
    assert (await node.call("user.show", {"username": "alice"}))["disabled"] is False
    login = await accounts.login("alice", "first password", "127.0.0.1")
    await accounts.login("alice", "first password", "127.0.0.1")
    assert (await node.call("user.show", {"username": "alice"}))["sessions"] == 2

    assert await node.call("user.logout", {"username": "alice"}) == {"revoked": 2}
    assert (await node.call("user.show", {"username": "alice"}))["sessions"] == 0
    with pytest.raises(Unauthenticated):
        await accounts.authenticate(login.token)

    await node.call("user.reset-password", {"username": "alice", "password": "second password"})
    with pytest.raises(BadCredentials):
        await accounts.login("alice", "first password", "127.0.0.1")
    await accounts.login("alice", "second password", "127.0.0.1")

    await node.call("user.delete", {"username": "alice"})
    assert await node.error_code("user.show", {"username": "alice"}) == "unknown_user"
    assert await node.call("user.list") == []


async def test_invites(node: AdminNode) -> None:
    first = await node.call("invite.create", {"max_uses": 3, "ttl_s": 3600, "note": "for carol"})
    second = await node.call("invite.create", {"ttl_s": 0})
    assert set(first) == {"id", "code"} and len(first["code"]) >= 16 and first["code"] != second["code"]

    listed = await node.call("invite.list")
    assert [i["id"] for i in listed] == [first["id"], second["id"]]
    assert listed[0]["max_uses"] == 3 and listed[0]["uses"] == 0 and listed[0]["note"] == "for carol"
    assert listed[0]["expires_at"] - listed[0]["created_at"] == 3600 * 1000
    assert listed[1]["expires_at"] is None and listed[1]["max_uses"] == 1
    assert first["code"] not in json.dumps(listed)  # only the hash is stored

    await node.call("invite.revoke", {"id": first["id"]})
    assert [i["revoked"] for i in await node.call("invite.list")] == [True, False]
    assert await node.error_code("invite.revoke", {"id": 999}) == "bad_request"
    assert await node.error_code("invite.create", {"max_uses": 0}) == "bad_request"


async def test_error_codes(node: AdminNode) -> None:
    for op in ("user.show", "user.disable", "user.enable", "user.delete", "user.logout"):
        assert await node.error_code(op, {"username": "nobody"}) == "unknown_user", op
    assert await node.error_code("user.reset-password", {"username": "nobody", "password": "long enough"}) == "unknown_user"
    await node.call("user.add", {"username": "alice", "password": "correct horse"})
    assert await node.error_code("user.add", {"username": "alice", "password": "correct horse"}) == "username_taken"
    assert await node.error_code("user.add", {"username": "Bad Name", "password": "correct horse"}) == "bad_request"
    assert await node.error_code("user.add", {"username": "carol", "password": "short"}) == "bad_request"
    assert await node.error_code("user.add", {"username": "carol"}) == "missing_field"
    assert await node.error_code("user.show", {}) == "missing_field"
    assert await node.error_code("user.show", {"username": 5}) == "bad_request"
    assert await node.error_code("invite.revoke", {"id": True}) == "bad_request"
    assert await node.error_code("user.show", {"username": "alice", "usename": "x"}) == "bad_request"
    assert await node.error_code("user.frobnicate") == "unknown_op"


async def test_garbage_keeps_the_connection_serving(node: AdminNode) -> None:
    stream = await _connect(node.path)
    async with stream:
        await stream.send_all(
            b"not json\n"
            b"\xff\xfe\n"
            b"[1, 2]\n"
            b'{"id": 7, "op": 5}\n'
            b"\n"
            b'{"id": 8, "op": "nope"}\n'
            b'{"id": "s", "op": "status"}\n'
        )
        answers = await _read_lines(stream, 6)
    assert [(a["id"], a["ok"], a.get("error", {}).get("code")) for a in answers] == [
        (None, False, "bad_json"),
        (None, False, "bad_json"),
        (None, False, "bad_request"),
        (7, False, "bad_request"),
        (8, False, "unknown_op"),
        ("s", True, None),
    ]
    assert await node.call("status")


async def test_oversized_line_closes_the_connection(node: AdminNode) -> None:
    # A line of exactly the limit is served.
    prefix = b'{"id":1,"op":"status","pad":"'
    line = prefix + b"x" * (MAX_REQUEST_LINE - len(prefix) - 2) + b'"}'
    assert len(line) == MAX_REQUEST_LINE
    stream = await _connect(node.path)
    async with stream:
        await stream.send_all(line + b"\n")
        assert (await _read_lines(stream, 1))[0]["ok"] is True

    # One byte more, even without a newline yet, is refused and the connection closed.
    stream = await _connect(node.path)
    async with stream:
        try:
            await stream.send_all(b"x" * (MAX_REQUEST_LINE + 1))
        except trio.BrokenResourceError:
            pass  # the server may close before reading everything; the answer was sent
        answers = await _read_until_closed(stream)
    assert answers == [{"id": None, "ok": False, "error": {"code": "too_large", "message": answers[0]["error"]["message"]}}]
    assert await node.call("status")


async def test_unexpected_exception_is_internal_and_logged(node: AdminNode, caplog: pytest.LogCaptureFixture) -> None:
    node.ops.fail_status = True
    assert await node.error_code("status") == "internal"
    assert any(r.getMessage() == "admin.op_failed" and r.levelname == "ERROR" for r in caplog.records)
    node.ops.fail_status = False
    assert await node.call("status")


async def test_clients_that_vanish_do_not_hurt(node: AdminNode) -> None:
    for payload in (b"", b'{"id": 1, "op": "sta', b'{"id": 1, "op": "status"}\n'):
        stream = await _connect(node.path)
        await stream.send_all(payload)
        await stream.aclose()  # gone before (or while) the answer is written
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(node.call, "user.list")
    assert await node.call("status")


async def test_one_connection_answers_in_order(node: AdminNode) -> None:
    async with open_admin_connection(node.path) as conn:
        await conn.call("user.add", {"username": "alice", "password": "correct horse"})
        with pytest.raises(AdminError) as caught:
            await conn.call("user.show", {"username": "bob"})
        assert caught.value.code == "unknown_user"
        assert (await conn.call("user.show", {"username": "alice"}))["username"] == "alice"


async def test_a_second_server_on_a_live_socket_is_refused(node: AdminNode) -> None:
    with pytest.raises(AdminSocketInUse):
        await serve_admin(node.path, node.ops)
    assert await node.call("status")


async def test_stale_socket_is_replaced_and_removed_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    stale = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()  # the file stays, nobody listens: what a crashed node leaves
    with pytest.raises(NodeNotRunning):
        await admin_call(path, "status")

    ops = NodeOps(accounts=None)  # type: ignore[arg-type]  # status needs no accounts
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_admin, path, ops)
        assert (await admin_call(path, "status"))["node"] == "testnode"
        nursery.cancel_scope.cancel()
    assert not path.exists()
    with pytest.raises(NodeNotRunning):
        await admin_call(path, "status")


async def test_a_regular_file_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    path.write_text("precious")
    with pytest.raises(AdminSocketInUse):
        await serve_admin(path, NodeOps(accounts=None))  # type: ignore[arg-type]
    assert path.read_text() == "precious"
