"""A throwaway coturn ``turnserver`` for the tests, on 127.0.0.1 and free ports.

It runs with no config file (``-n``), ``use-auth-secret`` and a
``static-auth-secret``, its SQLite file in its own temporary directory, UDP and TCP
only (no TLS/DTLS, no CLI), relaying on loopback. ``stop()`` ends it by the PID we
started. There is no skip when coturn is missing: ``make test-deps`` installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

TURNSERVER = "/usr/bin/turnserver"
REALM = "moot.test"


class TurnServerError(RuntimeError):
    """coturn is missing or did not come up."""


def free_udp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (turnserver listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise TurnServerError("no free port")


def _stun_binding_answered(port: int, timeout: float) -> bool:
    """Whether a STUN Binding request to the port gets a Binding success response."""
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(request, ("127.0.0.1", port))
        try:
            answer = sock.recv(2048)
        except OSError:
            return False
    return answer[:2] == b"\x01\x01" and answer[8:20] == request[8:20]


class TurnServer:
    def __init__(self, proc: subprocess.Popen[bytes], base_dir: Path, port: int, secret: str) -> None:
        self.proc = proc
        self.base_dir = base_dir
        self.port = port
        self.secret = secret

    @classmethod
    def start(cls, secret: str, *, wait_s: float = 15) -> TurnServer:
        """Start turnserver; return once it answers STUN. Raises TurnServerError."""
        if not Path(TURNSERVER).exists():
            raise TurnServerError(f"no {TURNSERVER}: `make test-deps` installs coturn")
        base_dir = Path(tempfile.mkdtemp(prefix="moot-turn-"))
        port = free_udp_port()
        relay_low = 40000 + (port % 20000)  # a small relay range of our own, away from the listener
        args = [
            TURNSERVER, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
            f"--min-port={relay_low}", f"--max-port={relay_low + 200}", "--use-auth-secret",
            f"--static-auth-secret={secret}", f"--realm={REALM}", "--no-tls", "--no-dtls", "--no-cli",
            "--allow-loopback-peers", "--no-multicast-peers", f"--userdb={base_dir / 'turndb'}",
            f"--pidfile={base_dir / 'turnserver.pid'}", "--log-file=stdout", "--simple-log",
        ]
        log = open(base_dir / "turnserver.log", "wb")
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=base_dir)
        log.close()
        server = cls(proc, base_dir, port, secret)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _stun_binding_answered(port, 0.2):
                return server
        tail = server.log_tail()
        server.stop()
        raise TurnServerError(f"turnserver did not answer STUN on 127.0.0.1:{port} within {wait_s}s\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.base_dir / "turnserver.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server we started (by its PID) and delete its directory. Idempotent."""
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> TurnServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
