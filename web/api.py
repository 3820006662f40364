"""The HTTP JSON API under ``/api/v1`` (docs/protocol.md lists every route).

Handlers parse and check input, call one service, and shape the answer; errors are
``MootError``s turned into ``{"error": {"code", "message"}}`` by ``error_response``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from node.accounts import Session
from node.devices import b64e, public_view
from node.errors import BadRequest, MootError, RateLimited, TooLarge
from node.profiles import AVATAR_TYPES, DIRECTORY_PAGE_MAX, MAX_AVATAR_BYTES
from node.logs import get_logger
from node.turn import ice_servers_for
from node.messaging import history_item_json
from storage.repos.accounts import UserRecord
from storage.repos.messages import peer_of
from web import frames
from web.auth import COOKIE, authenticate

if TYPE_CHECKING:
    from node.app import Node

log = get_logger("moot.api")
_encoder = msgspec.json.Encoder()


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


def error_response(exc: MootError) -> JSON:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.details:
        body["details"] = exc.details
    headers = {"Retry-After": str(max(1, int(exc.retry_after + 0.999)))} if isinstance(exc, RateLimited) else None
    return JSON({"error": body}, status_code=exc.status, headers=headers)


def _node(request: Request) -> Node:
    return request.app.state.node  # type: ignore[no-any-return]


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object in the body; JSON content type only (a CSRF barrier), size-limited."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest("send a JSON body with Content-Type: application/json")
    limit = _node(request).config.max_frame_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body exceeds {limit} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise TooLarge(f"body exceeds {limit} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string", field=key)
    return value


async def _session(request: Request) -> Session:
    return await authenticate(request, _node(request).accounts)


def _client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def info(request: Request) -> JSON:
    node = _node(request)
    return JSON({
        "node": node.name, "protocol": frames.PROTOCOL_VERSION, "version": node.version,
        "registration": node.config.registration, "web_url": node.config.web_url,
        "limits": {
            "max_frame_bytes": node.config.max_frame_bytes, "max_envelope_bytes": node.config.max_envelope_bytes,
            "max_attachment_bytes": node.config.max_attachment_bytes,
        },
    })


async def register(request: Request) -> JSON:
    body = await _body(request)
    user = await _node(request).accounts.register(_str(body, "username") or "", _str(body, "password") or "", _str(body, "invite", required=False))
    return JSON({"user": _node(request).accounts.address(user.username)}, status_code=201)


async def login(request: Request) -> JSON:
    node = _node(request)
    body = await _body(request)
    device_id = None
    public_device = _str(body, "device", required=False)
    username = _str(body, "username") or ""
    result = await node.accounts.login(username, _str(body, "password") or "", _client_address(request))
    if public_device:
        device = await node.device_repo.get_by_public_id(public_device)
        if device is None or device.user_id != result.session.user_id:
            await node.accounts.logout(result.session)
            raise BadRequest("no such device of yours", field="device")
        await node.account_repo.bind_session_device(result.session.id, device.id)
        device_id = device.public_id
    cookie = body.get("cookie") is True
    answer: dict[str, Any] = {"user": result.session.address, "device": device_id, "expires_at": result.session.expires_at}
    if not cookie:
        # A cookie session's token stays out of reach of page script: it is only in the HttpOnly cookie.
        answer["token"] = result.token
    response = JSON(answer)
    if cookie:
        response.set_cookie(
            COOKIE, result.token, max_age=node.config.session_ttl_s, httponly=True, samesite="strict",
            secure=node.config.web_url.startswith("https://"), path="/",
        )
    return response


async def logout(request: Request) -> JSON:
    session = await _session(request)
    await _node(request).accounts.logout(session)
    response = JSON({"ok": True})
    response.delete_cookie(COOKIE, path="/")
    return response


async def me(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    user = await node.accounts.require_user(session.username)
    device = await node.device_repo.get(session.device_id) if session.device_id else None
    return JSON({
        "user": session.address, "device": device.public_id if device else None,
        "settings": _settings(user), "expires_at": session.expires_at,
    })


def _settings(user: UserRecord) -> dict[str, bool]:
    return {"read_receipts": user.read_receipts, "show_presence": user.show_presence}


async def settings(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    body = await _body(request)
    if "read_receipts" in body:
        if not isinstance(body["read_receipts"], bool):
            raise BadRequest("read_receipts must be true or false")
        await node.accounts.set_read_receipts(session, body["read_receipts"])
    if "show_presence" in body:
        if not isinstance(body["show_presence"], bool):
            raise BadRequest("show_presence must be true or false")
        await node.accounts.set_show_presence(session, body["show_presence"])
        node.presence.changed(session.user_id)  # everyone watching sees the change now
    user = await node.accounts.require_user(session.username)
    return JSON({"settings": _settings(user)})


async def devices_create(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    device = await node.devices.register(session, await _body(request))
    node.messaging.forget_devices(session.user_id)
    await node.messaging.remote.devices_changed(session.address)
    return JSON({"device": device.public_id}, status_code=201)


async def devices_mine(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    return JSON({"devices": [public_view(d) for d in await node.device_repo.list_for_user(session.user_id)]})


async def device_prekeys(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    count = await node.devices.add_prekeys(session, request.path_params["device"], await _body(request))
    return JSON({"one_time_prekeys": count})


async def device_delete(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    await node.devices.remove(session, request.path_params["device"])
    node.messaging.forget_devices(session.user_id)
    await node.messaging.remote.devices_changed(session.address)
    for conn in node.hub.connections(session.user_id):
        if conn.device_public_id == request.path_params["device"]:
            conn.close(4401, "device removed")
    return JSON({"ok": True})


async def user_devices(request: Request) -> JSON:
    node = _node(request)
    await _session(request)
    address = request.path_params["address"]
    _, home = frames.split_address(address)
    if home != node.name:
        # Another node's user: asked of that node over federation, fresh (clients ask before encrypting).
        return JSON({"user": address, "devices": await node.messaging.remote.devices_of(address, fresh=True)})
    devices = await node.devices.devices_of(address)
    return JSON({"user": address, "devices": [public_view(d) for d in devices]})


async def claim_prekey(request: Request) -> JSON:
    node = _node(request)
    await _session(request)
    claimed = await node.devices.claim_prekey(request.path_params["address"], request.path_params["device"])
    return JSON({"one_time_prekey": {"id": claimed[0], "key": b64e(claimed[1])} if claimed else None})


async def user_search(request: Request) -> JSON:
    node = _node(request)
    await _session(request)
    prefix = request.query_params.get("q", "").strip().lower()
    users = await node.account_repo.list_users(prefix=prefix, limit=50, listed_only=True)
    return JSON({"users": [node.accounts.address(u.username) for u in users if not u.disabled]})


# -- profiles and the directory ----------------------------------------------------------


async def my_profile(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    if request.method == "GET":
        return JSON({"profile": await node.profiles.mine(session)})
    return JSON({"profile": await node.profiles.update(session, await _body(request))})


async def _image_body(request: Request) -> tuple[str, bytes]:
    """The raw image in the body and its declared type, read with a hard cap."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in AVATAR_TYPES:
        raise BadRequest(f"send the image as one of {', '.join(AVATAR_TYPES)}", reason="image_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_AVATAR_BYTES:
        raise TooLarge(f"an avatar is at most {MAX_AVATAR_BYTES} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_AVATAR_BYTES:
            raise TooLarge(f"an avatar is at most {MAX_AVATAR_BYTES} bytes")
    return content_type, bytes(raw)


async def my_avatar(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    if request.method == "DELETE":
        return JSON({"profile": await node.profiles.delete_avatar(session)})
    content_type, data = await _image_body(request)
    return JSON({"profile": await node.profiles.set_avatar(session, content_type, data)})


async def user_profile(request: Request) -> JSON:
    node = _node(request)
    await _session(request)
    return JSON({"profile": await node.profiles.profile_of(request.path_params["address"])})


async def user_avatar(request: Request) -> Response:
    node = _node(request)
    await _session(request)
    avatar = await node.profiles.avatar_of(request.path_params["address"])
    etag = f'"{avatar.digest}"'
    # Private: only signed-in users may fetch it. Pages ask with ?v=<digest>, so a
    # new picture is a new URL and the old one may be kept a while.
    headers = {"ETag": etag, "Cache-Control": "private, max-age=300"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(avatar.data, media_type=avatar.content_type, headers=headers)


async def directory(request: Request) -> JSON:
    node = _node(request)
    await _session(request)
    params = request.query_params
    try:
        limit = int(params.get("limit", "20"))
    except ValueError:
        raise BadRequest(f"limit is 1 to {DIRECTORY_PAGE_MAX}", field="limit") from None
    users, following = await node.profiles.directory(params.get("q", ""), after=params.get("after", ""), limit=limit)
    return JSON({"users": users, "next": following})


async def conversations(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    out = []
    for conv in await node.messaging.conversations(session):
        last = None
        if conv.last is not None:
            m = conv.last
            last = {
                "seq": m.seq, "id": m.client_id, "sender": m.sender, "sender_device": m.sender_device,
                "ts": m.created_at, "envelope": msgspec.Raw(m.envelope),
            }
            if m.sender == session.address:
                last["status"] = "read" if conv.last_read else "delivered" if conv.last_delivered else "sent"

        out.append({"peer": peer_of(conv.key, session.address), "last": last, "unread": conv.unread})
    return JSON({"conversations": out})


async def history(request: Request) -> JSON:
    node = _node(request)
    session = await _session(request)
    try:
        before = int(request.query_params["before"]) if "before" in request.query_params else None
        limit = int(request.query_params.get("limit", "50"))
    except ValueError:
        raise BadRequest("before and limit must be integers") from None
    peer = request.path_params["address"]
    items = await node.messaging.history(session, peer, before, limit)
    return JSON({
        "messages": [history_item_json(i, session.address) for i in items],
        "before": items[-1].message.seq if items else None,
    })


async def ice(request: Request) -> JSON:
    """The ICE servers for this user's calls, with TURN credentials that expire."""
    node = _node(request)
    session = await _session(request)
    config = node.config
    servers = ice_servers_for(
        session.address, urls=config.ice_servers, secret=config.turn_secret, ttl_s=config.turn_ttl_s,
        now=node.clock() / 1000,
    )
    # Credentials: no cache may keep them past their time (or hand them to another user).
    return JSON(
        {"ice_servers": [s.as_json() for s in servers], "ttl_s": config.turn_ttl_s},
        headers={"Cache-Control": "no-store"},
    )


routes = [
    Route("/api/v1/info", info, methods=["GET"]),
    Route("/api/v1/register", register, methods=["POST"]),
    Route("/api/v1/login", login, methods=["POST"]),
    Route("/api/v1/logout", logout, methods=["POST"]),
    Route("/api/v1/me", me, methods=["GET"]),
    Route("/api/v1/me/settings", settings, methods=["PATCH", "POST"]),
    Route("/api/v1/devices", devices_create, methods=["POST"]),
    Route("/api/v1/devices", devices_mine, methods=["GET"]),
    Route("/api/v1/devices/{device}/prekeys", device_prekeys, methods=["POST"]),
    Route("/api/v1/devices/{device}", device_delete, methods=["DELETE"]),
    Route("/api/v1/me/profile", my_profile, methods=["GET", "PATCH"]),
    Route("/api/v1/me/avatar", my_avatar, methods=["PUT", "DELETE"]),
    Route("/api/v1/directory", directory, methods=["GET"]),
    Route("/api/v1/users", user_search, methods=["GET"]),
    Route("/api/v1/users/{address}/profile", user_profile, methods=["GET"]),
    Route("/api/v1/users/{address}/avatar", user_avatar, methods=["GET"]),
    Route("/api/v1/users/{address}/devices", user_devices, methods=["GET"]),
    Route("/api/v1/users/{address}/devices/{device}/claim", claim_prekey, methods=["POST"]),
    Route("/api/v1/conversations", conversations, methods=["GET"]),
    Route("/api/v1/conversations/{address}/messages", history, methods=["GET"]),
    Route("/api/v1/ice", ice, methods=["GET"]),
]
