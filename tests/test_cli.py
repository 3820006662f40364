"""The `moot` command: set-up in-process with click's runner, and administration of a
real node started with `moot run` in a subprocess."""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli.main import format_table, format_time, main

START_TIMEOUT_S = 60.0


def moot(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


# -- without a node -------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = moot("--help")
    assert result.exit_code == 0
    for command in ("init", "run", "status", "user", "invite"):
        assert command in result.output
    user_help = moot("user", "--help")
    assert user_help.exit_code == 0
    for command in ("add", "list", "show", "disable", "enable", "delete", "reset-password", "logout"):
        assert command in user_help.output


def test_help_does_not_import_the_node() -> None:
    code = "import sys; from cli.main import main; print('trio' in sys.modules, 'node.app' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_init_creates_key_and_config_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = moot("--data-dir", str(data_dir), "init", "--name", "riverside")
    assert result.exit_code == 0, result.output
    assert "created" in result.output and "riverside" in result.output

    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    key_file = data_dir / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    assert len(key) == 32
    config = tomllib.loads((data_dir / "moot.toml").read_text())
    assert config["node_name"] == "riverside"

    again = moot("--data-dir", str(data_dir), "init")
    assert again.exit_code == 0, again.output
    assert "already" in again.output and "riverside" in again.output
    assert key_file.read_bytes() == key
    assert tomllib.loads((data_dir / "moot.toml").read_text()) == config


def test_init_rejects_a_bad_name(tmp_path: Path) -> None:
    result = moot("--data-dir", str(tmp_path / "data"), "init", "--name", "Not A Name")
    assert result.exit_code == 2
    assert "node_name" in result.output
    assert not (tmp_path / "data").exists()


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    (tmp_path / "moot.toml").write_text("bogus_option = 1\n")
    result = moot("--data-dir", str(tmp_path), "run")
    assert result.exit_code == 2
    assert "bogus_option" in result.stderr


def test_commands_without_a_node_exit_3(tmp_path: Path) -> None:
    result = moot("--data-dir", str(tmp_path), "status")
    assert result.exit_code == 3
    assert result.stderr.strip() == (
        f"moot: the node is not running (no admin socket at {tmp_path.resolve() / 'admin.sock'}); start it with `moot run`"
    )
    assert moot("--data-dir", str(tmp_path), "user", "list").exit_code == 3


def test_table_and_time_formatting() -> None:
    table = format_table(("ID", "NAME", "NOTE"), [(1, "alice", None), (12, "bob", "x")])
    assert table.splitlines() == ["ID  NAME   NOTE", " 1  alice  -", "12  bob    x"]
    assert format_time(None) == "-"
    assert format_time(0)[:4] in ("1969", "1970")


# -- against a running node -----------------------------------------------------------------


@dataclass
class RunningNode:
    data_dir: Path
    name: str
    process: subprocess.Popen[bytes]

    def moot(self, *args: str, input: str | None = None) -> Result:
        return moot("--data-dir", str(self.data_dir), *args, input=input)


def _moot_command() -> list[str]:
    script = Path(sys.executable).parent / "moot"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def _wait_for_line(process: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """Read the process's stdout until a line containing ``marker``; fail on exit or timeout."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {marker!r} within {timeout} s; stdout so far: {seen!r}")
        readable, _, _ = select.select([process.stdout], [], [], remaining)
        if readable:
            line = process.stdout.readline()
            if not line:
                raise AssertionError(f"the node exited ({process.wait()}) before {marker!r}; stdout: {seen!r}")
            seen += line
            if marker in line:
                return line


@pytest.fixture
def running_node(tmp_path: Path) -> Iterator[RunningNode]:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOOT_")}
    env["MOOT_PASSWORD_HASH_COST"] = "min"
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [*_moot_command(), "--data-dir", str(data_dir), "run", "--name", "clinode",
             "--web-host", "127.0.0.1", "--web-port", "0"],
            stdout=subprocess.PIPE, stderr=log_file, env=env, cwd=tmp_path,
        )
    try:
        # The node prints its address only once the admin socket and the web server listen.
        _wait_for_line(process, b"is running at", START_TIMEOUT_S)
        yield RunningNode(data_dir, "clinode", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()
        assert not (data_dir / "admin.sock").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


@pytest.mark.slow
def test_operator_commands_against_a_running_node(running_node: RunningNode) -> None:
    node = running_node
    sock = node.data_dir / "admin.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    status = node.moot("status")
    assert status.exit_code == 0, status.output
    assert "clinode" in status.stdout and "uptime" in status.stdout
    assert json.loads(node.moot("status", "--json").stdout)["node"] == "clinode"

    # Adding users: from stdin, and by prompting twice (a mismatch asks again).
    added = node.moot("user", "add", "alice", "--password-stdin", input="correct horse\n")
    assert added.exit_code == 0, added.output
    assert "alice@clinode" in added.stdout
    prompted = node.moot("user", "add", "bob", input="correct horse\nwrong horse\nbattery staple\nbattery staple\n")
    assert prompted.exit_code == 0, prompted.output
    assert "battery" not in prompted.output and "do not match" in prompted.output
    taken = node.moot("user", "add", "alice", "--password-stdin", input="correct horse\n")
    assert taken.exit_code == 1
    assert taken.stderr.startswith("moot: ") and taken.stderr.rstrip().endswith("(username_taken)")
    assert node.moot("user", "add", "carol", "--password-stdin", input="short\n").exit_code == 1

    listed = node.moot("user", "list")
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["USER", "STATE", "CREATED", "LAST", "SEEN"]
    assert [line.split()[:2] for line in lines[1:]] == [["alice", "active"], ["bob", "active"]]
    assert [u["username"] for u in json.loads(node.moot("user", "list", "--json", "--prefix", "b").stdout)] == ["bob"]

    shown = node.moot("user", "show", "alice")
    assert shown.exit_code == 0
    assert "alice@clinode" in shown.stdout and "sessions:" in shown.stdout
    shown_json = json.loads(node.moot("user", "show", "alice", "--json").stdout)
    assert shown_json["username"] == "alice" and shown_json["devices"] == 0
    assert "password_hash" not in shown_json

    assert node.moot("user", "disable", "alice").exit_code == 0
    assert json.loads(node.moot("user", "show", "alice", "--json").stdout)["disabled"] is True
    assert "disabled" in node.moot("user", "list").stdout
    assert node.moot("user", "enable", "alice").exit_code == 0
    assert json.loads(node.moot("user", "show", "alice", "--json").stdout)["disabled"] is False

    reset = node.moot("user", "reset-password", "alice", "--password-stdin", input="new horse staple\n")
    assert reset.exit_code == 0, reset.output
    logout = node.moot("user", "logout", "alice")
    assert logout.exit_code == 0 and "0 sessions" in logout.stdout

    declined = node.moot("user", "delete", "bob", input="n\n")
    assert declined.exit_code == 1
    assert node.moot("user", "show", "bob").exit_code == 0
    assert node.moot("user", "delete", "bob", "--yes").exit_code == 0
    gone = node.moot("user", "show", "bob")
    assert gone.exit_code == 1
    assert gone.stderr == "moot: no user 'bob' on this node (unknown_user)\n"
    assert node.moot("user", "disable", "nobody").exit_code == 1

    # Invites: the code is printed once, alone on stdout.
    created = node.moot("invite", "create", "--uses", "2", "--ttl-hours", "1", "--note", "for carol")
    assert created.exit_code == 0, created.output
    code = created.stdout.strip()
    assert code and " " not in code and "not shown again" in created.stderr
    forever = json.loads(node.moot("invite", "create", "--ttl-hours", "0", "--json").stdout)
    assert set(forever) == {"id", "code"}

    invites = node.moot("invite", "list")
    assert invites.exit_code == 0 and code not in invites.stdout
    rows = invites.stdout.splitlines()
    assert rows[0].split() == ["ID", "STATE", "USES", "CREATED", "EXPIRES", "NOTE"]
    assert rows[1].split()[:3] == ["1", "active", "0/2"] and rows[1].endswith("for carol")
    assert rows[2].split()[:3] == ["2", "active", "0/1"]
    assert node.moot("invite", "revoke", "1").exit_code == 0
    listed_json = json.loads(node.moot("invite", "list", "--json").stdout)
    assert [(i["id"], i["revoked"], i["expires_at"] is None) for i in listed_json] == [(1, True, False), (2, False, True)]
    assert node.moot("invite", "revoke", "99").exit_code == 1
    assert node.moot("invite", "create", "--uses", "0").exit_code == 2
