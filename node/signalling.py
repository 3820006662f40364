"""Call signalling: the glue between devices, other nodes and the sans-IO ``CallBook``.

Signals come from this node's devices (WebSocket ``call`` frames, sent as the
connection's own user and device) and from other nodes (``/moot/live/1``, where
federation checked that the sender is that node's user). The book (node/calls.py)
says what to relay to whom and which calls ended; this module carries it out:

- to a local user's devices: a ``call`` frame, queued ahead of everything else
  the connection has waiting;
- to a user of another node: that node, on the live stream, ahead of presence;
- an ended call: a ``call_log`` entry in each local party's stream (stored, so it
  reaches every device, also later), pushed in commit order.

One task owns the ring timeouts, and devices that drop out of a call get
``call_reconnect_grace_s`` to come back before their call ends. Payloads are the
clients' end-to-end ciphertext; the node sees only who calls whom, when, and how
it ended.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import outcome
import trio

from node.calls import CallBook, CallError, Ended, Relay, Signal
from node.errors import MootError, UnknownNode, UnknownUser
from node.hub import Connection, Hub
from node.logs import get_logger
from node.messaging import error_frame
from storage.repos import MessageRepo
from web import frames

if TYPE_CHECKING:
    from federation import wire
    from node.config import NodeConfig
    from node.devices import DeviceService
    from node.remote import Remote
    from storage.repos.messages import ReceiptEvent
    from storage.writer import GroupCommitWriter

log = get_logger("moot.calls")


class SignalPort(Protocol):
    """Federation's live links (federation/live.py)."""

    def send_signal(self, node: str, signal: wire.Signal) -> None: ...


def _node_of(address: str) -> str:
    return address.rpartition("@")[2]


class CallService:
    def __init__(
        self, hub: Hub, devices: DeviceService, messages: MessageRepo, writer: GroupCommitWriter, node_name: str,
        config: NodeConfig, *, clock_ms: Callable[[], int], remote: Remote, live: SignalPort | None = None,
    ) -> None:
        self.hub = hub
        self.devices = devices
        self.messages = messages
        self.writer = writer
        self.node_name = node_name
        self.remote = remote
        self.live = live
        self.grace_s = config.call_reconnect_grace_s
        self._clock_ms = clock_ms
        self.book = CallBook(ring_timeout_s=config.call_ring_timeout_s, is_local=lambda a: _node_of(a) == node_name)
        self._kick = trio.Event()
        self._nursery: trio.Nursery | None = None

    def _now(self) -> float:
        return self._clock_ms() / 1000

    # -- inputs ----------------------------------------------------------------------------

    async def from_client(self, conn: Connection, frame: frames.CallSignal) -> None:
        """A device's ``call`` frame; errors go back to it (``ref`` = the call id)."""
        try:
            node = _node_of(frame.to)
            if node == self.node_name:
                await self.devices.resolve_local(frame.to)  # UnknownUser
            elif self.live is None:
                raise UnknownNode(f"unknown node {node!r}: this node does not federate")
            else:
                await self.remote.require_node(node)
            signal = Signal(
                call_id=frame.call_id, kind=frame.kind, sender=conn.session.address, sender_device=conn.device_public_id,
                to=frame.to, media=frame.media, payload=frame.payload.encode(), reason=frame.reason,
            )
            actions = self.book.handle(signal, self._now())
        except CallError as exc:
            if exc.code in ("call_ended", "answered_elsewhere"):
                log.debug("calls.late_signal", call=frame.call_id, kind=frame.kind, code=exc.code)
            conn.push_urgent(error_frame(exc, frame.call_id))
            return
        except MootError as exc:
            conn.push_urgent(error_frame(exc, frame.call_id))
            return
        await self._carry_out(actions)

    async def remote_signal(self, node: str, wsig: wire.Signal) -> None:
        """A signal from ``node`` (its sender is that node's user: checked by federation)."""
        if _node_of(wsig.to) != self.node_name:
            log.info("calls.misrouted", node=node, to=wsig.to)
            return
        try:
            signal = Signal(
                call_id=wsig.call_id, kind=wsig.kind, sender=wsig.sender, sender_device=wsig.sender_device,  # type: ignore[arg-type]
                to=wsig.to, to_device=wsig.to_device, media=wsig.media, payload=wsig.payload.encode(),  # type: ignore[arg-type]
                reason=wsig.reason,
            )
            actions = self.book.handle(signal, self._now())
        except CallError as exc:
            log.info("calls.remote_signal_refused", node=node, call=wsig.call_id, kind=wsig.kind, code=exc.code)
            return
        await self._carry_out(actions)

    def connection_closed(self, conn: Connection) -> None:
        """A connection closed: if its device was in a call, give it a grace period to come back."""
        address = conn.session.address
        if self.book.call_of(address) is not None and self._nursery is not None:
            self._nursery.start_soon(self._gone_after_grace, conn.user_id, address, conn.device_public_id)

    async def _gone_after_grace(self, user_id: int, address: str, device: str) -> None:
        await trio.sleep(self.grace_s)
        if any(c.device_public_id == device for c in self.hub.connections(user_id)):
            return  # it came back
        await self._carry_out(self.book.device_gone(address, device, self._now()))

    # -- running ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the ring timeouts and the grace periods until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    deadline = self.book.next_deadline()
                    wait = math.inf if deadline is None else max(0.0, deadline - self._now())
                    self._kick = trio.Event()
                    with trio.move_on_after(wait):
                        await self._kick.wait()
                    try:
                        await self._carry_out(self.book.expire(self._now()))
                    except Exception:
                        log.exception("calls.expire_failed")
            finally:
                self._nursery = None

    # -- outputs ---------------------------------------------------------------------------

    async def _carry_out(self, actions: list[Relay | Ended]) -> None:
        self._kick.set()  # a ring timeout may have started or ended
        for action in actions:
            if isinstance(action, Relay):
                await self._relay(action)
            else:
                await self._record(action)

    async def _relay(self, relay: Relay) -> None:
        signal = relay.signal
        node = _node_of(relay.to_user)
        if node != self.node_name:
            if self.live is not None:
                from federation import wire  # only a federating node gets here

                self.live.send_signal(node, wire.Signal(
                    call_id=signal.call_id, kind=signal.kind, sender=signal.sender, sender_device=signal.sender_device,
                    to=signal.to, to_device=signal.to_device, media=signal.media, payload=signal.payload.decode(),
                    reason=signal.reason,
                ))
            return
        user_id = await self._user_id(relay.to_user)
        if user_id is None:
            return
        data = frames.encode(frames.Call(
            call_id=signal.call_id, kind=signal.kind, sender=signal.sender, sender_device=signal.sender_device,
            media=signal.media, payload=signal.payload.decode(), reason=signal.reason,
        ))
        for conn in self.hub.connections(user_id):
            device = conn.device_public_id
            if (relay.devices is None or device in relay.devices) and device != relay.except_device:
                conn.push_urgent(data)

    async def _user_id(self, address: str) -> int | None:
        """A local user's id (DeviceService caches it); None for no such user."""
        try:
            return (await self.devices.resolve_local(address))[0]
        except UnknownUser:
            return None

    async def _record(self, ended: Ended) -> None:
        """A call-history entry in the stream of each local party."""
        entries: list[tuple[int, dict[str, Any]]] = []
        for me, peer, direction in ((ended.caller, ended.callee, "outgoing"), (ended.callee, ended.caller, "incoming")):
            if _node_of(me) != self.node_name:
                continue
            user_id = await self._user_id(me)
            if user_id is not None:
                entries.append((user_id, {
                    "call_id": ended.call_id, "peer": peer, "direction": direction, "media": ended.media,
                    "reason": ended.reason, "started_at": int(ended.started_at * 1000), "ended_at": int(ended.ended_at * 1000),
                    "answered_at": None if ended.answered_at is None else int(ended.answered_at * 1000),
                }))
        log.info("calls.ended", call=ended.call_id, caller=ended.caller, callee=ended.callee, reason=ended.reason,
                 seconds=round(ended.ended_at - (ended.answered_at or ended.ended_at), 1))
        if not entries:
            return

        def stored(result: outcome.Outcome[list[ReceiptEvent]]) -> None:
            if isinstance(result, outcome.Error):
                log.warning("calls.history_not_stored", call=ended.call_id, error=str(result.error))
                return
            for ev in result.value:
                self.hub.push_event(ev.user_id, ev.seq, frames.encode(frames.CallLog(seq=ev.seq, **ev.payload)))

        self.writer.submit_nowait(self.messages.call_log_op(entries), stored)
