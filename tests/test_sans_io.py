"""Pure modules stay pure: the protocol frames and the login limiter do no I/O."""

from __future__ import annotations

import json
import subprocess
import sys

from node.ratelimit import FailureLimiter
from tests.nodes import REPO

IO_PACKAGES = {"trio", "starlette", "hypercorn", "sqlalchemy", "httpx", "trio_websocket", "socket"}


def test_frames_module_imports_no_io_library():
    code = (
        "import sys, json; import web.frames; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert "msgspec" in loaded
    assert loaded & IO_PACKAGES == set()


def test_blob_protocol_and_attachment_crypto_import_no_io_library():
    code = (
        "import sys, json; import federation.blobwire, cli.attachments; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert "msgspec" in loaded and "nacl" in loaded
    assert loaded & (IO_PACKAGES | {"libp2p"}) == set()


def test_failure_limiter_window_and_reset():
    limiter = FailureLimiter(3, 60)
    for t in (0, 1, 2):
        assert limiter.retry_after("user:a", t) == 0
        limiter.record_failure("user:a", t)
    assert limiter.retry_after("user:a", 3) == 57  # the first failure expires at 60
    assert limiter.retry_after("user:b", 3) == 0
    assert limiter.retry_after("user:a", 60.5) == 0
    limiter.record_failure("user:a", 61)
    limiter.reset("user:a")
    assert limiter.retry_after("user:a", 61) == 0


def test_failure_limiter_memory_is_bounded():
    limiter = FailureLimiter(5, 60, max_keys=1000)
    for i in range(10_000):
        limiter.record_failure(f"user:{i}", 0)
    assert len(limiter._failures) <= 1000
    # The newest keys are the ones kept.
    assert limiter.retry_after("user:9999", 1) == 0 and "user:9999" in limiter._failures
