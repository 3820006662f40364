"""What a node announces about itself on the local network: the mDNS TXT record, sans-IO.

A node registers one DNS-SD service of type ``_moot._tcp.local.`` whose TXT record
(RFC 6763 section 6: a sequence of length-prefixed ``key=value`` strings) says

- ``v=1``: the version of this format;
- ``peer=<peer id>``: the node's libp2p peer id (the only thing that is checked,
  by Noise, when the node is dialled);
- ``node=<name>``: its name (a hint: the name that counts is the one in its hello);
- ``addrs=<multiaddr> <multiaddr> ...``: where its federation host listens, as
  ``/ip4|ip6/<ip>/tcp/<port>`` without the ``/p2p/<peer id>`` suffix; a list too long
  for one 255-byte string continues in ``addrs2``, ``addrs3``, ...;
- ``web=<url>``: its web page, when known.

Anyone on the network can send anything, so ``parse_txt`` is strict about what it
keeps and never raises anything but ``BadAnnouncement``: it takes bytes, returns a
validated ``Announcement`` with only dialable TCP addresses, and bounds the work a
hostile record can cause. No I/O and no trio, zeroconf or libp2p imports (a test
checks): ``federation/mdns.py`` is the glue.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from federation.identity import verify_key_of
from federation.wire import NODE_NAME_RE

__all__ = [
    "MAX_ADDRS",
    "Announcement",
    "BadAnnouncement",
    "announced_addrs",
    "announced_web_url",
    "encode_txt",
    "parse_txt",
    "tcp_address",
]

VERSION = "1"
MAX_ADDRS = 8  # addresses kept from (and put into) one announcement
MAX_WEB_URL = 200
# An mDNS packet is at most 8966 bytes; a TXT record claiming more is not ours.
MAX_TXT_BYTES = 8966
_MAX_STRING = 255  # one TXT string, after its length byte
_MAX_ADDR_TOKENS = 2 * MAX_ADDRS  # beyond this an address list is not a node's, it is noise
_ADDR_KEYS = ("addrs",) + tuple(f"addrs{i}" for i in range(2, MAX_ADDRS + 1))
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
# Any multiaddr in text form: "/proto/value/proto/...". One that is not ip4|ip6 + tcp
# is another transport, skipped; anything else is garbage, and so is the record.
_MULTIADDR_RE = re.compile(r"^(/[A-Za-z0-9._~%:+=-]+)+$")
_WEB_URL_RE = re.compile(r"^https?://[!-~]+$")


class BadAnnouncement(ValueError):
    """A TXT record that is not a usable Moot announcement; the message says why."""


@dataclass(frozen=True, slots=True)
class Announcement:
    """A node on the local network: who it is and where to dial it.

    ``addrs`` are canonical ``/ip4|ip6/<ip>/tcp/<port>`` multiaddrs without the
    peer id. Constructing one checks every field and raises BadAnnouncement.
    """

    peer_id: str
    node: str
    addrs: tuple[str, ...]
    web_url: str = ""

    def __post_init__(self) -> None:
        try:
            verify_key_of(self.peer_id)
        except ValueError:
            raise BadAnnouncement(f"not an Ed25519 peer id: {self.peer_id[:80]!r}") from None
        if not NODE_NAME_RE.match(self.node):
            raise BadAnnouncement(f"not a node name: {self.node[:80]!r}")
        if not 0 < len(self.addrs) <= MAX_ADDRS or len(set(self.addrs)) != len(self.addrs):
            raise BadAnnouncement(f"an announcement needs 1 to {MAX_ADDRS} distinct addresses, not {len(self.addrs)}")
        for addr in self.addrs:
            if tcp_address(addr) != addr:
                raise BadAnnouncement(f"not a canonical dialable /ip4|ip6/<ip>/tcp/<port>: {addr!r}")
        if self.web_url and not _is_web_url(self.web_url):
            raise BadAnnouncement(f"not an http(s) URL of at most {MAX_WEB_URL} characters: {self.web_url[:80]!r}")

    @property
    def dial_addrs(self) -> tuple[str, ...]:
        """The addresses with ``/p2p/<peer id>``, as ``FederationService.introduce`` takes them."""
        return tuple(f"{addr}/p2p/{self.peer_id}" for addr in self.addrs)


def tcp_address(addr: str) -> str | None:
    """The canonical form of a dialable ``/ip4|ip6/<ip>/tcp/<port>`` multiaddr.

    Returns None for a well-formed multiaddr that cannot be dialled over plain TCP
    from another machine's point of view: another transport (``/udp``, ``/ws``,
    ``/dns4``, a ``/p2p`` suffix), or an unspecified, multicast, broadcast or IPv6
    link-local address (which needs a zone). Raises BadAnnouncement for anything
    that is not a multiaddr, or an ip4/ip6 tcp one with a bad address or port.
    """
    if len(addr) > 256 or not _MULTIADDR_RE.match(addr):
        raise BadAnnouncement(f"not a multiaddr: {addr[:80]!r}")
    parts = addr.split("/")[1:]
    if len(parts) != 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp":
        return None
    family, host, _, port_text = parts
    try:
        ip = ipaddress.IPv4Address(host) if family == "ip4" else ipaddress.IPv6Address(host)
    except ValueError:
        raise BadAnnouncement(f"bad {family} address in {addr[:80]!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise BadAnnouncement(f"a zone has no place in {addr[:80]!r}")
    if not _PORT_RE.match(port_text) or not 0 < int(port_text) <= 65535:
        raise BadAnnouncement(f"bad port in {addr[:80]!r}")
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local:
        return None
    return f"/{family}/{ip}/tcp/{int(port_text)}"


def announced_addrs(listen_addrs: Iterable[str], interface_ips: Sequence[str]) -> tuple[str, ...]:
    """Where others can dial us: the host's listen addresses, made dialable.

    ``listen_addrs`` are the host's multiaddrs (``/p2p/...`` suffixes are dropped);
    one on an unspecified address (``0.0.0.0``, ``::``) stands for every address of
    that family in ``interface_ips``, the interfaces mDNS announces on. Returns at
    most MAX_ADDRS distinct canonical addresses, in order; other transports and
    addresses nobody could dial are left out.
    """
    out: list[str] = []
    for full in listen_addrs:
        addr = full.split("/p2p/")[0]
        parts = addr.split("/")  # "", family, ip, "tcp", port
        try:
            canonical = tcp_address(addr)
            if canonical is None and len(parts) != 5:
                continue  # another transport
            family, host, port = parts[1], parts[2], parts[4]
            unspecified = ipaddress.ip_address(host).is_unspecified
        except (BadAnnouncement, ValueError, IndexError):
            continue
        candidates: list[str | None] = [canonical]
        if canonical is None and unspecified:
            version = 4 if family == "ip4" else 6
            for ip_text in interface_ips:
                try:
                    ip = ipaddress.ip_address(ip_text)
                    if ip.version == version:
                        candidates.append(tcp_address(f"/{family}/{ip}/tcp/{port}"))
                except (BadAnnouncement, ValueError):
                    continue
        for candidate in candidates:
            if candidate is not None and candidate not in out and len(out) < MAX_ADDRS:
                out.append(candidate)
    return tuple(out)


def announced_web_url(url: str, interface_ips: Sequence[str]) -> str:
    """``url`` as others can open it.

    A web server on an unspecified address (``web_host = "0.0.0.0"``) is announced
    at the first address of that family in ``interface_ips`` instead; "" when
    there is none. Any other URL is returned as it is.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        ip = ipaddress.ip_address(parts.hostname or "")
        port = parts.port
    except ValueError:
        return url
    if not ip.is_unspecified:
        return url
    for text in interface_ips:
        try:
            candidate = ipaddress.ip_address(text)
        except ValueError:
            continue
        if candidate.version == ip.version:
            host = f"[{candidate}]" if candidate.version == 6 else str(candidate)
            return urllib.parse.urlunsplit(parts._replace(netloc=host if port is None else f"{host}:{port}"))
    return ""


# -- the TXT record -------------------------------------------------------------------


def encode_txt(announcement: Announcement) -> bytes:
    """The TXT record's rdata for ``announcement``: length-prefixed ``key=value`` strings."""
    strings = [f"v={VERSION}", f"peer={announcement.peer_id}", f"node={announcement.node}"]
    chunks: list[list[str]] = [[]]
    for addr in announcement.addrs:
        key = _ADDR_KEYS[len(chunks) - 1]
        if chunks[-1] and len(key) + 1 + len(" ".join(chunks[-1] + [addr])) > _MAX_STRING:
            chunks.append([])
        chunks[-1].append(addr)
    strings += [f"{_ADDR_KEYS[i]}={' '.join(chunk)}" for i, chunk in enumerate(chunks)]
    if announcement.web_url:
        strings.append(f"web={announcement.web_url}")
    out = bytearray()
    for string in strings:
        data = string.encode("ascii")
        assert len(data) <= _MAX_STRING  # every field is bounded by Announcement's checks
        out += bytes([len(data)]) + data
    return bytes(out)


def _txt_pairs(data: bytes) -> dict[str, bytes | None]:
    """RFC 6763 6.3-6.5: keys are case-insensitive, the first occurrence wins, and a
    string with no '=' is a key without a value; an empty key is ignored."""
    pairs: dict[str, bytes | None] = {}
    offset = 0
    while offset < len(data):
        length = data[offset]
        string = data[offset + 1 : offset + 1 + length]
        if len(string) != length:
            raise BadAnnouncement("a TXT string runs past the end of the record")
        offset += 1 + length
        key_bytes, eq, value = string.partition(b"=")
        if not key_bytes or any(not 0x20 <= b <= 0x7E for b in key_bytes):
            continue
        key = key_bytes.decode("ascii").lower()
        if key not in pairs:
            pairs[key] = value if eq else None
    return pairs


def _text(pairs: dict[str, bytes | None], key: str) -> str:
    value = pairs.get(key)
    if value is None:
        raise BadAnnouncement(f"no {key}= in the record")
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise BadAnnouncement(f"{key}= is not ASCII") from None


def parse_txt(data: bytes) -> Announcement:
    """The announcement in a TXT record's rdata.

    Raises BadAnnouncement for a record that is too large or cut short, another
    version, a missing or malformed peer id, name or address, or no address that
    can be dialled. Addresses of other transports are skipped; a malformed
    ``web=`` is dropped (it is only shown to people, never used by the node).
    """
    if len(data) > MAX_TXT_BYTES:
        raise BadAnnouncement(f"a TXT record of {len(data)} bytes")
    pairs = _txt_pairs(data)
    if pairs.get("v") != VERSION.encode():
        raise BadAnnouncement(f"not version {VERSION} of the announcement")
    peer_id, node = _text(pairs, "peer"), _text(pairs, "node")
    tokens: list[str] = []
    for key in _ADDR_KEYS:
        if key in pairs:
            tokens += _text(pairs, key).split()
    if len(tokens) > _MAX_ADDR_TOKENS:
        raise BadAnnouncement(f"{len(tokens)} addresses")
    addrs: list[str] = []
    for token in tokens:
        addr = tcp_address(token)
        if addr is not None and addr not in addrs and len(addrs) < MAX_ADDRS:
            addrs.append(addr)
    if not addrs:
        raise BadAnnouncement("no dialable /ip4|ip6/<ip>/tcp/<port> address")
    try:
        web_url = _text(pairs, "web")
    except BadAnnouncement:
        web_url = ""
    return Announcement(peer_id, node, tuple(addrs), web_url if _is_web_url(web_url) else "")


def _is_web_url(url: str) -> bool:
    return len(url) <= MAX_WEB_URL and bool(_WEB_URL_RE.match(url))
