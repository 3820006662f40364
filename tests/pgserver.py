"""A throwaway PostgreSQL server for the tests, on 127.0.0.1 and a free port.

``PgServer.start()`` runs ``initdb`` in a fresh temporary directory and starts the
server with ``pg_ctl``; ``stop()`` shuts it down and deletes the directory. When we
are root, both run as the ``postgres`` OS user (PostgreSQL refuses to run as root).
Authentication is ``trust``: the server only listens on loopback and a socket in its
own directory, and lives for one test session.

There is no skip when PostgreSQL is missing: ``make test`` installs it
(``make test-deps``), and without it this module raises.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"


class PgServerError(RuntimeError):
    """The throwaway server could not be found, started or used."""


def find_bin_dir() -> Path:
    """The ``bin`` directory of the newest PostgreSQL under /usr/lib/postgresql.

    Raises PgServerError when no version with both ``initdb`` and ``pg_ctl`` exists.
    """
    candidates = []
    for initdb in PG_ROOT.glob("*/bin/initdb"):
        bin_dir = initdb.parent
        version = bin_dir.parent.name
        if (bin_dir / "pg_ctl").exists() and re.fullmatch(r"\d+(\.\d+)*", version):
            candidates.append((tuple(int(p) for p in version.split(".")), bin_dir))
    if not candidates:
        how = "`make test` installs it" if os.environ.get("CI") == "true" else "run `make test-deps` to install it"
        raise PgServerError(
            f"no PostgreSQL server binaries under {PG_ROOT}/<version>/bin (initdb, pg_ctl); {how}"
        )
    return max(candidates)[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """A running throwaway server; use ``start()`` to create one."""

    def __init__(self, bin_dir: Path, base_dir: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_file = base_dir / "server.log"
        self.port = port
        self._running = False

    @classmethod
    def start(cls, *, attempts: int = 3) -> PgServer:
        """Initialise a cluster in a new temporary directory and start it.

        Retries on another port if the chosen one was taken meanwhile. Raises
        PgServerError (with the server log) if it does not come up.
        """
        bin_dir = find_bin_dir()
        base_dir = Path(tempfile.mkdtemp(prefix="moot-pg-"))
        server = cls(bin_dir, base_dir, free_port())
        try:
            if os.geteuid() == 0:
                shutil.chown(base_dir, user=SUPERUSER, group=SUPERUSER)
            server._run("initdb", "-D", str(server.data_dir), "--auth=trust", "-U", SUPERUSER, "--no-sync")
            for attempt in range(attempts):
                try:
                    server._start()
                    return server
                except PgServerError:
                    if attempt == attempts - 1:
                        raise
                    server.port = free_port()
        except BaseException:
            server.stop()
            raise
        raise AssertionError("unreachable")

    def _start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base_dir} -c fsync=on"
        try:
            self._run(
                "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options, "-w", "-t", "60", "start"
            )
        except PgServerError as exc:
            raise PgServerError(f"{exc}\n--- server log ---\n{self._log_tail()}") from None
        self._running = True

    def _run(self, tool: str, *args: str) -> None:
        # As root, run as the postgres user: initdb and postgres refuse root.
        prefix = ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []
        # stdin/stdout are not pipes we wait on: the postmaster forked by
        # pg_ctl would keep them open. Its output goes to the log file.
        result = subprocess.run(
            [*prefix, str(self.bin_dir / tool), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.base_dir,
            timeout=120,
        )
        if result.returncode != 0:
            raise PgServerError(f"{tool} failed ({result.returncode}): {result.stdout.strip()}")

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; return its SQLAlchemy URL."""
        if not self._running:
            raise PgServerError("the server is not running")
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory. Idempotent."""
        try:
            if self._running:
                self._running = False
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    began = time.perf_counter()
    with PgServer.start() as server:
        print(f"started in {time.perf_counter() - began:.2f}s on port {server.port}")
        began = time.perf_counter()
        print(server.create_database("smoke"), f"created in {(time.perf_counter() - began) * 1000:.0f}ms")
