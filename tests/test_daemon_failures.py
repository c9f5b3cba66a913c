"""The agent never loses a session or its server silently (issue 12): a peer key file broken
at run time, a supervisor loop that dies, the backoff after a peer comes back, and a SIGHUP
that fails validation (the real process: old server keeps answering, reload metric says 0)."""

from __future__ import annotations

import asyncio
import logging
import os
import queue as queue_mod
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import config as cfg
from agent.daemon import supervisor as dm

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, msg: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == msg]


@pytest.fixture
def agent_log():
    h = Records()
    lg = logging.getLogger("xwamp.agent")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    try:
        yield h
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)


async def until(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


class NoSAs:
    async def dump(self) -> list:
        return []

    async def events(self):
        await asyncio.Event().wait()
        yield  # pragma: no cover


def test_broken_peer_keyfile_is_logged_counted_and_recovers(tmp_path: Path, monkeypatch, agent_log) -> None:
    """The peer's key file is broken after the configuration was checked: each attempt logs
    why and counts a restart (before: _supervise died before its try, silently, for good);
    once the file is fixed the session measures."""
    monkeypatch.setattr(dm, "BACKOFF_MIN", 0.05)
    monkeypatch.setattr(dm, "BACKOFF_MAX", 0.2)
    tw, ow = _free_port(), _free_port()
    srv_keys = _secret(tmp_path / "server.keys", "alice shared secret\n")
    peer_keys = _secret(tmp_path / "peer.keys", "alice shared secret\n")
    path = tmp_path / "x.toml"
    path.write_text(f"""
[server]
listen = ["127.0.0.1"]
twamp_port = {tw}
owamp_port = {ow}
modes = ["unauth", "auth"]
keyfile = "{srv_keys}"
[exporter]
enabled = false
[[peers]]
name = "self"
address = "127.0.0.1"
port = {tw}
mode = "auth"
user = "alice"
keyfile = "{peer_keys}"
interval = 0.01
count = 5
timeout = 0.5
""")
    conf = cfg.load(path)  # checked while the file was good ...
    _secret(peer_keys, "alice\n")  # ... then an operator broke it

    async def main() -> tuple[int, int, Any]:
        d = dm.Daemon(conf, str(path), sa_source=NoSAs(), notify=lambda *a: True, exporter=False)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 30)
        m = d.metrics.sessions["peer:self"]
        await until(lambda: m.restarts >= 2)
        restarts, cycles_while_broken = m.restarts, m.cycles
        _secret(peer_keys, "alice shared secret\n")
        await until(lambda: m.cycles >= 1)
        d.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
        return restarts, cycles_while_broken, m

    restarts, cycles_while_broken, m = asyncio.run(main())
    assert restarts >= 2 and cycles_while_broken == 0
    ended = agent_log.named("session ended, restarting")
    assert ended and all(r.session == "peer:self" for r in ended)
    assert "peer.keys:1: expected 'identity passphrase'" in ended[0].reason
    assert "shared secret" not in " ".join(r.reason for r in ended)
    assert m.received >= 5  # recovered: it measured once the file was fixed


class _Runner:
    def __init__(self, metrics: Any, behaviour: str) -> None:
        self.metrics, self.behaviour = metrics, behaviour
        self.done = asyncio.Event()

    async def start(self) -> None:
        if self.behaviour == "refused":
            raise ConnectionRefusedError("peer down")
        self.metrics.up = True
        if self.behaviour == "one-cycle-then-fail":
            self.metrics.cycles += 1  # a cycle completed: the peer is back

    async def wait(self) -> None:
        if self.behaviour == "one-cycle-then-fail":
            raise ConnectionResetError("peer killed again")
        await self.done.wait()

    async def stop(self) -> None:
        self.done.set()

    def snapshot(self) -> dict[str, Any]:
        return {}


class _Bug(BaseException):
    """Escapes _supervise's `except Exception`: stands for any bug that ends the loop."""


BASE = """
[server]
enabled = false
[exporter]
enabled = false
[[peers]]
name = "a"
address = "192.0.2.10"
"""


def test_supervisor_loop_that_dies_is_logged_counted_and_restarted(tmp_path: Path, monkeypatch, agent_log) -> None:
    monkeypatch.setattr(dm, "BACKOFF_MIN", 0.01)
    monkeypatch.setattr(dm, "BACKOFF_MAX", 0.05)
    path = tmp_path / "x.toml"
    path.write_text(BASE)
    made: list[_Runner] = []

    def factory(spec, metrics):
        if not made:
            made.append(None)  # type: ignore[arg-type]
            raise _Bug("a bug in the supervisor")
        r = _Runner(metrics, "ok")
        made.append(r)
        return r

    async def main() -> tuple[Any, dict]:
        d = dm.Daemon(cfg.load(path), str(path), runner_factory=factory, sa_source=NoSAs(),
                      notify=lambda *a: True, exporter=False)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 30)
        m = d.metrics.sessions["peer:a"]
        await until(lambda: m.up)
        snap = d.metrics.snapshot()
        d.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
        return m, snap.task_failures

    m, failures = asyncio.run(main())
    assert failures == {"session": 1} and m.restarts == 1
    rec = agent_log.named("session supervisor ended unexpectedly, restarting it")
    assert len(rec) == 1 and rec[0].session == "peer:a" and "a bug in the supervisor" in rec[0].error


def test_backoff_resets_once_the_peer_answered(tmp_path: Path, monkeypatch, agent_log) -> None:
    """Down for a while (backoff grows to its cap), back for one cycle, killed again: the next
    retry comes after the minimum backoff, not after the grown one (before: only after 240 s up)."""
    monkeypatch.setattr(dm, "BACKOFF_MIN", 0.1)
    monkeypatch.setattr(dm, "BACKOFF_MAX", 0.8)
    monkeypatch.setattr(dm.random, "random", lambda: 0.5)  # no jitter: delay == backoff
    path = tmp_path / "x.toml"
    path.write_text(BASE)
    plan = ["refused"] * 5 + ["one-cycle-then-fail", "refused", "ok"]
    real_sleep = asyncio.sleep

    async def sleep(t: float, *a):  # the retry delays are read from the log, not waited for
        await real_sleep(0)

    def factory(spec, metrics):
        return _Runner(metrics, plan.pop(0) if plan else "ok")

    async def main() -> None:
        monkeypatch.setattr(dm.asyncio, "sleep", sleep)
        d = dm.Daemon(cfg.load(path), str(path), runner_factory=factory, sa_source=NoSAs(),
                      notify=lambda *a: True, exporter=False)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 30)
        m = d.metrics.sessions["peer:a"]
        while not (m.up and not plan):
            await real_sleep(0.01)
        monkeypatch.setattr(dm.asyncio, "sleep", real_sleep)
        d.request_stop()
        assert await asyncio.wait_for(task, 30) == 0

    asyncio.run(main())
    delays = [r.retry_s for r in agent_log.named("session ended, restarting")]
    # five refusals: 0.1, 0.2, 0.4, 0.8, 0.8 (the cap); then a cycle and a failure: back to 0.1
    assert delays[:7] == [0.1, 0.2, 0.4, 0.8, 0.8, 0.1, 0.2], delays


# --------------------------------------------------------------------------- SIGHUP, the real process


def _greeting(port: int) -> int:
    """The Modes word of the Server-Greeting at 127.0.0.1:port (RFC 4656 §3.1: Unused(12) Modes(4) ...)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        buf = b""
        while len(buf) < 64:
            chunk = s.recv(64 - len(buf))
            assert chunk, "server closed without a greeting"
            buf += chunk
    return struct.unpack_from("!I", buf, 12)[0]


def _metric(port: int, name: str) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
    return float(m.group(1)) if m else None


def test_sighup_with_broken_server_keyfile_keeps_the_server(tmp_path: Path) -> None:
    tw, ow = _free_port(), _free_port()
    good = _secret(tmp_path / "good.keys", "alice shared secret\n")
    bad = _secret(tmp_path / "bad.keys", "alice\n")  # a malformed line
    path = tmp_path / "x.toml"
    text = f"""
[agent]
log_format = "logfmt"
[server]
listen = ["127.0.0.1"]
twamp_port = {tw}
owamp_port = {ow}
modes = ["unauth", "auth"]
keyfile = "%s"
[exporter]
port = 0
"""
    path.write_text(text % good)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    p = subprocess.Popen([sys.executable, "-m", "agent", "agent", "--config", str(path), "--log-format", "json"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    queue: "queue_mod.Queue[str]" = queue_mod.Queue()
    reader = threading.Thread(target=lambda: [queue.put(x) for x in p.stderr], daemon=True)
    reader.start()  # readline in a thread: a silent agent fails the test instead of hanging it

    def wait_for(msg: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                line = queue.get(timeout=1)
            except queue_mod.Empty:
                continue
            lines.append(line)
            if re.search(rf'"msg":\s*"{re.escape(msg)}"', line):
                return line
        raise AssertionError(f"no {msg!r} in:\n" + "".join(lines))

    try:
        ready = wait_for("agent ready")
        port = int(re.search(r'"exporter":\s*"127\.0\.0\.1:(\d+)"', ready).group(1))
        assert _greeting(tw) & 3 == 3  # unauth + auth
        # 1) the config now names a malformed key file; 2) the key file itself is broken in place
        for i, breakage in enumerate(("other file", "same file")):
            if breakage == "other file":
                path.write_text(text % bad)
            else:
                path.write_text(text % good)
                _secret(good, "alice\n")
            p.send_signal(signal.SIGHUP)
            failed = wait_for("reload failed, keeping the running configuration")
            assert "server.keyfile" in failed and "expected 'identity passphrase'" in failed
            assert "shared secret" not in failed
            assert _metric(port, "xwamp_config_last_reload_successful") == 0
            assert _metric(port, 'xwamp_config_reloads_total{result="failure"}') == i + 1
            assert _greeting(tw) & 3 == 3  # the old server, still answering, still offering auth
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    reader.join(timeout=30)  # stderr reached EOF: every line is queued
    while not queue.empty():
        lines.append(queue.get())
    assert p.returncode == 0, "".join(lines)
    out = "".join(lines)
    assert "Traceback" not in out
    failed = [x for x in out.splitlines() if "reload failed" in x]
    assert len(failed) == 2  # one line per refused reload
