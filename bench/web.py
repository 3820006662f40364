"""The web page: cold load to a usable conversation list, and bytes transferred.

    python bench/web.py [--quick] [--runs N] [--conversations C]

One ``moot run`` process on 127.0.0.1 and Debian's Chromium driven by Playwright
(tests/browser.py: never ``playwright install``), in one browser context kept for
the whole run so the page's IndexedDB and session cookie survive between loads.

Setup: the page signs up user ``reader`` through its own form and waits until it
is connected. Then C (default 50) other users, made with the Python client
library (cli/client.py), each send one or two text messages to ``reader``; the
page receives them live, decrypts them and keeps them in IndexedDB, until its
conversation list shows C entries.

Each measured load opens a new tab with an empty HTTP cache (CDP
``Network.clearBrowserCache``; IndexedDB and cookies stay: a returning user whose
browser cache is cold) and goes to ``/``:

- ``load_ms``: from navigation start (the new document's ``performance.timeOrigin``)
  until the conversation list first holds C items, each with the text of a message
  we sent as its preview. It is taken inside the page by a MutationObserver that an
  init script installs before the page's own scripts run, so neither Python nor
  Playwright's polling counts; ``frame_ms`` is the next animation frame after it.
- ``bytes``: what the load downloaded over HTTP (CDP ``Network.loadingFinished``
  ``encodedDataLength``: headers and body as received, for every request the load
  made until the page went quiet: connected, no request in flight for 0.5 s).
  ``ws_bytes`` is the payload of the WebSocket messages it received in that time.

The same loads are also made with the HTTP cache left warm (``warm_*``), for
comparison. Timings of the phases of the first cold load (document, modules,
API calls, the list) come from the page's Resource Timing entries.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# The repository first: this file's own name would otherwise shadow the `web` package
# (cli.client imports web.frames) since Python puts bench/ at the head of sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import PASSWORD, NodeProcess, emit, log, rounded  # noqa: E402

READER = "reader"
MARKER = "moot-bench"  # in every message sent, so the list's previews can be checked
TARGET_LOAD_MS = 1000
TARGET_BYTES = 200_000
QUIET_S = 0.5  # a load is over once nothing happened on the network for this long
WAIT_MS = 30_000  # any single wait for the page
SETTLE_TIMEOUT_S = 15.0
SEND_CONCURRENCY = 10

# Installed in every document before its own scripts (CDP addScriptToEvaluateOnNewDocument,
# which the page's CSP does not apply to). It records, in the page's clock:
# ready  when #conversation-list first holds `want` items whose previews show our text;
# frame  the animation frame after that; online  when #conn-status first says online;
# renders  when the list's children were replaced, once per replacement (its length says how often
#          the page rebuilt the list during the load).
INIT_SCRIPT = """
(() => {
  const want = %(want)d, marker = %(marker)r;
  const b = window.__mootBench = { ready: null, frame: null, online: null, renders: [] };
  const listReady = (list) => {
    if (list.children.length !== want) return false;
    for (const li of list.children) {
      const p = li.querySelector(".preview-text");
      if (!p || !p.textContent.includes(marker)) return false;
    }
    return true;
  };
  new MutationObserver((records) => {
    const now = performance.now();
    for (const r of records) {
      const el = r.target;
      if (el.id === "conversation-list" && r.type === "childList") {
        b.renders.push(now);
        if (b.ready === null && listReady(el)) {
          b.ready = now;
          requestAnimationFrame(() => { b.frame = performance.now(); });
        }
      } else if (el.id === "conn-status" && b.online === null && el.dataset.state === "online") {
        b.online = now;
      }
    }
  }).observe(document, { childList: true, subtree: true, attributes: true, attributeFilter: ["data-state"] });
})();
"""

# What the page's clock says about the load once it is over.
TIMINGS_JS = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const res = performance.getEntriesByType("resource").map((e) => ({
    path: new URL(e.name).pathname, start: e.startTime, end: e.responseEnd, size: e.transferSize }));
  return { bench: window.__mootBench, res,
           nav: { responseEnd: nav.responseEnd, dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd } };
}"""


# -- the conversations: C users write to the reader (Python client, trio) -----------------------


async def write_to_reader(base_url: str, reader: str, n: int) -> int:
    """Users w000.. each register, make a device, connect and send 1 or 2 messages to ``reader``.

    Returns the number of messages sent (each one stored by the node).
    """
    import trio

    from cli.client import MootClient

    limiter = trio.CapacityLimiter(SEND_CONCURRENCY)
    sent = 0

    async def one(i: int) -> None:
        nonlocal sent
        async with limiter:
            client = MootClient(base_url)
            try:
                name = f"w{i:03d}"
                await client.register(name, PASSWORD)
                await client.login(name, PASSWORD)
                await client.create_device("bench", one_time_prekeys=1)
                async with client.connect() as live:
                    for k in range(1 + i % 2):
                        await live.send_text(reader, f"{MARKER} hello from {name}, message {k + 1}")
                        sent += 1
            finally:
                await client.aclose()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    return sent


# -- what one page load transfers (CDP Network events) --------------------------------------------


class NetworkLog:
    """Counts a tab's HTTP and WebSocket traffic from CDP ``Network`` events."""

    def __init__(self, cdp: Any) -> None:
        self.requests: dict[str, dict[str, Any]] = {}  # requestId -> url, type, status, bytes, ...
        self.sockets: set[str] = set()
        self.ws_bytes = self.ws_frames = self.ws_sent_bytes = 0
        self.last_activity = time.monotonic()
        # CDP timestamps (s): the document request's start, and the WebSocket's milestones.
        self.doc_start: float | None = None
        self.ws_times: dict[str, float] = {}
        for event, handler in {
            "Network.requestWillBeSent": self._request,
            "Network.responseReceived": self._response,
            "Network.requestServedFromCache": self._from_cache,
            "Network.loadingFinished": self._finished,
            "Network.loadingFailed": self._failed,
            "Network.webSocketCreated": self._ws_created,
            "Network.webSocketWillSendHandshakeRequest": self._ws_handshake,
            "Network.webSocketHandshakeResponseReceived": self._ws_open,
            "Network.webSocketFrameReceived": self._ws_received,
            "Network.webSocketFrameSent": self._ws_sent,
        }.items():
            cdp.on(event, handler)

    def _touch(self) -> None:
        self.last_activity = time.monotonic()

    def _request(self, e: dict[str, Any]) -> None:
        self._touch()
        if e["request"]["url"].startswith("data:"):
            return
        if e.get("type") == "Document" and self.doc_start is None:
            self.doc_start = e["timestamp"]
        # A redirect reuses the requestId: the entry simply starts over.
        self.requests[e["requestId"]] = {
            "url": e["request"]["url"], "type": e.get("type", "Other"), "status": None, "bytes": 0,
            "done": False, "cached": False,
        }

    def _response(self, e: dict[str, Any]) -> None:
        self._touch()
        r = self.requests.get(e["requestId"])
        if r is not None:
            resp = e["response"]
            r["status"] = resp.get("status")
            r["cached"] = r["cached"] or bool(resp.get("fromDiskCache") or resp.get("fromPrefetchCache")
                                              or resp.get("fromServiceWorker"))

    def _from_cache(self, e: dict[str, Any]) -> None:
        r = self.requests.get(e["requestId"])
        if r is not None:
            r["cached"] = True

    def _finished(self, e: dict[str, Any]) -> None:
        self._touch()
        r = self.requests.get(e["requestId"])
        if r is not None:
            r["bytes"] = int(e.get("encodedDataLength") or 0)
            r["done"] = True

    def _failed(self, e: dict[str, Any]) -> None:
        self._touch()
        r = self.requests.get(e["requestId"])
        if r is not None:
            r["done"] = True
            r["failed"] = e.get("errorText", "failed")

    def _ws_created(self, e: dict[str, Any]) -> None:
        self._touch()
        self.sockets.add(e["requestId"])

    def _ws_handshake(self, e: dict[str, Any]) -> None:
        self._touch()
        if e["requestId"] in self.sockets:
            self.ws_times.setdefault("ws_handshake", e["timestamp"])

    def _ws_open(self, e: dict[str, Any]) -> None:
        self._touch()
        if e["requestId"] in self.sockets:
            self.ws_times.setdefault("ws_open", e["timestamp"])

    def _ws_received(self, e: dict[str, Any]) -> None:
        self._touch()
        if e["requestId"] in self.sockets:
            self.ws_times.setdefault("ws_first_message", e["timestamp"])
            self.ws_frames += 1
            self.ws_bytes += len(e["response"].get("payloadData", "").encode())

    def _ws_sent(self, e: dict[str, Any]) -> None:
        self._touch()
        if e["requestId"] in self.sockets:
            self.ws_sent_bytes += len(e["response"].get("payloadData", "").encode())

    # The WebSocket's own requestId shows up in requestWillBeSent on some versions: never count it as HTTP.
    def http(self) -> list[dict[str, Any]]:
        return [r for rid, r in self.requests.items() if rid not in self.sockets and r["type"] != "WebSocket"]

    def ws_phases(self) -> dict[str, float]:
        """The WebSocket's milestones in ms from the document request (about the page's clock)."""
        if self.doc_start is None:
            return {}
        return {k: (t - self.doc_start) * 1000 for k, t in self.ws_times.items()}

    def in_flight(self) -> int:
        return sum(1 for r in self.http() if not r["done"])

    def http_bytes(self, *, static: bool | None = None) -> int:
        def is_static(r: dict[str, Any]) -> bool:
            return not urlsplit(r["url"]).path.startswith("/api/")

        return sum(r["bytes"] for r in self.http() if static is None or is_static(r) == static)


# -- the page ---------------------------------------------------------------------------------------


def sign_up(context: Any, base_url: str) -> None:
    """Sign ``reader`` up through the page's own form; return once the page is connected."""
    page = context.new_page()
    page.goto(base_url + "/", timeout=WAIT_MS)
    page.fill("#signup-form input[name=username]", READER, timeout=WAIT_MS)
    page.fill("#signup-form input[name=password]", PASSWORD)
    page.click("#signup-form button[type=submit]")
    page.wait_for_selector("#conn-status[data-state=online]", timeout=WAIT_MS)
    page.close()


def wait_for_list(context: Any, base_url: str, n: int, fill: Any) -> None:
    """Keep the page open while ``fill()`` has C users write to it; wait until it lists them all."""
    page = context.new_page()
    page.goto(base_url + "/", timeout=WAIT_MS)
    page.wait_for_selector("#conn-status[data-state=online]", timeout=WAIT_MS)
    t0 = time.monotonic()
    messages = fill()
    log(f"  {n} users sent {messages} messages in {time.monotonic() - t0:.1f} s")
    page.wait_for_function("() => window.__mootBench.ready !== null", timeout=60_000)
    log(f"  the page lists {n} conversations after {time.monotonic() - t0:.1f} s")
    # Let it store and acknowledge everything, so later loads get no backlog.
    page.wait_for_timeout(1000)
    page.close()


def one_load(context: Any, url: str, *, cold: bool) -> dict[str, Any]:
    """Open ``url`` in a new tab (its HTTP cache emptied first if ``cold``) and measure the load."""
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type in ("error", "warning") else None)
    try:
        cdp.send("Network.enable")
        if cold:
            cdp.send("Network.clearBrowserCache")
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": False})
        net = NetworkLog(cdp)
        page.goto(url, wait_until="commit", timeout=WAIT_MS)
        page.wait_for_function("() => window.__mootBench && window.__mootBench.ready !== null", timeout=WAIT_MS)
        # The load goes on after the list shows (WebSocket, the list's refresh from the
        # node): count its traffic until it is connected and the network has been quiet.
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        settled = False
        while time.monotonic() < deadline:
            page.wait_for_timeout(50)  # also lets Playwright deliver the CDP events
            online = page.evaluate("() => window.__mootBench.online !== null")
            if online and net.in_flight() == 0 and time.monotonic() - net.last_activity >= QUIET_S:
                settled = True
                break
        t = page.evaluate(TIMINGS_JS)
    finally:
        cdp.detach()
        page.close()
    b = t["bench"]

    def end_of(path: str) -> float | None:
        ends = [r["end"] for r in t["res"] if r["path"] == path]
        return ends[0] if ends else None

    scripts = [r for r in t["res"] if r["path"].endswith(".js")]
    http = net.http()
    return {
        "load_ms": b["ready"],
        "frame_ms": b["frame"],
        "online_ms": b["online"],
        "last_render_ms": b["renders"][-1] if b["renders"] else None,
        "renders": len(b["renders"]),
        "bytes": net.http_bytes(),
        "static_bytes": net.http_bytes(static=True),
        "api_bytes": net.http_bytes(static=False),
        "ws_bytes": net.ws_bytes,
        "ws_frames": net.ws_frames,
        "ws_sent_bytes": net.ws_sent_bytes,
        "requests": len(http),
        "cached": sum(1 for r in http if r["cached"] or r["status"] == 304),
        "failed": [r["url"] for r in http if r.get("failed")],
        "settled": settled,
        "errors": errors,
        # Phases, in the page's clock (ms from navigation start).
        "phases": {
            "document": t["nav"]["responseEnd"],
            "dom_content_loaded": t["nav"]["dcl"],
            "modules": max((r["end"] for r in scripts), default=None),
            "api_info": end_of("/api/v1/info"),
            "api_me": end_of("/api/v1/me"),
            "list": b["ready"],
            "api_conversations": end_of("/api/v1/conversations"),
            **net.ws_phases(),
            "online": b["online"],
            "list_refreshed": b["renders"][-1] if b["renders"] else None,
        },
        "http": sorted(({"path": urlsplit(r["url"]).path, "type": r["type"], "status": r["status"],
                         "bytes": r["bytes"]} for r in http), key=lambda r: -r["bytes"]),
        "resources": sorted(t["res"], key=lambda r: r["start"]),
    }


def median(loads: list[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over the loads that have it; None if none has."""
    values = [x[key] for x in loads if x[key] is not None]
    return float(statistics.median(values)) if values else None


def describe(load: dict[str, Any]) -> None:
    """Where the time and the bytes of one load went, to stderr."""
    log("  phases (ms from navigation start): " + ", ".join(
        f"{k} {v:.0f}" for k, v in load["phases"].items() if v is not None))
    for r in load["resources"]:
        log(f"    {r['path']:<34} {r['start']:7.1f} .. {r['end']:7.1f} ms  {r['size']:>7} B")
    for r in load["http"]:
        log(f"    {r['status']} {r['type']:<10} {r['path']:<34} {r['bytes']:>7} B")


# -- the run ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 loads of each kind (under 30 s)")
    ap.add_argument("--runs", type=int, help="cold loads to measure (default 7; quick: 3)")
    ap.add_argument("--conversations", type=int, default=50)
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 7)
    n = args.conversations

    import httpx
    import trio

    from tests.browser import chromium  # Debian's Chromium, kept off the network

    with tempfile.TemporaryDirectory(prefix="moot-bench-web-") as tmp:
        node = NodeProcess(Path(tmp) / "data")
        with node, chromium() as browser:
            node_name = httpx.get(node.base_url + "/api/v1/info", timeout=10).json()["node"]
            reader = f"{READER}@{node_name}"
            url = node.base_url + "/"
            context = browser.new_context()
            context.set_default_timeout(WAIT_MS)
            context.add_init_script(INIT_SCRIPT % {"want": n, "marker": MARKER})
            try:
                t0 = time.monotonic()
                sign_up(context, node.base_url)
                log(f"{reader} signed up through the page in {time.monotonic() - t0:.1f} s")
                log(f"{n} users write to {reader}")
                wait_for_list(context, node.base_url, n,
                              lambda: trio.run(write_to_reader, node.base_url, reader, n))

                loads: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
                for kind in ("cold", "warm"):
                    log(f"{runs} {kind} loads")
                    for i in range(runs):
                        load = one_load(context, url, cold=kind == "cold")
                        loads[kind].append(load)
                        log(f"  {kind} load {i + 1}: list after {load['load_ms']:.0f} ms (frame {load['frame_ms'] or 0:.0f}), "
                            f"online {load['online_ms'] or 0:.0f} ms; {load['bytes']} B HTTP in {load['requests']} "
                            f"requests ({load['cached']} from cache), {load['ws_bytes']} B WebSocket in "
                            f"{load['ws_frames']} messages; list built {load['renders']} times"
                            + ("" if load["settled"] else "; did NOT settle"))
                        for err in load["errors"]:
                            log(f"    page said: {err[:300]}")
                        if kind == "cold" and i == 0:
                            describe(load)
            finally:
                context.close()

    cold, warm = loads["cold"], loads["warm"]
    load_ms = median(cold, "load_ms")
    bytes_ = median(cold, "bytes")
    assert load_ms is not None and bytes_ is not None
    result = {
        "bench": "web",
        "quick": args.quick,
        "load_ms": round(load_ms, 1),  # median over the cold loads
        "bytes": int(bytes_),  # median HTTP bytes of a cold load
        "ws_bytes": int(median(cold, "ws_bytes") or 0),
        "runs": runs,
        "conversations": n,
        "load_ms_runs": [rounded(x["load_ms"], 1) for x in cold],
        "bytes_runs": [x["bytes"] for x in cold],
        "ws_bytes_runs": [x["ws_bytes"] for x in cold],
        "first_bytes": cold[0]["bytes"],
        "static_bytes": cold[0]["static_bytes"],
        "api_bytes": cold[0]["api_bytes"],
        "requests": cold[0]["requests"],
        "cold_cache_hits": sum(x["cached"] for x in cold),  # 0 unless clearing the cache failed
        "frame_ms": rounded(median(cold, "frame_ms"), 1),
        "online_ms": rounded(median(cold, "online_ms"), 1),
        "list_refreshed_ms": rounded(median(cold, "last_render_ms"), 1),
        "list_renders": int(median(cold, "renders") or 0),
        "phases_ms": {k: rounded(v, 1) for k, v in cold[0]["phases"].items()},
        "warm_load_ms": rounded(median(warm, "load_ms"), 1),
        "warm_bytes": int(median(warm, "bytes") or 0),
        "settled": all(x["settled"] for x in cold + warm),
        "page_messages": sum(len(x["errors"]) for x in cold + warm),  # console errors and warnings
        "target_load_ms": TARGET_LOAD_MS,
        "target_bytes": TARGET_BYTES,
        "met": load_ms < TARGET_LOAD_MS and bytes_ < TARGET_BYTES,
    }
    emit("web-quick" if args.quick else "web", result)


if __name__ == "__main__":
    main()
