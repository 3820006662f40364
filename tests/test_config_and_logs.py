"""Configuration precedence (file < MOOT_* < flags) and the two log line formats."""

from __future__ import annotations

import io
import json
import logging

import pytest

from node.config import ConfigError, load_config, write_sample_config
from node.logs import configure_logging, get_logger


def test_file_then_environment_then_flags(tmp_path):
    write_sample_config(tmp_path / "moot.toml", "riverside")
    config = load_config(tmp_path, environ={})
    assert (config.node_name, config.web_port, config.registration) == ("riverside", 8470, "open")
    config = load_config(tmp_path, environ={"MOOT_WEB_PORT": "9001", "MOOT_REGISTRATION": "invite"})
    assert (config.web_port, config.registration) == (9001, "invite")
    config = load_config(
        tmp_path, overrides={"web_port": 9002, "registration": None}, environ={"MOOT_WEB_PORT": "9001", "MOOT_REGISTRATION": "invite"}
    )
    assert (config.web_port, config.registration) == (9002, "invite")  # an unset flag does not override
    assert config.db_url == f"sqlite:///{tmp_path.resolve() / 'moot.db'}"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('web_prot = 1\n', "unknown option"),
        ('registration = "everyone"\n', "registration must be one of"),
        ('web_port = "eighty"\n', "must be an integer"),
        ("web_port = [\n", "moot.toml"),
        ('node_name = "Not A Name"\n', "node_name"),
        ('federation_bootstrap = ["/ip4/192.0.2.7/tcp/8471"]\n', "federation_bootstrap"),
        ("federation_dht_refresh_s = 0\n", "federation_dht_refresh_s"),
    ],
)
def test_bad_configuration_names_the_option(tmp_path, toml, message):
    (tmp_path / "moot.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path, environ={})


def test_no_dht_bootstrap_peer_unless_configured(tmp_path):
    assert load_config(tmp_path, environ={}).federation_bootstrap == ()
    peers = "/ip4/192.0.2.7/tcp/8471/p2p/12D3KooWa,/ip4/192.0.2.8/tcp/8471/p2p/12D3KooWb"
    config = load_config(tmp_path, environ={"MOOT_FEDERATION_BOOTSTRAP": peers})
    assert config.federation_bootstrap == tuple(peers.split(","))


@pytest.fixture(autouse=True)
def _restore_logging():
    """configure_logging rewires the root logger: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _capture(fmt: str) -> tuple[io.StringIO, logging.Logger]:
    out = io.StringIO()
    configure_logging(fmt, "debug", stream=out)
    return out, logging.getLogger()


def test_text_logs_are_one_key_value_line_per_event():
    out, _ = _capture("text")
    get_logger("moot.test").info("user.login", user="alice", client="127.0.0.1", note="two words")
    line = out.getvalue().strip()
    assert "\n" not in line
    assert " info moot.test user.login " in line
    assert "user=alice" in line and "client=127.0.0.1" in line and 'note="two words"' in line


def test_json_logs_parse_and_library_debug_is_held_back():
    out, _ = _capture("json")
    get_logger("moot.test").warning("login.rate_limited", user="alice", retry_after=3.5)
    logging.getLogger("websockets.server").debug("< authorization: Bearer secret-token")
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["level"] == "warning" and event["event"] == "login.rate_limited"
    assert event["user"] == "alice" and event["retry_after"] == 3.5 and event["ts"].endswith("Z")


def test_an_exception_is_logged_on_one_line_with_where_it_was_raised():
    out, _ = _capture("text")

    def deep() -> None:
        raise ValueError("no such thing")

    try:
        deep()
    except ValueError:
        get_logger("moot.test").exception("thing.failed", node="hilltop")
    line = out.getvalue().strip()
    assert "\n" not in line
    assert 'exc="ValueError: no such thing"' in line
    assert "at=test_config_and_logs.py:" in line and ":deep" in line


def test_an_exception_group_is_logged_as_the_error_inside_it():
    out, _ = _capture("text")

    def inner() -> None:
        raise KeyError("lost")

    try:
        try:
            inner()
        except KeyError as exc:
            raise BaseExceptionGroup("nursery", [BaseExceptionGroup("nested", [exc])]) from None
    except BaseExceptionGroup:
        get_logger("moot.test").exception("task.failed")
    line = out.getvalue().strip()
    assert "\n" not in line and "exc=\"KeyError: 'lost'\"" in line and ":inner" in line
