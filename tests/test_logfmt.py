"""agent/daemon/logfmt.py: logfmt and JSON lines, extras, quoting, and no key material."""

from __future__ import annotations

import io
import json
import logging
import os
import socket

import pytest

from agent.daemon import logfmt, sdnotify
from netlink.secret import Secret


@pytest.fixture
def capture():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)

    def setup(fmt: str, level: str = "info") -> io.StringIO:
        buf = io.StringIO()
        logfmt.setup(fmt, level, buf)
        return buf

    yield setup
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def test_logfmt_line(capture) -> None:
    buf = capture("logfmt")
    logging.getLogger("xwamp.agent").info("session up", extra={"peer": "192.0.2.2", "reqid": 7, "up": True,
                                                                "reason": 'said "no" twice'})
    line = buf.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert line.startswith("ts=") and " level=info logger=xwamp.agent msg=\"session up\" " in line
    assert "peer=192.0.2.2 reqid=7 up=true" in line
    assert r'reason="said \"no\" twice"' in line


def test_json_line(capture) -> None:
    buf = capture("json")
    logging.getLogger("xwamp.x").warning("retry %s", "later", extra={"retry_s": 2.5, "nan": float("nan")})
    d = json.loads(buf.getvalue())
    assert d["level"] == "warning" and d["msg"] == "retry later" and d["logger"] == "xwamp.x"
    assert d["retry_s"] == 2.5 and d["nan"] == "nan" and d["ts"].endswith("Z")


def test_level_filters(capture) -> None:
    buf = capture("logfmt", "warning")
    logging.getLogger("a").info("hidden")
    logging.getLogger("a").error("shown")
    assert "hidden" not in buf.getvalue() and "shown" in buf.getvalue()


def test_newlines_stay_on_one_line(capture) -> None:
    buf = capture("logfmt")
    logging.getLogger("a").info("two\nlines", extra={"x": "a b\nc"})
    assert buf.getvalue().count("\n") == 1


def test_exceptions_are_one_record(capture) -> None:
    buf = capture("json")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("a").exception("failed")
    d = json.loads(buf.getvalue())
    assert d["error"] == "ValueError: boom" and "Traceback" in d["traceback"]


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_never_key_material(capture, fmt: str) -> None:
    buf = capture(fmt)
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    logging.getLogger("a").info("keyed", extra={"key": "deadbeefcafe", "secret": Secret(key), "blob": key,
                                               "passphrase": "hunter2", "enc_key": key.hex(), "spi": "0x1001"})
    out = buf.getvalue()
    for leak in ("deadbeefcafe", "hunter2", key.hex(), "\\x00\\x11"):
        assert leak not in out
    assert out.count(logfmt.REDACTED) == 5
    assert "0x1001" in out  # SPIs are identifiers, not secrets


# --- sd_notify -----------------------------------------------------------------


def _listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s


def test_sdnotify_path_socket(tmp_path) -> None:
    path = str(tmp_path / "notify")
    with _listen(path) as s:
        assert sdnotify.notify("READY=1", "STATUS=ok", env={"NOTIFY_SOCKET": path})
        assert s.recv(4096) == b"READY=1\nSTATUS=ok"


def test_sdnotify_abstract_socket() -> None:
    name = f"xwamp-test-{os.getpid()}"
    with _listen("\0" + name) as s:
        assert sdnotify.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096) == b"WATCHDOG=1"


def test_sdnotify_absent_or_dead_is_quiet(tmp_path) -> None:
    assert not sdnotify.notify("READY=1", env={})
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "relative"})


def test_watchdog_interval() -> None:
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # not us
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "x"}) is None
