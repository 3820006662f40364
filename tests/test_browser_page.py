"""The page in a real Chromium: served by the node, locked down by its CSP, no token in reach of script."""

from __future__ import annotations

import pytest

from tests.browser import chromium
from tests.nodes import PASSWORD, NodeProcess, free_port


@pytest.fixture
def node(tmp_path):
    proc = NodeProcess(tmp_path / "node", free_port())
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


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
