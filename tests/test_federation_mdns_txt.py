"""The mDNS announcement without a network: the TXT record both ways, what a hostile
record cannot do, and which addresses a node announces."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from federation.announcement import (
    MAX_ADDRS,
    Announcement,
    BadAnnouncement,
    announced_addrs,
    announced_web_url,
    encode_txt,
    parse_txt,
    tcp_address,
)
from tests.nodes import REPO

PEER = "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"  # SigningKey(b"\x01" * 32)
RIVERSIDE = Announcement(PEER, "riverside", ("/ip4/192.0.2.7/tcp/8471", "/ip6/2001:db8::7/tcp/8471"), "http://192.0.2.7:8470")


def txt(*strings: bytes) -> bytes:
    return b"".join(bytes([len(s)]) + s for s in strings)


# -- the record both ways --------------------------------------------------------------


def test_the_record_is_these_bytes_and_parses_back():
    data = encode_txt(RIVERSIDE)
    assert data == txt(
        b"v=1", b"peer=" + PEER.encode(), b"node=riverside",
        b"addrs=/ip4/192.0.2.7/tcp/8471 /ip6/2001:db8::7/tcp/8471", b"web=http://192.0.2.7:8470",
    )
    assert parse_txt(data) == RIVERSIDE
    assert RIVERSIDE.dial_addrs == (f"/ip4/192.0.2.7/tcp/8471/p2p/{PEER}", f"/ip6/2001:db8::7/tcp/8471/p2p/{PEER}")


def test_a_long_address_list_continues_in_more_keys_and_no_string_passes_255_bytes():
    addrs = tuple(f"/ip6/2001:db8:1234:5678:9abc:def0:1234:{i:x}/tcp/65535" for i in range(MAX_ADDRS))
    long = Announcement(PEER, "a" * 63, addrs)
    data = encode_txt(long)
    strings, offset = [], 0
    while offset < len(data):
        strings.append(data[offset + 1 : offset + 1 + data[offset]])
        offset += 1 + data[offset]
    assert [s.split(b"=")[0] for s in strings] == [b"v", b"peer", b"node", b"addrs", b"addrs2"]
    assert parse_txt(data) == long


def test_keys_are_case_insensitive_the_first_wins_and_unknown_ones_are_ignored():
    data = txt(
        b"=ignored", b"V=1", b"PEER=" + PEER.encode(), b"peer=12D3KooWnotthisone", b"Node=riverside",
        b"addrs=/ip4/192.0.2.7/tcp/1", b"future=\xff\x00", b"flag", b"\x01\x02=binary key",
    )
    assert parse_txt(data) == Announcement(PEER, "riverside", ("/ip4/192.0.2.7/tcp/1",))


def test_other_transports_and_undialable_addresses_are_skipped():
    data = txt(
        b"v=1", b"peer=" + PEER.encode(), b"node=riverside",
        b"addrs=/ip4/192.0.2.7/udp/1/quic /dns4/example.org/tcp/1 /ip4/192.0.2.7/tcp/2/ws /ip4/0.0.0.0/tcp/3 "
        b"/ip6/::/tcp/4 /ip4/224.0.0.251/tcp/5 /ip6/fe80::1/tcp/6 /ip4/255.255.255.255/tcp/7",
        b"addrs2=/ip4/192.0.2.7/tcp/8/p2p/" + PEER.encode() + b" /ip4/127.0.0.1/tcp/9 /ip4/127.0.0.1/tcp/09",
    )
    assert parse_txt(data).addrs == ("/ip4/127.0.0.1/tcp/9",)  # once, in canonical form


def test_a_malformed_web_url_is_dropped_not_the_node():
    for web in (b"javascript:alert(1)", b"http://a b", b"http://" + b"x" * 240, b"\xff", b""):
        data = txt(b"v=1", b"peer=" + PEER.encode(), b"node=riverside", b"addrs=/ip4/192.0.2.7/tcp/1", b"web=" + web)
        assert parse_txt(data).web_url == ""


# -- hostile records -------------------------------------------------------------------


def valid(**replace: bytes) -> bytes:
    fields = {
        b"v": b"1", b"peer": PEER.encode(), b"node": b"riverside", b"addrs": b"/ip4/192.0.2.7/tcp/8471",
    }
    fields.update({k.encode(): v for k, v in replace.items()})
    return txt(*(k + b"=" + v for k, v in fields.items() if v is not None))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x05v=1",  # the string runs past the end
        valid(v=b"2"),
        valid(peer=b"12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH"),  # one short
        valid(peer=b"12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH0"),  # 0 is not base58
        valid(peer=b"QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"),  # an RSA-style id
        valid(peer=PEER.encode() + b"\xff"),
        valid(peer=b"12D3KooW" + b"z" * 44),  # the shape of an Ed25519 id, not one
        valid(node=b"River"),
        valid(node=b"a" * 64),
        valid(node=b"-river"),
        valid(node=b"rive\xc3\xa9r"),
        valid(addrs=b""),
        valid(addrs=b"/ip4/192.0.2.7/udp/1"),  # nothing dialable
        valid(addrs=b"/ip4/999.0.2.7/tcp/1"),
        valid(addrs=b"/ip4/192.0.2.7/tcp/0"),
        valid(addrs=b"/ip4/192.0.2.7/tcp/65536"),
        valid(addrs=b"/ip4/192.0.2.7/tcp/-1"),
        valid(addrs=b"/ip6/fe80::1%eth0/tcp/1"),
        valid(addrs=b"192.0.2.7:8471"),
        txt(  # more addresses than any node has
            b"v=1", b"peer=" + PEER.encode(), b"node=riverside",
            b"addrs=" + b" ".join(b"/ip4/10.0.0.%d/tcp/1" % i for i in range(MAX_ADDRS + 1)),
            b"addrs2=" + b" ".join(b"/ip4/10.0.1.%d/tcp/1" % i for i in range(MAX_ADDRS + 1)),
        ),
        txt(b"v=1", b"peer=" + PEER.encode(), b"addrs=/ip4/192.0.2.7/tcp/1"),  # no name
        txt(b"v=1", b"peer", b"node=riverside", b"addrs=/ip4/192.0.2.7/tcp/1"),  # a key without a value
        txt(b"v=1", b"x" * 255) * 40,  # larger than any mDNS packet
    ],
)
def test_malformed_records_are_refused(data):
    with pytest.raises(BadAnnouncement):
        parse_txt(data)


def test_random_and_mutated_records_never_raise_anything_else():
    rng = random.Random(20261123)
    good = encode_txt(RIVERSIDE)
    outcomes = {"ok": 0, "bad": 0}
    for i in range(3000):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
        else:
            mutated = bytearray(good)
            for _ in range(rng.randrange(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated[: rng.randrange(len(mutated) + 1)]) if rng.random() < 0.3 else bytes(mutated)
        try:
            parsed = parse_txt(data)
        except BadAnnouncement:
            outcomes["bad"] += 1
            continue
        outcomes["ok"] += 1
        assert parse_txt(encode_txt(parsed)) == parsed  # whatever is accepted is a well-formed announcement
    assert outcomes["ok"] and outcomes["bad"]


def test_an_announcement_checks_its_own_fields():
    with pytest.raises(BadAnnouncement):
        Announcement(PEER, "riverside", ())
    with pytest.raises(BadAnnouncement):
        Announcement(PEER, "riverside", ("/ip4/0.0.0.0/tcp/1",))
    with pytest.raises(BadAnnouncement):
        Announcement(PEER, "riverside", ("/ip4/192.0.2.7/tcp/01",))  # not canonical
    with pytest.raises(BadAnnouncement):
        Announcement(PEER, "riverside", ("/ip4/192.0.2.7/tcp/1",) * 2)
    with pytest.raises(BadAnnouncement):
        Announcement(PEER, "riverside", ("/ip4/192.0.2.7/tcp/1",), "ftp://x")


# -- what a node announces ---------------------------------------------------------------


def test_tcp_address_in_canonical_form():
    assert tcp_address("/ip6/2001:DB8:0::7/tcp/00080") == "/ip6/2001:db8::7/tcp/80"
    assert tcp_address("/ip4/192.0.2.7/tcp/8471") == "/ip4/192.0.2.7/tcp/8471"
    assert tcp_address("/ip4/192.0.2.7/tcp/8471/p2p/" + PEER) is None


def test_an_unspecified_listen_address_stands_for_the_interfaces_of_its_family():
    host = [f"/ip4/0.0.0.0/tcp/8471/p2p/{PEER}", f"/ip4/127.0.0.1/tcp/9000/p2p/{PEER}", "/ip4/10.0.0.1/udp/1"]
    got = announced_addrs(host, ["192.0.2.7", "2001:db8::7", "198.51.100.1", "192.0.2.7"])
    assert got == ("/ip4/192.0.2.7/tcp/8471", "/ip4/198.51.100.1/tcp/8471", "/ip4/127.0.0.1/tcp/9000")
    assert announced_addrs([f"/ip6/::/tcp/1/p2p/{PEER}"], ["192.0.2.7", "2001:db8::7"]) == ("/ip6/2001:db8::7/tcp/1",)
    assert announced_addrs(["/ip4/0.0.0.0/tcp/1"], []) == ()
    many = [f"10.0.0.{i}" for i in range(1, 20)]
    assert len(announced_addrs(["/ip4/0.0.0.0/tcp/1"], many)) == MAX_ADDRS


def test_a_web_server_on_every_address_is_announced_at_an_interface_address():
    assert announced_web_url("http://0.0.0.0:8470", ["2001:db8::7", "192.0.2.7"]) == "http://192.0.2.7:8470"
    assert announced_web_url("http://[::]:8470/", ["192.0.2.7", "2001:db8::7"]) == "http://[2001:db8::7]:8470/"
    assert announced_web_url("http://0.0.0.0:8470", ["2001:db8::7"]) == ""
    assert announced_web_url("https://chat.example.org", ["192.0.2.7"]) == "https://chat.example.org"


def test_the_announcement_module_imports_no_io_library():
    code = (
        "import sys, json; import federation.announcement; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert loaded & {"trio", "libp2p", "multiaddr", "zeroconf", "ifaddr", "socket", "sqlalchemy"} == set()
