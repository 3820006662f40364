"""The page in a real Chromium: served by the node, locked down by its CSP, no token in reach of script."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.browser import chromium
from tests.nodes import PASSWORD


def test_page_loads_and_its_csp_blocks_inline_script_and_other_origins(node):
    with chromium() as browser:
        page = browser.new_page()
        violations: list[str] = []
        page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
        response = page.goto(node.base_url + "/", timeout=10_000)
        assert response is not None and response.status == 200
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert page.evaluate("() => window.isSecureContext") is True
        assert page.evaluate("() => typeof crypto.subtle.generateKey") == "function"
        # The node serves the client's ES modules so that its own policy lets them load.
        assert page.evaluate("async () => typeof (await import('/js/crypto.js')).encryptMessage") == "function"
        # An injected inline script does not run.
        ran = page.evaluate(
            """() => {
                window.__ran = false;
                const s = document.createElement('script');
                s.textContent = 'window.__ran = true';
                document.body.appendChild(s);
                return window.__ran;
            }"""
        )
        assert ran is False
        # Nor may the page reach another origin.
        blocked = page.evaluate(
            """async () => {
                try { await fetch('http://127.0.0.2:9/'); return false; } catch (e) { return true; }
            }"""
        )
        assert blocked is True
        page.wait_for_timeout(200)
        # Both refusals were the policy's, not a missing server.
        assert any("script-src" in v for v in violations), violations
        assert any("connect-src" in v for v in violations), violations


def test_session_cookie_is_out_of_reach_of_page_script(node):
    with chromium() as browser:
        page = browser.new_page()
        page.goto(node.base_url + "/", timeout=10_000)
        result = page.evaluate(
            """async (password) => {
                const post = (path, body) => fetch(path, {
                    method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body),
                });
                await post('/api/v1/register', {username: 'alice', password});
                const login = await post('/api/v1/login', {username: 'alice', password, cookie: true});
                const body = await login.json();
                const me = await fetch('/api/v1/me');
                return {login: login.status, me: me.status, user: (await me.json()).user, cookie: document.cookie,
                        token: 'token' in body};
            }""",
            PASSWORD,
        )
        assert result["login"] == 200 and result["me"] == 200 and result["user"] == "alice@riverside"
        assert "moot_session" not in result["cookie"]  # HttpOnly
        assert result["token"] is False  # nor in the login answer
        cookies = page.context.cookies()
        session = [c for c in cookies if c["name"] == "moot_session"]
        assert session and session[0]["httpOnly"] and session[0]["sameSite"] == "Strict"


@contextmanager
def other_origin(html: str) -> Iterator[str]:
    """A page on another origin of the same host (same site, so SameSite does not help:
    only the node's Origin check stands between it and the session cookie)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


ATTACK = """<!doctype html><script>
window.attack = async (node) => {
    const out = {};
    // a "simple" request needs no preflight, so the browser sends it with the cookie
    await fetch(node + '/api/v1/me/settings', {method: 'POST', mode: 'no-cors', credentials: 'include',
        headers: {'Content-Type': 'text/plain'}, body: '{"read_receipts": false}'});
    await fetch(node + '/api/v1/logout', {method: 'POST', mode: 'no-cors', credentials: 'include'});
    out.ws = await new Promise((resolve) => {
        const ws = new WebSocket(node.replace('http', 'ws') + '/api/v1/ws');
        const frames = [];
        ws.onmessage = (e) => frames.push(JSON.parse(e.data));
        ws.onclose = (e) => resolve({code: e.code, frames});
        setTimeout(() => resolve({code: 'still open', frames}), 5000);
    });
    return out;
};
</script>"""


def test_another_origin_cannot_use_the_session_cookie(node):
    with chromium() as browser, other_origin(ATTACK) as evil:
        context = browser.new_context()
        page = context.new_page()
        page.goto(node.base_url + "/", timeout=10_000)
        page.locator("#signup-form input[name=username]").fill("alice")
        page.locator("#signup-form input[name=password]").fill(PASSWORD)
        page.locator("#signup-form button[type=submit]").click()
        page.wait_for_selector("#conn-status[data-state=online]", timeout=10_000)

        attacker = context.new_page()
        attacker.goto(evil + "/", timeout=10_000)
        result = attacker.evaluate("(node) => window.attack(node)", node.base_url)
        # the WebSocket was refused (cross-site WebSocket hijacking) and carried no data
        assert result["ws"]["code"] == 4403
        assert [f["type"] for f in result["ws"]["frames"]] == ["error"]
        assert result["ws"]["frames"][0]["code"] == "forbidden"
        # neither POST had any effect: still signed in, read receipts still on
        me = page.evaluate("async () => { const r = await fetch('/api/v1/me'); return [r.status, await r.json()]; }")
        assert me[0] == 200 and me[1]["settings"]["read_receipts"] is True
        context.close()
