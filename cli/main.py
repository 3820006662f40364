"""The `moot` command: set up and run a node, and administer it while it runs.

`moot init` and `moot run` work on the data directory; every other command talks to
the running node over its admin socket (see node/admin.py). Heavy imports (trio,
the node itself) happen inside the commands so that `moot --help` stays fast.

Exit codes: 0 success, 1 the node refused the operation, 2 usage or configuration
error, 3 the node is not running.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from node.config import ConfigError, NodeConfig, load_config

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
# Argon2 at "interactive" cost takes a while on a small machine; beyond this the node is stuck.
ADMIN_TIMEOUT_S = 120.0


# -- output helpers -----------------------------------------------------------------


def format_time(ms: int | None) -> str:
    """Milliseconds since the epoch as ISO local time; "-" for never."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(isinstance(row[i], int) and not isinstance(row[i], bool) for row in rows) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def format_fields(fields: Sequence[tuple[str, Any]]) -> str:
    """``label  value`` lines with the values aligned."""
    width = max((len(label) for label, _ in fields), default=0)
    return "\n".join(f"{label + ':':<{width + 1}}  {value}" for label, value in fields)


def format_duration(seconds: float) -> str:
    """``3d 4h 05m`` for long spans, ``5m 07s`` for short ones."""
    s = int(seconds)
    days, hours, minutes, secs = s // 86400, s // 3600 % 24, s // 60 % 60, s % 60
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _display(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "uptime_s" and isinstance(value, int | float):
        return format_duration(value)
    if (key.endswith("_at") or key == "last_seen") and isinstance(value, int):
        return format_time(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value) or "-"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"moot: {message}", err=True)
    sys.exit(code)


# -- talking to the node --------------------------------------------------------------


def _socket_path(ctx: click.Context) -> Path:
    # Only the path is needed: a broken moot.toml must not stop an operator from
    # talking to a node that is already running.
    data_dir = Path(ctx.obj["data_dir"]).expanduser().resolve()
    return NodeConfig(data_dir=data_dir).admin_socket


def admin(ctx: click.Context, op: str, args: Mapping[str, Any] | None = None) -> Any:
    """Run one admin operation on the node; on failure, print why and exit."""
    import trio

    from node.admin import AdminError, NodeNotRunning, admin_call

    path = _socket_path(ctx)

    async def call() -> Any:
        with trio.fail_after(ADMIN_TIMEOUT_S):
            return await admin_call(path, op, args)

    try:
        return trio.run(call)
    except NodeNotRunning:
        _fail(f"the node is not running (no admin socket at {path}); start it with `moot run`", EXIT_NOT_RUNNING)
    except AdminError as exc:
        _fail(f"{exc.message} ({exc.code})", EXIT_REFUSED)
    except trio.TooSlowError:
        _fail(f"the node did not answer within {ADMIN_TIMEOUT_S:.0f} s", EXIT_REFUSED)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if not password:
            raise click.UsageError("no password on standard input")
        return password
    password: str = click.prompt("Password", hide_input=True, confirmation_prompt="Repeat password")
    return password


# -- commands -------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data-dir", envvar="MOOT_DATA_DIR", default="moot-data", show_default=True,
    type=click.Path(file_okay=False, path_type=Path), help="The node's data directory.",
)
@click.version_option(package_name="moot")
@click.pass_context
def main(ctx: click.Context, data_dir: Path) -> None:
    """Run and administer a Moot chat node."""
    ctx.ensure_object(dict)
    ctx.obj["data_dir"] = data_dir


@main.command()
@click.option("--name", help="The node's name: users are addressed as user@NAME.")
@click.pass_context
def init(ctx: click.Context, name: str | None) -> None:
    """Create the data directory, the node key and a commented config file."""
    from node.app import init_data_dir

    try:
        config = load_config(ctx.obj["data_dir"], overrides={"node_name": name})
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    existed = {p: p.exists() for p in (config.data_dir, config.key_file, config.config_file)}
    node_name, created = init_data_dir(config)
    for path, label in ((config.data_dir, "data directory"), (config.key_file, "node key"), (config.config_file, "config")):
        state = "exists " if existed[path] else "created"
        click.echo(f"{state}  {label:<14}  {path}")
    if name and node_name != name:
        click.echo(f"moot: {config.config_file} already names this node {node_name!r}; --name was not applied", err=True)
    if created:
        click.echo(f"node {node_name!r} is ready; start it with `moot run`")
    else:
        click.echo(f"node {node_name!r} was already set up; nothing changed")


@main.command()
@click.option("--web-host", help="Address the web page, API and WebSocket listen on.")
@click.option("--web-port", type=click.IntRange(0, 65535), help="Port for the web page, API and WebSocket.")
@click.option("--name", help="The node's name (overrides the config file).")
@click.option("--database-url", help="SQLAlchemy URL; SQLite in the data directory by default.")
@click.option("--registration", type=click.Choice(["open", "invite", "closed"]), help="Who may register.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log line format.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Lowest level logged.")
@click.pass_context
def run(
    ctx: click.Context, web_host: str | None, web_port: int | None, name: str | None, database_url: str | None,
    registration: str | None, log_format: str | None, log_level: str | None,
) -> None:
    """Run the node until interrupted (Ctrl-C or SIGTERM)."""
    overrides = {
        "web_host": web_host, "web_port": web_port, "node_name": name, "database_url": database_url,
        "registration": registration, "log_format": log_format, "log_level": log_level,
    }
    try:
        config = load_config(ctx.obj["data_dir"], overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    from node.app import run_node

    sys.exit(run_node(config))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show whether the node runs, its name, address and load."""
    result = admin(ctx, "status")
    if as_json:
        _print_json(result)
        return
    labels = {"uptime_s": "uptime", "web_url": "web url"}
    click.echo(format_fields([(labels.get(k, k.replace("_", " ")), _display(k, v)) for k, v in dict(result).items()]))


# -- users ----------------------------------------------------------------------------


@main.group()
def user() -> None:
    """Add, inspect, disable and remove users."""


@user.command("add")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.pass_context
def user_add(ctx: click.Context, username: str, password_stdin: bool) -> None:
    """Create a user (regardless of the registration mode)."""
    password = _read_password(password_stdin)
    created = admin(ctx, "user.add", {"username": username, "password": password})
    click.echo(f"created {created['address']}")


@user.command("list")
@click.option("--prefix", default="", help="Only user names starting with this.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def user_list(ctx: click.Context, prefix: str, as_json: bool) -> None:
    """List users."""
    users = admin(ctx, "user.list", {"prefix": prefix} if prefix else {})
    if as_json:
        _print_json(users)
        return
    if not users:
        click.echo("no users" + (f" starting with {prefix!r}" if prefix else ""))
        return
    rows = [
        (u["username"], "disabled" if u["disabled"] else "active", format_time(u["created_at"]), format_time(u["last_seen"]))
        for u in users
    ]
    click.echo(format_table(("USER", "STATE", "CREATED", "LAST SEEN"), rows))


_SHOW_FIELDS = (
    ("address", "address"), ("id", "id"), ("created_at", "created"), ("last_seen", "last seen"),
    ("disabled", "disabled"), ("read_receipts", "read receipts"), ("devices", "devices"),
    ("sessions", "sessions"), ("queued_events", "queued events"), ("display_name", "display name"),
    ("status_text", "status"), ("listed", "in directory"), ("avatar", "avatar"), ("profile_updated_at", "profile updated"),
)


def format_bytes(n: int) -> str:
    """``812 B``, ``14.2 KiB``, ``3.0 MiB``."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024  # type: ignore[assignment]
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return f"{n} B"  # unreachable


def format_storage(storage: dict[str, int]) -> str:
    """What a user's data occupies, total first, then its parts."""
    parts = [
        f"messages sent {format_bytes(storage['messages_sent_bytes'])} ({storage['messages_sent']})",
        f"received {format_bytes(storage['messages_received_bytes'])} ({storage['messages_received']})",
        f"avatar {format_bytes(storage['avatar_bytes'])}",
        f"profile {format_bytes(storage['profile_bytes'])}",
        f"keys {format_bytes(storage['key_bytes'])}",
    ]
    if "attachment_bytes" in storage:
        parts.append(f"attachments {format_bytes(storage['attachment_bytes'])} ({storage['attachments']})")
    return f"{format_bytes(storage['total_bytes'])}: " + ", ".join(parts)


@user.command("show")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def user_show(ctx: click.Context, username: str, as_json: bool) -> None:
    """Show one user: profile, devices, sessions, queued events and the storage their data uses."""
    shown = admin(ctx, "user.show", {"username": username})
    if as_json:
        _print_json(shown)
        return
    known = {key for key, _ in _SHOW_FIELDS} | {"username", "storage"}
    fields = [(label, _display(key, shown.get(key))) for key, label in _SHOW_FIELDS if key in shown]
    fields += [(k.replace("_", " "), _display(k, v)) for k, v in shown.items() if k not in known]
    if isinstance(shown.get("storage"), dict):
        fields.append(("storage used", format_storage(shown["storage"])))
    click.echo(format_fields([("user", shown["username"]), *fields]))


@user.command("disable")
@click.argument("username")
@click.pass_context
def user_disable(ctx: click.Context, username: str) -> None:
    """Stop a user from logging in, and sign out their sessions."""
    admin(ctx, "user.disable", {"username": username})
    click.echo(f"disabled {username}; their sessions are signed out")


@user.command("enable")
@click.argument("username")
@click.pass_context
def user_enable(ctx: click.Context, username: str) -> None:
    """Let a disabled user log in again."""
    admin(ctx, "user.enable", {"username": username})
    click.echo(f"enabled {username}")


@user.command("delete")
@click.argument("username")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def user_delete(ctx: click.Context, username: str, yes: bool) -> None:
    """Delete a user with their devices, sessions and queued messages."""
    if not yes:
        click.confirm(f"Delete {username} with their devices, sessions and queued messages?", abort=True)
    admin(ctx, "user.delete", {"username": username})
    click.echo(f"deleted {username}")


@user.command("reset-password")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.pass_context
def user_reset_password(ctx: click.Context, username: str, password_stdin: bool) -> None:
    """Set a new password and sign out the user's sessions."""
    password = _read_password(password_stdin)
    admin(ctx, "user.reset-password", {"username": username, "password": password})
    click.echo(f"new password set for {username}; their sessions are signed out")


@user.command("logout")
@click.argument("username")
@click.pass_context
def user_logout(ctx: click.Context, username: str) -> None:
    """Sign out every session of a user."""
    revoked = admin(ctx, "user.logout", {"username": username})["revoked"]
    click.echo(f"signed out {revoked} session{'' if revoked == 1 else 's'} of {username}")


# -- invites --------------------------------------------------------------------------


@main.group()
def invite() -> None:
    """Create and revoke invite codes (for `registration = "invite"`)."""


@invite.command("create")
@click.option("--uses", type=click.IntRange(min=1), default=1, show_default=True, help="How many people may use it.")
@click.option(
    "--ttl-hours", type=click.FloatRange(min=0), default=168.0, show_default=True,
    help="Hours until it expires; 0 for never.",
)
@click.option("--note", default="", help="A reminder of whom it is for (shown in `invite list`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def invite_create(ctx: click.Context, uses: int, ttl_hours: float, note: str, as_json: bool) -> None:
    """Create an invite code. The code is shown only now."""
    ttl_s = round(ttl_hours * 3600)
    if ttl_hours > 0 and ttl_s == 0:
        raise click.BadParameter("must be at least one second", param_hint="--ttl-hours")
    created = admin(ctx, "invite.create", {"max_uses": uses, "ttl_s": ttl_s, "note": note})
    if as_json:
        _print_json(created)
        return
    expiry = f"expires in {ttl_hours:g} hours" if ttl_s else "never expires"
    # The code alone on stdout, so that scripts can capture it; the rest on stderr.
    click.echo(created["code"])
    click.echo(
        f"invite {created['id']}: {uses} use{'' if uses == 1 else 's'}, {expiry}; this code is not shown again",
        err=True,
    )


def _invite_state(inv: Mapping[str, Any], now_ms: int) -> str:
    if inv["revoked"]:
        return "revoked"
    if inv["uses"] >= inv["max_uses"]:
        return "used up"
    if inv["expires_at"] is not None and inv["expires_at"] <= now_ms:
        return "expired"
    return "active"


@invite.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def invite_list(ctx: click.Context, as_json: bool) -> None:
    """List invites (their codes are never shown again)."""
    invites = admin(ctx, "invite.list")
    if as_json:
        _print_json(invites)
        return
    if not invites:
        click.echo("no invites")
        return
    now_ms = int(datetime.now().timestamp() * 1000)
    rows = [
        (inv["id"], _invite_state(inv, now_ms), f"{inv['uses']}/{inv['max_uses']}", format_time(inv["created_at"]),
         format_time(inv["expires_at"]), inv["note"])
        for inv in invites
    ]
    click.echo(format_table(("ID", "STATE", "USES", "CREATED", "EXPIRES", "NOTE"), rows))


@invite.command("revoke")
@click.argument("invite_id", metavar="ID", type=int)
@click.pass_context
def invite_revoke(ctx: click.Context, invite_id: int) -> None:
    """Revoke an invite so that nobody can use it any more."""
    admin(ctx, "invite.revoke", {"id": invite_id})
    click.echo(f"revoked invite {invite_id}")


# -- federation peers --------------------------------------------------------------------


@main.group()
def peers() -> None:
    """Other nodes this one federates with: list, add, block, retry."""


def _peer_state(peer: Mapping[str, Any]) -> str:
    if peer["blocked"]:
        return "blocked"
    if peer["connected"]:
        return "connected"
    if peer["retry_in_s"] is not None:
        return f"retry in {peer['retry_in_s']:.0f}s ({peer['failures']} failed)"
    return "idle" if peer["peer_id"] else "not found"


@peers.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def peers_list(ctx: click.Context, as_json: bool) -> None:
    """Known nodes: how they were found, when last seen, outbox depth and backoff."""
    known = admin(ctx, "peers.list")
    if as_json:
        _print_json(known)
        return
    if not known:
        click.echo("no other nodes known yet")
        return
    rows = [
        (p["node"], (p["peer_id"] or "-")[:20], p["found_by"], format_time(p["last_seen"]), p["outbox"], _peer_state(p),
         " ".join(p["addrs"][-1:]) or "-")
        for p in known
    ]
    click.echo(format_table(("NODE", "PEER ID", "FOUND BY", "LAST SEEN", "OUTBOX", "STATE", "ADDRESS"), rows))
    for p in known:
        if p["conflict"]:
            click.echo(f"warning: {p['node']}: {p['conflict']}", err=True)
        if p["last_error"] and not p["connected"]:
            click.echo(f"{p['node']}: last error: {p['last_error']}", err=True)


@peers.command("add")
@click.argument("address", metavar="MULTIADDR")
@click.pass_context
def peers_add(ctx: click.Context, address: str) -> None:
    """Connect to a node now, e.g. /ip4/192.0.2.7/tcp/8471/p2p/12D3KooW..."""
    found = admin(ctx, "peers.add", {"address": address})
    click.echo(f"connected to {found['node']}")


@peers.command("pin")
@click.argument("address", metavar="MULTIADDR")
@click.pass_context
def peers_pin(ctx: click.Context, address: str) -> None:
    """Give a contested name to the node at MULTIADDR (its /p2p/<peer id> is what counts).

    When two nodes claim one name, the first one seen keeps it and `peers list`
    warns about the other, with its peer id; this hands the name (and what is
    queued for it) to that other node instead.
    """
    pinned = admin(ctx, "peers.pin", {"address": address})
    before = f" (was {pinned['previous']})" if pinned.get("previous") else ""
    click.echo(f"{pinned['node']} is now {pinned['peer_id']}{before}")


@peers.command("block")
@click.argument("node")
@click.pass_context
def peers_block(ctx: click.Context, node: str) -> None:
    """Refuse a node's connections and events (what it sent before stays)."""
    admin(ctx, "peers.block", {"node": node})
    click.echo(f"blocked {node}")


@peers.command("unblock")
@click.argument("node")
@click.pass_context
def peers_unblock(ctx: click.Context, node: str) -> None:
    """Accept a blocked node again."""
    admin(ctx, "peers.unblock", {"node": node})
    click.echo(f"unblocked {node}")


@peers.command("retry")
@click.argument("node")
@click.pass_context
def peers_retry(ctx: click.Context, node: str) -> None:
    """Try to deliver to a node now instead of waiting out its backoff."""
    admin(ctx, "peers.retry", {"node": node})
    click.echo(f"retrying {node}")


if __name__ == "__main__":
    main()
