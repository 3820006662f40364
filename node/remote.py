"""What the node's domain logic needs from federation, as a port.

Messaging talks to other nodes only through ``Remote``: is that node known, what are
that user's devices, sign this event, wake the sender for that node. The federation
subsystem (federation/service.py) implements it; ``NoRemote`` is the node without
federation, where every other node is unknown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

from node.errors import UnknownNode

if TYPE_CHECKING:
    from storage.repos import Avatar


class Remote(Protocol):
    async def require_node(self, node: str) -> None:
        """Raise UnknownNode unless ``node`` can be reached (known, found, not blocked)."""

    async def devices_of(self, address: str, *, fresh: bool = False) -> list[dict[str, Any]]:
        """The public device views of a user of another node (docs/protocol.md 3.1),
        from a short-lived cache unless ``fresh``."""

    async def profile_of(self, address: str) -> dict[str, Any]:
        """The public profile of a user of another node (node/profiles.py ``profile_json``),
        from a short-lived cache. Raises UnknownNode, UnknownUser or Unavailable."""

    async def avatar_of(self, address: str) -> Avatar:
        """The avatar of a user of another node, checked again here. Raises NotFound
        (no avatar), UnknownNode, UnknownUser or Unavailable."""

    def sign_message(self, *, sender: str, sender_device: str, to: str, message_id: str, envelope: bytes, now: int) -> tuple[bytes, str]:
        """A signed ``message`` event (its bytes and signature)."""

    def sign_receipt(self, *, kind: Literal["delivered", "read"], by: str, to: str, message_id: str, now: int) -> tuple[bytes, str]:
        """A signed ``receipt`` event."""

    def wake(self, node: str) -> None:
        """Events for ``node`` were committed to its outbox: send them soon."""

    async def devices_changed(self, address: str) -> None:
        """A local user's devices changed: tell the nodes of their contacts."""


class NoRemote:
    """A node without federation: other nodes do not exist."""

    async def require_node(self, node: str) -> None:
        raise UnknownNode(f"unknown node {node!r}: this node does not federate")

    async def devices_of(self, address: str, *, fresh: bool = False) -> list[dict[str, Any]]:
        raise UnknownNode(f"unknown node in {address!r}: this node does not federate")

    async def profile_of(self, address: str) -> dict[str, Any]:
        raise UnknownNode(f"unknown node in {address!r}: this node does not federate")

    async def avatar_of(self, address: str) -> Avatar:
        raise UnknownNode(f"unknown node in {address!r}: this node does not federate")

    def sign_message(self, **kwargs: Any) -> tuple[bytes, str]:
        raise UnknownNode("this node does not federate")

    def sign_receipt(self, **kwargs: Any) -> tuple[bytes, str]:
        raise UnknownNode("this node does not federate")

    def wake(self, node: str) -> None:
        return None

    async def devices_changed(self, address: str) -> None:
        return None
