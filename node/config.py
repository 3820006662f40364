"""The node's configuration: one frozen dataclass, loaded from TOML, the environment and flags.

Precedence, lowest first: built-in defaults, ``<data_dir>/moot.toml``, ``MOOT_*``
environment variables, command-line flags. Every option has one name used in all
three places: ``web_port`` in TOML, ``MOOT_WEB_PORT`` in the environment,
``--web-port`` on ``moot run``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.turn import check_ice_urls

CONFIG_FILE = "moot.toml"

REGISTRATION_MODES = ("open", "invite", "closed")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
NODE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class ConfigError(Exception):
    """The configuration is invalid; the message names the option."""


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    data_dir: Path
    node_name: str = ""
    web_host: str = "127.0.0.1"
    web_port: int = 8470
    public_url: str = ""
    database_url: str = ""
    registration: str = "open"
    log_format: str = "text"
    log_level: str = "info"
    # Limits on what clients may send.
    max_frame_bytes: int = 256 * 1024
    max_envelope_bytes: int = 128 * 1024
    max_devices_per_user: int = 16
    max_one_time_prekeys: int = 200
    history_page_max: int = 200
    backlog_batch: int = 500
    # Sessions and logins.
    session_ttl_s: int = 30 * 24 * 3600
    login_failures_allowed: int = 5
    login_failure_window_s: int = 300
    # argon2id cost; "interactive" suits a node, "min" only tests and benchmarks.
    password_hash_cost: str = "interactive"
    # Group-commit writer: largest batch committed in one transaction.
    writer_max_batch: int = 2000
    # Federation: where the libp2p host listens ("" turns federation off), nodes to
    # dial at start (multiaddrs ending in /p2p/<peer id>), and the outbox's retry delays.
    federation_listen: str = "/ip4/0.0.0.0/tcp/8471"
    federation_peers: tuple[str, ...] = ()
    federation_backoff_initial_s: float = 1.0
    federation_backoff_max_s: float = 300.0
    # The Kademlia DHT: peers to join it through (multiaddrs ending in /p2p/<peer id>;
    # none by default), and how often this node publishes its signed record there.
    federation_bootstrap: tuple[str, ...] = ()
    federation_dht_refresh_s: float = 1800.0
    # Node names: only these (when any are listed) and never those.
    federation_allow: tuple[str, ...] = ()
    federation_deny: tuple[str, ...] = ()
    # Discovery on the local network (mDNS, federation/mdns.py), and the IP addresses
    # of the interfaces it runs on; none: the ones federation_listen listens on.
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()
    # Presence across nodes (federation/presence.py): this node renews what it said
    # about its users every heartbeat; what other nodes said lapses after the lease.
    presence_heartbeat_s: float = 10.0
    presence_lease_s: float = 30.0
    # Calls: the STUN/TURN servers handed to clients (none by default: no public
    # server is ever contacted), coturn's static-auth-secret for TURN credentials,
    # and how long those credentials last.
    ice_servers: tuple[str, ...] = ()
    turn_secret: str = ""
    turn_ttl_s: int = 3600
    # How long a callee's devices ring before the call is missed, and how long a device
    # that lost its connection during a call has to come back before the call ends.
    call_ring_timeout_s: float = 45.0
    call_reconnect_grace_s: float = 10.0
    # Attachments (node/attachments.py): the largest encrypted file a user may upload,
    # and how long an uploaded file may wait for a message to carry it before it goes.
    max_attachment_bytes: int = 100 * 1024 * 1024
    attachment_orphan_ttl_s: float = 24 * 3600.0
    # Hidden in the sample config: benchmarks and tests pin the read pool.
    read_threads: int = 8
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL; SQLite in the data directory unless configured."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'moot.db'}"

    @property
    def web_url(self) -> str:
        return self.public_url or f"http://{self.web_host}:{self.web_port}"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"

    @property
    def key_file(self) -> Path:
        return self.data_dir / "node.key"

    @property
    def config_file(self) -> Path:
        return self.data_dir / CONFIG_FILE


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig) if f.name not in ("extra",)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "int" and not isinstance(value, int):
            return int(value)
        if kind == "float" and not isinstance(value, (int, float)):
            return float(value)
        if kind == "tuple[str, ...]":
            items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
            if not all(isinstance(i, str) for i in items):
                raise ConfigError(f"option {name!r} must be a list of strings, not {value!r}")
            return tuple(items)
        if kind == "bool" and not isinstance(value, bool):
            text = str(value).strip().lower() if isinstance(value, (str, int)) else None
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ConfigError(f"option {name!r} must be true or false (or 1/0, yes/no, on/off), not {value!r}")
        if kind == "Path":
            return Path(value).expanduser()
        if kind == "str" and not isinstance(value, str):
            raise ConfigError(f"option {name!r} must be a string, not {value!r}")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"option {name!r} must be {'an integer' if kind == 'int' else 'a number'}, not {value!r}") from exc
    return value


def _validate(config: NodeConfig) -> NodeConfig:
    if config.registration not in REGISTRATION_MODES:
        raise ConfigError(f"registration must be one of {REGISTRATION_MODES}, not {config.registration!r}")
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format must be one of {LOG_FORMATS}, not {config.log_format!r}")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {LOG_LEVELS}, not {config.log_level!r}")
    if config.node_name and not NODE_NAME_RE.match(config.node_name):
        raise ConfigError("node_name must be lower-case letters, digits and '-', at most 63 characters")
    if config.password_hash_cost not in ("interactive", "moderate", "min"):
        raise ConfigError("password_hash_cost must be interactive, moderate or min")
    if not 0 <= config.web_port <= 65535:
        raise ConfigError("web_port must be between 0 and 65535")
    if config.federation_listen and not config.federation_listen.startswith("/"):
        raise ConfigError("federation_listen must be a multiaddr such as /ip4/0.0.0.0/tcp/8471 (or empty: no federation)")
    for peer in config.federation_peers:
        if not peer.startswith("/") or "/p2p/" not in peer:
            raise ConfigError(f"federation_peers: {peer!r} is not a multiaddr ending in /p2p/<peer id>")
    if config.mdns and config.federation_listen:
        # Checked only when used: a node without mDNS does not care what they say.
        for ip in config.mdns_interfaces:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"mdns_interfaces: {ip!r} is not an IP address (of an interface of this machine)") from None
    for peer in config.federation_bootstrap:
        if not peer.startswith("/") or "/p2p/" not in peer:
            raise ConfigError(f"federation_bootstrap: {peer!r} is not a multiaddr ending in /p2p/<peer id>")
    # Records live 24 h (federation/records.py): refreshed at least twice in a lifetime.
    if not 1 <= config.federation_dht_refresh_s <= 12 * 3600:
        raise ConfigError("federation_dht_refresh_s must be between 1 and 43200 seconds (12 h)")
    if not 0 < config.federation_backoff_initial_s <= config.federation_backoff_max_s:
        raise ConfigError("federation backoff: 0 < federation_backoff_initial_s <= federation_backoff_max_s")
    if not 0 < config.presence_heartbeat_s < config.presence_lease_s:
        raise ConfigError("presence: 0 < presence_heartbeat_s < presence_lease_s (a lease must outlive a heartbeat)")
    problem = check_ice_urls(config.ice_servers, config.turn_secret)
    if problem:
        raise ConfigError(f"ice_servers: {problem}")
    if not 1 <= config.call_ring_timeout_s <= 600:
        raise ConfigError("call_ring_timeout_s must be between 1 and 600 seconds")
    if not 0 <= config.call_reconnect_grace_s <= 600:
        raise ConfigError("call_reconnect_grace_s must be between 0 and 600 seconds")
    if not 60 <= config.turn_ttl_s <= 7 * 24 * 3600:
        raise ConfigError("turn_ttl_s must be between 60 seconds and 7 days")
    if not 1024 <= config.max_attachment_bytes <= 2**40:
        raise ConfigError("max_attachment_bytes must be between 1024 bytes and 1 TiB")
    if not 0.05 <= config.attachment_orphan_ttl_s <= 365 * 24 * 3600:
        raise ConfigError("attachment_orphan_ttl_s must be between 0.05 seconds and a year")
    for name in ("max_frame_bytes", "max_envelope_bytes", "session_ttl_s", "backlog_batch", "writer_max_batch"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    return config


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Options given as ``MOOT_<OPTION>`` environment variables."""
    found: dict[str, Any] = {}
    for name in _FIELDS:
        key = "MOOT_" + name.upper()
        if key in environ:
            found[name] = environ[key]
    return found


def load_config(
    data_dir: Path | str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Build the effective configuration.

    ``data_dir`` comes from the argument, else ``MOOT_DATA_DIR``, else ``./moot-data``.
    The TOML file is optional (``moot init`` writes one). Raises ConfigError on an
    unknown option or a bad value; unset overrides (None) are ignored.
    """
    environ = os.environ if environ is None else environ
    chosen = Path(data_dir or environ.get("MOOT_DATA_DIR") or "moot-data").expanduser().resolve()
    values: dict[str, Any] = {}
    path = chosen / CONFIG_FILE
    if path.exists():
        try:
            loaded = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        unknown = sorted(set(loaded) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{path}: unknown option(s): {', '.join(unknown)}")
        values.update(loaded)
    values.update(env_overrides(environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values.pop("data_dir", None)
    coerced = {name: _coerce(name, value) for name, value in values.items()}
    return _validate(NodeConfig(data_dir=chosen, **coerced))


SAMPLE_CONFIG = """\
# Moot node configuration. Every option can also be set with an environment
# variable MOOT_<OPTION> (e.g. MOOT_WEB_PORT=9000) or a flag of `moot run`
# (e.g. --web-port 9000); flags win over the environment, which wins over this file.

# The node's name: users are addressed as user@{node_name}.
node_name = "{node_name}"

# Where the web page, the JSON API and the WebSocket listen.
web_host = "127.0.0.1"
web_port = 8470
# The address people use to reach this node, if it is behind a proxy.
# public_url = "https://chat.example.org"

# Storage: SQLite in the data directory by default. For a large node:
# database_url = "postgresql+psycopg://moot@localhost/moot"

# Who may register: "open", "invite" (codes from `moot invite create`) or "closed".
registration = "open"

# Logs: "text" (key=value) or "json", one line per event. Never message content.
log_format = "text"
log_level = "info"

# Limits on what clients may send, in bytes.
max_frame_bytes = 262144
max_envelope_bytes = 131072
max_devices_per_user = 16

# Sessions last this many seconds; failed logins are limited per user and address.
session_ttl_s = 2592000
login_failures_allowed = 5
login_failure_window_s = 300

# Cost of password hashing (argon2id): "interactive" or "moderate".
password_hash_cost = "interactive"

# Federation with other nodes (libp2p). Empty federation_listen: no federation.
federation_listen = "/ip4/0.0.0.0/tcp/8471"
# Nodes to dial at start, e.g. ["/ip4/192.0.2.7/tcp/8471/p2p/12D3KooW..."].
federation_peers = []
# The DHT (Kademlia, as in libp2p): nodes to join it through, none by default, e.g.
# ["/ip4/192.0.2.7/tcp/8471/p2p/12D3KooW..."]. Without any, this node is found only
# by nodes that use it as theirs. It publishes its signed record every refresh.
federation_bootstrap = []
federation_dht_refresh_s = 1800.0
# Retries to an unreachable node wait from about this long, doubling, up to the max.
federation_backoff_initial_s = 1.0
federation_backoff_max_s = 300.0
# Which nodes may federate with this one, by name: only the allowed ones when the
# list is not empty, never the denied ones (also `moot peers block <node>`).
federation_allow = []
federation_deny = []
# Find other nodes on the local network, and be found (mDNS, service _moot._tcp).
mdns = true
# The IP addresses of the interfaces to announce and listen on; empty: the ones
# federation_listen listens on (all of them for 0.0.0.0), e.g. ["192.168.1.20"].
mdns_interfaces = []
# Presence of this node's users, told to the nodes of their contacts: renewed every
# heartbeat; other nodes' users show offline when their node is silent for a lease.
presence_heartbeat_s = 10.0
presence_lease_s = 30.0

# Calls (WebRTC): STUN/TURN servers handed to clients; none by default, so calls use
# direct addresses only and no public server is contacted. For TURN run coturn with
# use-auth-secret and the same static-auth-secret as turn_secret here; clients then
# get credentials that last turn_ttl_s seconds. E.g.
# ice_servers = ["stun:turn.example.org:3478", "turn:turn.example.org:3478?transport=udp"]
ice_servers = []
# turn_secret = "a long random string"
turn_ttl_s = 3600
# A call rings this long before it is missed; a device that drops out of a call has
# this long to reconnect before the call ends.
call_ring_timeout_s = 45.0
call_reconnect_grace_s = 10.0

# Attachments: the largest file a user may upload, in bytes (encrypted: a little more
# than the file itself), and how long, in seconds, an uploaded file may wait for a
# message that carries it before it is deleted.
max_attachment_bytes = 104857600
attachment_orphan_ttl_s = 86400.0
"""


def write_sample_config(path: Path, node_name: str) -> None:
    """Write the commented sample config; never overwrites an existing file."""
    with open(path, "x") as fh:
        fh.write(SAMPLE_CONFIG.replace("{node_name}", node_name))
