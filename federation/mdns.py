"""Discovery on the local network: python-zeroconf, bridged into trio.

``MdnsDiscovery.serve`` announces this node as a ``_moot._tcp.local.`` service
(TXT record: ``federation/announcement.py``), browses for the other nodes, and
hands each one it finds (a valid announcement that is not our own) to an async
callback, in trio. The callback for one node never runs twice at once: an
announcement that changes meanwhile is handed over once the callback returns.

Zeroconf runs its own asyncio loop in its own thread, and its browser calls back
on yet another thread. Nothing from those threads touches our state: the browser's
callback only schedules ``_note`` on the trio thread (``TrioToken.run_sync_soon``),
and every blocking zeroconf call runs in a trio worker thread. Everything is
bounded: names waiting to be resolved, resolutions at once (each at most
``RESOLVE_TIMEOUT_MS``), callbacks at once, and the time shutdown may take.

Zeroconf itself keeps the records alive: it answers queries for our service for
as long as it runs, its browser re-asks before cached records expire, and
``update`` re-announces a changed TXT record. On exit the service is unregistered
(goodbye packets, so the others drop it at once) and zeroconf closed, always.

Only the interfaces given are used: zeroconf joins the multicast group and sends
on those alone (tests pass ``127.0.0.1``). libp2p's own mDNS is never used: it
binds every interface and asks public resolvers for the node's address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import ifaddr  # zeroconf's own dependency
import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf import Error as ZeroconfError

from federation.announcement import Announcement, BadAnnouncement, encode_txt, parse_txt
from node.logs import get_logger

__all__ = ["SERVICE_TYPE", "MdnsDiscovery", "OnFound", "choose_interfaces"]

log = get_logger("moot.federation.mdns")

SERVICE_TYPE = "_moot._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
RESOLVERS = 4  # resolutions (each a worker thread) at once
MAX_WAITING = 256  # service names waiting to be resolved; more are dropped until there is room
MAX_REPORTING = 64  # nodes whose callback runs at once; more are dropped (they announce again)
CLOSE_TIMEOUT_S = 5.0

OnFound = Callable[[Announcement], Awaitable[None]]


def choose_interfaces(configured: Sequence[str], listen: str, adapter_ips: Sequence[str]) -> list[str]:
    """The IP addresses of the interfaces mDNS runs on (and announces).

    ``configured`` (the ``mdns_interfaces`` option) wins when given. Otherwise they
    follow the federation host: its listen address if it is a specific one, else
    (``0.0.0.0``, ``::``) every address of that family in ``adapter_ips`` except
    loopback and link-local ones, or loopback when there is nothing else.
    Raises ValueError for a configured entry that is not an IP address.
    """
    if configured:
        return [str(ipaddress.ip_address(ip)) for ip in configured]
    parts = listen.split("/")
    try:
        listen_ip = ipaddress.ip_address(parts[2])
    except (IndexError, ValueError):
        raise ValueError(f"mDNS cannot follow federation_listen {listen!r}: set mdns_interfaces") from None
    if not listen_ip.is_unspecified:
        return [str(listen_ip)]
    same_family = []
    for text in adapter_ips:
        ip = ipaddress.ip_address(text.split("%")[0])
        if ip.version == listen_ip.version and str(ip) not in same_family:
            same_family.append(str(ip))
    usable = [ip for ip in same_family if not (ipaddress.ip_address(ip).is_loopback or ipaddress.ip_address(ip).is_link_local)]
    return usable or [ip for ip in same_family if ipaddress.ip_address(ip).is_loopback]


def adapter_ips() -> list[str]:
    """Every IP address of this machine's interfaces (what ``0.0.0.0`` listens on)."""
    ips: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            ips.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return ips


class MdnsDiscovery:
    """This node's announcement on ``interfaces`` and the browser for the others."""

    def __init__(self, announcement: Announcement, interfaces: Sequence[str], on_found: OnFound) -> None:
        if not interfaces:
            raise ValueError("mDNS needs at least one interface address")
        self._announcement = announcement
        self._interfaces = list(interfaces)
        self._on_found = on_found
        self._updated = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._waiting: dict[str, ServiceStateChange] = {}  # service name -> latest change, in arrival order
        self._waiting_changed = trio.Event()
        self._reporting: dict[str, Announcement | None] = {}  # peer id -> the announcement to report next
        self._nursery: trio.Nursery | None = None
        self.registered_name: str | None = None  # the instance name zeroconf settled on

    @property
    def announcement(self) -> Announcement:
        return self._announcement

    @property
    def interfaces(self) -> list[str]:
        return list(self._interfaces)

    def update(self, announcement: Announcement) -> None:
        """Announce ``announcement`` instead (same peer id); re-announced by ``serve``."""
        if announcement != self._announcement:
            self._announcement = announcement
            self._updated.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce and browse until cancelled; ready once zeroconf listens.

        Registering takes ~1.7 s (zeroconf first probes that the name is free) and
        happens after readiness. Raises OSError when zeroconf cannot open its
        sockets on the interfaces (e.g. an address this machine does not have).
        """
        self._token = trio.lowlevel.current_trio_token()
        versions = {ipaddress.ip_address(ip).version for ip in self._interfaces}
        ip_version = IPVersion.V4Only if versions == {4} else IPVersion.V6Only if versions == {6} else IPVersion.All
        zc = await trio.to_thread.run_sync(
            partial(Zeroconf, interfaces=self._interfaces, ip_version=ip_version, use_asyncio=False)
        )
        browser: ServiceBrowser | None = None
        try:
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_state_change])
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._announce, zc)
                send, receive = trio.open_memory_channel[str](0)
                async with send, receive:
                    for _ in range(RESOLVERS):
                        nursery.start_soon(self._resolver, zc, receive.clone())
                    log.info("mdns.browsing", interfaces=" ".join(self._interfaces), service=SERVICE_TYPE)
                    task_status.started()
                    await self._hand_out(send)
        finally:
            self._nursery = None
            self._token = None
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S) as bounded:
                await trio.to_thread.run_sync(partial(_close, zc, browser), abandon_on_cancel=True)
            if bounded.cancelled_caught:
                log.warning("mdns.close_timeout", seconds=CLOSE_TIMEOUT_S)

    # -- announcing ------------------------------------------------------------------

    def _service_info(self, announcement: Announcement, name: str | None = None) -> ServiceInfo:
        instance = name or f"{announcement.node}.{SERVICE_TYPE}"
        ips = [addr.split("/")[2] for addr in announcement.addrs]
        port = int(announcement.addrs[0].rsplit("/", 1)[1])
        return ServiceInfo(
            SERVICE_TYPE, instance, port=port, properties=encode_txt(announcement),
            # A host name of our own, so that two nodes on one machine do not share one.
            server=f"moot-{announcement.peer_id[-12:].lower()}.local.", parsed_addresses=ips,
        )

    async def _announce(self, zc: Zeroconf) -> None:
        """Register the service, then re-announce whenever ``update`` changed it."""
        self._updated = trio.Event()  # what changed so far goes out in the first announcement
        info = self._service_info(self._announcement)
        try:
            # Another node with the same name on the network makes zeroconf pick
            # "name (2)": the TXT record, not the instance name, says who we are.
            await trio.to_thread.run_sync(
                partial(zc.register_service, info, allow_name_change=True), abandon_on_cancel=True
            )
        except ZeroconfError as exc:
            log.error("mdns.register_failed", name=info.name, error=repr(exc))
            return
        self.registered_name = info.name
        log.info("mdns.announced", name=info.name, peer=self._announcement.peer_id, addrs=" ".join(self._announcement.addrs))
        while True:
            await self._updated.wait()
            self._updated = trio.Event()
            info = self._service_info(self._announcement, self.registered_name)
            try:
                await trio.to_thread.run_sync(zc.update_service, info, abandon_on_cancel=True)
                log.info("mdns.reannounced", name=info.name, web=self._announcement.web_url)
            except ZeroconfError as exc:
                log.warning("mdns.update_failed", name=info.name, error=repr(exc))

    # -- browsing: zeroconf's threads -> trio --------------------------------------------

    def _on_state_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        """On the browser's thread: pass the name to trio, and nothing else."""
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._note, name, state_change)
        except trio.RunFinishedError:
            pass

    def _note(self, name: str, change: ServiceStateChange) -> None:
        """On the trio thread: remember the latest change for ``name`` (bounded)."""
        if name not in self._waiting and len(self._waiting) >= MAX_WAITING:
            log.warning("mdns.too_many_services", dropped=name[:100])
            return
        self._waiting[name] = change
        self._waiting_changed.set()

    async def _hand_out(self, send: trio.MemorySendChannel[str]) -> None:
        """Feed waiting names to the resolvers, oldest first; removals need no work."""
        while True:
            await self._waiting_changed.wait()
            self._waiting_changed = trio.Event()
            while self._waiting:
                name = next(iter(self._waiting))
                change = self._waiting.pop(name)
                if change is ServiceStateChange.Removed:
                    log.debug("mdns.service_removed", name=name[:100])
                    continue
                await send.send(name)  # waits for a free resolver; new changes queue in _waiting

    async def _resolver(self, zc: Zeroconf, names: trio.MemoryReceiveChannel[str]) -> None:
        async with names:
            async for name in names:
                await self._resolve(zc, name)

    async def _resolve(self, zc: Zeroconf, name: str) -> None:
        """Ask for ``name``'s records (mostly already cached from its announcement) and check them."""
        try:
            info = await trio.to_thread.run_sync(
                partial(zc.get_service_info, SERVICE_TYPE, name, RESOLVE_TIMEOUT_MS), abandon_on_cancel=True
            )
        except Exception as exc:  # the name came off the network: whatever it does to zeroconf, skip it
            log.debug("mdns.unresolvable", name=name[:100], error=repr(exc)[:200])
            return
        if info is None:
            log.debug("mdns.unresolved", name=name[:100])
            return
        try:
            found = parse_txt(info.text or b"")
        except BadAnnouncement as exc:
            log.info("mdns.bad_announcement", name=name[:100], error=str(exc)[:200])
            return
        if found.peer_id == self._announcement.peer_id:
            return  # ourselves
        self._report(found)

    # -- reporting, one callback per node at a time ----------------------------------

    def _report(self, found: Announcement) -> None:
        if found.peer_id in self._reporting:
            self._reporting[found.peer_id] = found  # the running callback hands it over next
            return
        if len(self._reporting) >= MAX_REPORTING or self._nursery is None:
            log.warning("mdns.too_many_nodes", dropped=found.peer_id)
            return
        self._reporting[found.peer_id] = None
        self._nursery.start_soon(self._run_callbacks, found)

    async def _run_callbacks(self, found: Announcement) -> None:
        current: Announcement | None = found
        try:
            while current is not None:
                log.debug("mdns.node_found", node=current.node, peer=current.peer_id, addrs=" ".join(current.addrs))
                try:
                    await self._on_found(current)
                except Exception:
                    # A bug in the callback must not end discovery for every node.
                    log.exception("mdns.callback_failed", node=current.node, peer=current.peer_id)
                current = self._reporting.get(found.peer_id)
                self._reporting[found.peer_id] = None
        finally:
            self._reporting.pop(found.peer_id, None)


def _close(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
    """In a worker thread: stop browsing, unregister (goodbyes) and close; never raises."""
    try:
        if browser is not None:
            browser.cancel()
    except Exception as exc:
        log.warning("mdns.browser_close_failed", error=repr(exc))
    try:
        zc.close()  # unregisters every service first
    except Exception as exc:
        log.warning("mdns.close_failed", error=repr(exc))
