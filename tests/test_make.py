"""`make run` starts a working node: the exact command the Makefile runs, on a fresh data dir."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

import httpx

from tests.nodes import REPO, free_port


def test_make_run_command_starts_a_node_and_stops_on_ctrl_c(tmp_path):
    data_dir = tmp_path / "data"
    planned = subprocess.run(
        ["make", "-n", "run", f"DATA_DIR={data_dir}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    command = [line for line in planned.splitlines() if "bin/moot" in line]
    assert len(command) == 1, planned
    port = free_port()
    env = {**os.environ, "MOOT_WEB_PORT": str(port), "MOOT_PASSWORD_HASH_COST": "min"}
    proc = subprocess.Popen(
        shlex.split(command[0]), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        banner = ""
        deadline = time.monotonic() + 30
        while "is running at" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            banner += line
        assert f"is running at http://127.0.0.1:{port}" in banner, banner
        info = httpx.get(f"http://127.0.0.1:{port}/api/v1/info", timeout=5).json()
        assert f"Moot node '{info['node']}'" in banner
        assert (data_dir / "node.key").stat().st_mode & 0o777 == 0o600
        assert (data_dir / "moot.toml").exists()
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
