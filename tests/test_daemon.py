"""agent/daemon/supervisor.py: the supervisor with fake runners and a fake SA source (SIGHUP diff,
SIGTERM, restarts, discovery from SA events, rekeys, sd_notify), then the real planes on
loopback, then the real CLI process."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import config as cfg
from agent.daemon import cycles, discovery
from agent.daemon import supervisor as dm
from agent.sessions.metrics import SessionMetrics
from netlink.events import EventKind, XfrmEvent
from netlink.fake import make_sa

REPO = Path(__file__).resolve().parent.parent
LOCAL = ipaddress.ip_address("192.0.2.1")


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(dm, "BACKOFF_MIN", 0.01)
    monkeypatch.setattr(dm, "BACKOFF_MAX", 0.05)
    monkeypatch.setattr(dm, "DISCOVERY_DEBOUNCE", 0.01)


class FakeRunner:
    def __init__(self, spec: discovery.SessionSpec, metrics: SessionMetrics, log: list, fail: set) -> None:
        self.spec, self.metrics, self.log, self.fail = spec, metrics, log, fail
        self.ended = asyncio.Event()
        self.stopped = False

    async def start(self) -> None:
        self.log.append(("start", self.spec.key))
        if self.spec.key in self.fail:
            raise ConnectionRefusedError("peer said no")
        self.metrics.up = True
        self.metrics.on_sent(3)

    async def wait(self) -> None:
        await self.ended.wait()

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.log.append(("stop", self.spec.key))  # a real runner sends Stop-Sessions here
            self.ended.set()

    def snapshot(self) -> dict[str, Any]:
        return {"key": self.spec.key}


class FakeSAs:
    def __init__(self, sas: list) -> None:
        self.sas = list(sas)
        self.queue: asyncio.Queue = asyncio.Queue()

    async def dump(self) -> list:
        return list(self.sas)

    async def events(self):
        while True:
            yield await self.queue.get()


class Harness:
    def __init__(self, tmp_path: Path, text: str, sas: list | None = None) -> None:
        self.path = tmp_path / "xwamp.toml"
        self.path.write_text(text)
        self.log: list = []
        self.fail: set = set()
        self.runners: list[FakeRunner] = []
        self.notes: list[str] = []
        self.sas = FakeSAs(sas or [])

    def factory(self, spec: discovery.SessionSpec, metrics: SessionMetrics) -> FakeRunner:
        r = FakeRunner(spec, metrics, self.log, self.fail)
        self.runners.append(r)
        return r

    def notify(self, *lines: str) -> bool:
        self.notes.extend(lines)
        return True

    def daemon(self) -> dm.Daemon:
        return dm.Daemon(cfg.load(self.path), str(self.path), runner_factory=self.factory, sa_source=self.sas,
                         is_local=lambda a: a == LOCAL, notify=self.notify)

    def live(self, key: str) -> list[FakeRunner]:
        return [r for r in self.runners if r.spec.key == key and not r.stopped]


BASE = """
[server]
enabled = false
[exporter]
enabled = false
"""

PEERS = BASE + """
[[peers]]
name = "a"
address = "192.0.2.10"
[[peers]]
name = "b"
address = "192.0.2.11"
interval = 1.0
"""


async def until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def test_sighup_diffs_sessions_and_sigterm_stops_them(tmp_path: Path) -> None:
    h = Harness(tmp_path, PEERS)

    async def main() -> int:
        d = h.daemon()
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        assert sorted(d.slots) == ["peer:a", "peer:b"]
        await until(lambda: len(h.runners) == 2)
        a = h.live("peer:a")[0]
        # b changes, c appears, a is untouched
        h.path.write_text(PEERS.replace("interval = 1.0", "interval = 0.5") + '[[peers]]\nname = "c"\naddress = "192.0.2.12"\n')
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: d.metrics.reloads["success"] == 1)
        await until(lambda: len(h.live("peer:b")) == 1 and len(h.live("peer:c")) == 1)
        assert h.live("peer:a") == [a] and ("stop", "peer:a") not in h.log
        assert ("stop", "peer:b") in h.log and h.live("peer:b")[0].spec.session.interval == 0.5
        # a broken file: the running configuration stays, the failure is counted
        h.path.write_text("[[peers]]\naddress = 'nope'\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: d.metrics.reloads["failure"] == 1)
        assert sorted(d.slots) == ["peer:a", "peer:b", "peer:c"] and not d.metrics.last_reload_ok
        # removing a peer stops it
        h.path.write_text(PEERS)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: d.metrics.reloads["success"] == 2)
        assert sorted(d.slots) == ["peer:a", "peer:b"] and "peer:c" not in d.metrics.sessions
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(task, 10)

    assert asyncio.run(main()) == 0
    assert all(r.stopped for r in h.runners)  # every session got its stop (Stop-Sessions)
    assert h.notes[0] == "READY=1" and "STOPPING=1" in h.notes
    assert h.notes.index("STOPPING=1") > h.notes.index("READY=1")


def test_failed_runner_is_restarted_with_backoff(tmp_path: Path) -> None:
    h = Harness(tmp_path, PEERS)
    h.fail.add("peer:b")

    async def main() -> None:
        d = h.daemon()
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        await until(lambda: d.metrics.sessions["peer:b"].restarts >= 2)
        assert not d.metrics.sessions["peer:b"].up and d.metrics.sessions["peer:a"].up
        h.fail.clear()
        await until(lambda: d.metrics.sessions["peer:b"].up)
        # a runner that ends by itself is restarted too
        first = h.live("peer:a")[0]
        first.ended.set()
        await until(lambda: any(r is not first for r in h.live("peer:a")))
        d.request_stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


def _pair(spi_out: int, spi_in: int, reqid: int = 7, remote: str = "192.0.2.2", add_time: int = 1_700_000_000,
          bytes_: int = 0):
    o = make_sa(str(LOCAL), remote, spi=spi_out, reqid=reqid, add_time=add_time, bytes_=bytes_)
    i = make_sa(remote, str(LOCAL), spi=spi_in, reqid=reqid, add_time=add_time, bytes_=2 * bytes_)
    return o, i


DISCOVERY = BASE + """
[discovery]
enabled = true
exclude = ["192.0.2.99/32"]
"""


def test_discovery_follows_sa_events_and_survives_rekeys(tmp_path: Path) -> None:
    o, i = _pair(0x1001, 0x2001, bytes_=100)
    xo, xi = _pair(0x3001, 0x4001, reqid=9, remote="192.0.2.99")  # excluded by filter
    # SAs between two other hosts (neither end local): not ours to measure
    fo = make_sa("198.51.100.1", "198.51.100.2", spi=0x5001, reqid=3)
    fi = make_sa("198.51.100.2", "198.51.100.1", spi=0x5002, reqid=3)
    h = Harness(tmp_path, DISCOVERY, [o, i, xo, xi, fo, fi])

    async def main() -> None:
        d = h.daemon()
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        await until(lambda: list(d.slots) == ["sa:192.0.2.2/7"])
        key = "sa:192.0.2.2/7"
        spec = d.slots[key].spec
        assert spec.local == LOCAL and spec.tunnel.reqid == "7" and spec.origin == "discovered"
        assert spec.session.modes == ("unauth+ipsec-bound",)
        await until(lambda: d.metrics.sessions[key].sa_bound)
        runner = h.live(key)[0]
        # rekey: new pair installed, old one deleted; the session keeps running
        no, ni = _pair(0x1002, 0x2002, add_time=1_700_003_600, bytes_=10)
        for sa in (no, ni):
            h.sas.queue.put_nowait(XfrmEvent(EventKind.NEW_SA, sa=sa))
        for sa in (o, i):
            h.sas.queue.put_nowait(XfrmEvent(EventKind.DEL_SA, sa_id=sa.key_id))
        await until(lambda: o not in d.table and no in d.table and i not in d.table)
        await until(lambda: d.metrics.tunnels[key].rekeys == 1)
        assert h.live(key) == [runner]
        snap = d.snapshot()
        t = next(t for t in snap.tunnels if t.tunnel.name == "192.0.2.2/7")
        assert t.totals["out"][0] == 100 + 10 and t.totals["in"][0] == 200 + 20  # summed across the rekey
        # tunnel torn down: session stops
        for sa in (no, ni):
            h.sas.queue.put_nowait(XfrmEvent(EventKind.DEL_SA, sa_id=sa.key_id))
        await until(lambda: not d.slots)
        assert runner.stopped and "sa:192.0.2.2/7" not in d.metrics.sessions
        # and comes back
        for sa in _pair(0x1003, 0x2003):
            h.sas.queue.put_nowait(XfrmEvent(EventKind.NEW_SA, sa=sa))
        await until(lambda: list(d.slots) == [key])
        d.request_stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_discovery_filters() -> None:
    from netlink.table import SATable

    a = _pair(0x11, 0x12, reqid=1, remote="192.0.2.2")
    b = _pair(0x21, 0x22, reqid=2, remote="203.0.113.5")
    table = SATable.from_sas([*a, *b])
    is_local = lambda x: x == LOCAL  # noqa: E731

    def keys(**kw: Any) -> list[str]:
        d = cfg.parse({"discovery": {"enabled": True, **kw}}).discovery
        return [s.key for s in discovery.discover(table, d, is_local)]

    assert keys() == ["sa:192.0.2.2/1", "sa:203.0.113.5/2"]
    assert keys(reqids=[2]) == ["sa:203.0.113.5/2"]
    assert keys(addresses=["192.0.2.0/24"]) == ["sa:192.0.2.2/1"]
    assert keys(exclude=["203.0.113.0/24"]) == ["sa:192.0.2.2/1"]
    assert keys(selectors=["10.0.0.0/8"]) == ["sa:192.0.2.2/1", "sa:203.0.113.5/2"]  # 0/0 selectors overlap all
    assert discovery.discover(table, cfg.parse({}).discovery, is_local) == []  # disabled by default


def test_configured_peer_is_not_discovered_twice(tmp_path: Path) -> None:
    h = Harness(tmp_path, DISCOVERY + '[[peers]]\nname = "p"\naddress = "192.0.2.2"\n', list(_pair(0x1001, 0x2001)))

    async def main() -> None:
        d = h.daemon()
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        await asyncio.sleep(0.1)
        assert list(d.slots) == ["peer:p"]
        assert d.metrics.sessions["peer:p"].sa_bound  # the configured peer's tunnel SAs are tracked
        d.request_stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_watchdog_pings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # ping every 10 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    h = Harness(tmp_path, BASE)

    async def main() -> None:
        d = h.daemon()
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        await until(lambda: h.notes.count("WATCHDOG=1") >= 3)
        d.request_stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())


# --- the real control and test planes, on loopback ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_twamp_session_on_loopback(tmp_path: Path) -> None:
    tw, ow = _free_port(), _free_port()
    text = f"""
[server]
listen = ["127.0.0.1"]
twamp_port = {tw}
owamp_port = {ow}
[exporter]
port = 0
[[peers]]
name = "self"
address = "127.0.0.1"
port = {tw}
interval = 0.01
count = 10
timeout = 0.3
"""
    path = tmp_path / "x.toml"
    path.write_text(text)
    notes: list[str] = []

    async def main() -> tuple[Any, Any]:
        d = dm.Daemon(cfg.load(path), str(path), sa_source=FakeSAs([]), notify=lambda *l: notes.extend(l) or True)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 20)
        m = d.metrics.sessions["peer:self"]
        await until(lambda: m.cycles >= 2, 20)
        runner = d.slots["peer:self"].runner
        from exporters.prometheus import render

        body = render(d.snapshot())[0].decode()
        d.request_stop()
        assert await asyncio.wait_for(task, 20) == 0
        return m, (runner, body)

    m, (runner, body) = asyncio.run(main())
    assert m.sent >= 20 and m.received == m.sent and m.rtt.snapshot().count == m.received
    assert m.lost_forward == m.lost_reverse == m.lost_unknown == 0
    assert isinstance(runner, cycles.CycleRunner) and runner.stop_sent  # Stop-Sessions went out
    assert 'xwamp_packets_sent_total{name="self"' in body


# --- the real process --------------------------------------------------------------


def test_cli_process_reload_and_sigterm(tmp_path: Path) -> None:
    """The real process measuring itself on loopback: SIGHUP adding a peer leaves the
    running session alone (same session, counters go on); SIGTERM exits 0."""
    tw, ow = _free_port(), _free_port()
    path = tmp_path / "x.toml"
    own = f"""
[server]
listen = ["127.0.0.1"]
twamp_port = {tw}
owamp_port = {ow}
[exporter]
port = 0
[agent]
log_format = 'logfmt'
[[peers]]
name = "self"
address = "127.0.0.1"
port = {tw}
interval = 0.01
count = 10
timeout = 0.3
"""
    path.write_text(own)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    p = subprocess.Popen([sys.executable, "-m", "agent", "agent", "--config", str(path), "--log-format", "json"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    try:
        port = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line:
                break
            lines.append(line)
            if '"agent ready"' in line:
                port = int(re.search(r'"exporter":"127\.0\.0\.1:(\d+)"', line).group(1))
                break
        assert port, "".join(lines)
        import json
        import urllib.request

        def sent() -> float:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert "xwamp_build_info" in body
            m = re.search(r'^xwamp_packets_sent_total\{name="self"[^}]*\} (\S+)$', body, re.M)
            return float(m.group(1)) if m else 0.0

        while sent() < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        before = sent()
        assert before >= 20
        # an unrelated change: a second peer (nobody listens there; it just retries)
        path.write_text(own + f'[[peers]]\nname = "other"\naddress = "127.0.0.1"\nport = {_free_port()}\n')
        p.send_signal(signal.SIGHUP)
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            lines.append(line)
            if "configuration reloaded" in line:
                break
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'xwamp_config_reloads_total{result="success"} 1.0' in body
        assert sent() >= before  # the same session's counters, carried on
        while sent() < before + 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sent() >= before + 20  # ... and it kept measuring
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        lines.append(err)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, "".join(lines)
    bad = [x for x in "".join(lines).splitlines() if x.strip() and not x.startswith("{")]
    assert not bad, bad
    records = [json.loads(x) for x in "".join(lines).splitlines() if x.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert records[-1]["msg"] == "agent stopped"
    added = [r for r in records if r["msg"] == "session added"]
    assert [r["session"] for r in added] == ["peer:self", "peer:other"]  # self was never restarted
    stop = next(i for i, r in enumerate(records) if r["msg"] == "stop requested")
    assert not [r for r in records[:stop] if r["msg"] in ("session removed", "session ended, restarting")
                and r.get("session") == "peer:self"]
    assert all(r["level"] != "error" for r in records), [r for r in records if r["level"] == "error"]


def test_unreadable_sa_database_does_not_stop_the_agent(tmp_path: Path) -> None:
    from netlink.errors import XfrmDecodeError

    h = Harness(tmp_path, PEERS)

    class Broken(FakeSAs):
        def __init__(self, exc: Exception) -> None:
            super().__init__([])
            self.exc = exc

        async def dump(self) -> list:
            raise self.exc

    for exc in (PermissionError(1, "Operation not permitted"), XfrmDecodeError("bad attribute")):
        h.sas = Broken(exc)

        async def main() -> None:
            d = h.daemon()
            task = asyncio.ensure_future(d.run())
            await asyncio.wait_for(d.ready.wait(), 10)
            assert sorted(d.slots) == ["peer:a", "peer:b"] and len(d.table) == 0
            d.request_stop()
            assert await asyncio.wait_for(task, 10) == 0

        asyncio.run(main())


# --- tunnel-mode binding, rekeys and signals on the real planes (loopback) ---------------


def _tunnel_sa_pair(spi_ab: int, spi_ba: int, add_time: int = 1_700_000_000) -> tuple:
    """A CHILD_SA between outer addresses 192.0.2.1 (A) <-> 192.0.2.2 (B), reqid 7."""
    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    ab = make_sa(a, b, spi=spi_ab, reqid=7, add_time=add_time, enc_key=os.urandom(16), auth_key=os.urandom(32))
    ba = make_sa(b, a, spi=spi_ba, reqid=7, add_time=add_time, enc_key=os.urandom(16), auth_key=os.urandom(32))
    return ab, ba


def _out_policy(src: str, dst: str, tsrc: str, tdst: str) -> Any:
    from netlink.records import Direction, Mode, Policy, PolicyTemplate, Proto, Selector

    ip = ipaddress.ip_address
    return Policy(Selector(2, ip(src), ip(dst), 32, 32), Direction.OUT, 0, 0, 0,
                  (PolicyTemplate(2, ip(tsrc), ip(tdst), 0, Proto.ESP, Mode.TUNNEL, 7),))


class FakeXfrm(FakeSAs):
    """SAs plus policies: both ends of a tunnel as one table sees them. The client
    (127.0.0.1) sits behind A, the server (127.0.0.2) behind B; the control connection
    runs between these inner addresses, the SAs between the outer ones."""

    def __init__(self, sas: list) -> None:
        super().__init__(sas)
        self.policies = [_out_policy("127.0.0.1", "127.0.0.2", "192.0.2.1", "192.0.2.2"),
                         _out_policy("127.0.0.2", "127.0.0.1", "192.0.2.2", "192.0.2.1")]

    async def dump_policies(self) -> list:
        return list(self.policies)


def test_discovery_measures_tunnel_mode_sas_between_inner_addresses() -> None:
    ab, _ = _tunnel_sa_pair(0x100, 0x200)
    from agent.sessions.bound import PolicyMap
    from netlink.table import SATable

    t = SATable()
    t.replace_all(list(_tunnel_sa_pair(0x100, 0x200)))
    pm = PolicyMap([_out_policy("10.77.1.1", "10.77.2.1", "192.0.2.1", "192.0.2.2")])
    mine = {ipaddress.ip_address(a) for a in ("192.0.2.1", "10.77.1.1")}
    d = cfg.DiscoverySection(enabled=True)
    (spec,) = discovery.discover(t, d, lambda a: a in mine, pm)
    assert (str(spec.local), str(spec.address)) == ("10.77.1.1", "10.77.2.1")
    assert spec.key == "sa:192.0.2.2/7" and spec.tunnel.reqid == "7"
    (plain,) = discovery.discover(t, d, lambda a: a in mine)  # no policy: the outer addresses, as before
    assert str(plain.address) == "192.0.2.2"


def test_bound_session_rebinds_on_rekey_stops_on_delete_and_survives_signals(tmp_path: Path, monkeypatch) -> None:
    """One daemon serves and measures itself across a (fake) tunnel on loopback, in
    auth+ipsec-bound (the server's default modes): bound to the tunnel-mode pair through the policies; a
    make-before-break rekey rebinds it; deleting the pair stops it (sa_deleted), after
    which it falls back to unauth with no no_sa refusal counted for the greetings. Then
    a real SIGHUP leaves it running and a real SIGTERM sends Stop-Sessions and returns 0."""
    monkeypatch.setattr(dm, "SA_GRACE", 0.3)
    tw, ow = _free_port(), _free_port()
    peer = f"""
[[peers]]
name = "t"
address = "127.0.0.2"
source = "127.0.0.1"
port = {tw}
interval = 0.01
count = 30
timeout = 0.3
mode = ["auth+ipsec-bound", "unauth"]
"""
    text = f"""
[server]
listen = ["127.0.0.2"]
twamp_port = {tw}
owamp_port = {ow}
[exporter]
enabled = false
""" + peer
    path = tmp_path / "x.toml"
    path.write_text(text)
    ab, ba = _tunnel_sa_pair(0xA0B00001, 0xB0A00001)
    src = FakeXfrm([ab, ba])
    out: dict[str, Any] = {}

    async def main() -> None:
        d = dm.Daemon(cfg.load(path), str(path), sa_source=src, notify=lambda *l: True)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 20)
        key = "peer:t"
        m = d.metrics.sessions[key]
        assert m.tunnel.reqid == "7"  # labelled with the tunnel the policy names
        await until(lambda: m.sa_keyed and m.cycles >= 1, 20)
        r = d.slots[key].runner
        assert (r.binding.c2s.spi, r.binding.s2c.spi) == (0xA0B00001, 0xB0A00001)
        await until(lambda: m.sa_bound)  # the SA fold found the outer pair through the policy
        # make-before-break rekey
        nab, nba = _tunnel_sa_pair(0xA0B00002, 0xB0A00002, add_time=1_700_000_100)
        for sa in (nab, nba):
            src.queue.put_nowait(XfrmEvent(EventKind.NEW_SA, sa=sa))
        for sa in (ab, ba):
            src.queue.put_nowait(XfrmEvent(EventKind.DEL_SA, sa=sa, sa_id=sa.key_id))
        await until(lambda: m.rebinds == 1 and r.binding is not None and r.binding.c2s.spi == 0xA0B00002, 20)
        sent = m.sent
        await until(lambda: m.sent > sent + 10)
        assert d.slots[key].runner is r and m.restarts == 0  # rebound in place, not restarted
        # the pair dies with no successor: stopped with a reason, then unauth without the SA
        for sa in (nab, nba):
            src.queue.put_nowait(XfrmEvent(EventKind.DEL_SA, sa=sa, sa_id=sa.key_id))
        await until(lambda: m.stop_sa_deleted == 1, 20)
        await until(lambda: m.up and not m.sa_keyed and d.slots[key].runner is not r, 20)
        assert not d.binder.refusals, d.binder.refusals  # greetings with no SA are no refusals
        from exporters.prometheus import render

        out["body"] = render(d.snapshot())[0].decode()
        # SIGHUP with an unrelated change: the session keeps its runner
        r2 = d.slots[key].runner
        path.write_text(text.replace('[exporter]\nenabled = false', '[exporter]\nenabled = false\n[agent]\n'
                                     'log_level = "debug"'))
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: d.metrics.reloads["success"] == 1)
        assert d.slots[key].runner is r2
        cycles = m.cycles
        await until(lambda: m.cycles > cycles)
        servers = d.server
        os.kill(os.getpid(), signal.SIGTERM)
        out["rc"] = await asyncio.wait_for(task, 20)
        out["stop_sent"] = r2.stop_sent
        out["server_stops"] = [c.client_stop for c in servers.connections]
        out["ends"] = [c.end for c in servers.connections]

    asyncio.run(main())
    assert out["rc"] == 0 and out["stop_sent"], out
    # per control connection the server saw: rebind (the client's Stop-Sessions, Accept=0);
    # SA deleted (the server aborts it: its own Stop-Sessions, Accept=2, and close); then the
    # unauth one, closed by SIGTERM after the client's Stop-Sessions
    assert out["ends"] == ["rebind", "sa_deleted", "closed"], out["ends"]
    assert out["server_stops"][0] == 0 and out["server_stops"][2] == 0, out["server_stops"]
    body = out["body"]
    assert re.search(r'xwamp_session_rebinds_total\{name="t",peer="127.0.0.2",reqid="7",protocol="twamp"\} 1.0', body)
    assert 'reason="sa_deleted"} 1.0' in body


def test_binder_refusing_the_greeting_is_counted_as_a_stop(tmp_path: Path) -> None:
    """The client's policy names another tunnel than the SA pair the server announces:
    its binder refuses the greeting (no_sa), the session is not measured and says why."""
    tw, ow = _free_port(), _free_port()
    path = tmp_path / "x.toml"
    path.write_text(f"""
[server]
listen = ["127.0.0.2"]
twamp_port = {tw}
owamp_port = {ow}
[exporter]
enabled = false
[[peers]]
name = "t"
address = "127.0.0.2"
source = "127.0.0.1"
port = {tw}
mode = ["auth+ipsec-bound"]
""")
    src = FakeXfrm(list(_tunnel_sa_pair(0xA0B00001, 0xB0A00001)))
    src.policies[0] = _out_policy("127.0.0.1", "127.0.0.2", "192.0.2.1", "192.0.2.3")

    async def main() -> tuple[int, dict]:
        d = dm.Daemon(cfg.load(path), str(path), sa_source=src, notify=lambda *l: True)
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 20)
        m = d.metrics.sessions["peer:t"]
        await until(lambda: m.stop_binder_refused >= 1, 20)
        assert m.sent == 0 and not m.sa_keyed
        d.request_stop()
        assert await asyncio.wait_for(task, 20) == 0
        return m.stop_binder_refused, dict(d.binder.refusals)

    n, refusals = asyncio.run(main())
    assert n >= 1 and refusals.get("no_sa", 0) >= 1 and set(refusals) == {"no_sa"}


# --- router scale: the steady state costs what is measured, not the SA table (issue 17) ---


class CountingSAs(FakeSAs):
    """A kernel stand-in counting full dumps and targeted lookups; ``get_sas`` answers
    from ``self.sas`` (the kernel's current truth) like XfrmClient.get_sas."""

    def __init__(self, sas: list) -> None:
        super().__init__(sas)
        self.dumps = 0
        self.lookups: list[list] = []

    async def dump(self) -> list:
        self.dumps += 1
        return list(self.sas)

    async def get_sas(self, sas: list) -> dict:
        self.lookups.append([sa.key_id for sa in sas])
        now = {sa.key_id: sa for sa in self.sas}
        return {sa.key_id: now.get(sa.key_id) for sa in sas}


SCALE = BASE + """
[agent]
sa_refresh_interval = 0.05
sa_redump_interval = 3600
[[peers]]
name = "a"
address = "192.0.2.10"
"""


def _bystanders(n: int) -> list:
    """SAs of tunnels the agent does not measure (a router's other customers)."""
    return [make_sa(f"10.1.{i >> 8}.{i & 255}", f"10.2.{i >> 8}.{i & 255}", spi=0x10000 + i, reqid=i + 100)
            for i in range(n)]


def test_refresh_reads_only_the_measured_sas_and_an_overrun_redumps_once(tmp_path: Path) -> None:
    out = make_sa(LOCAL, "192.0.2.10", spi=0x100, reqid=5)
    inb = make_sa("192.0.2.10", LOCAL, spi=0x200, reqid=5)
    h = Harness(tmp_path, SCALE)
    h.sas = src = CountingSAs([out, inb, *_bystanders(500)])

    async def main() -> None:
        d = h.daemon()
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        # The kernel's counters move on the measured SAs: refreshes pick them up...
        src.sas[0] = make_sa(LOCAL, "192.0.2.10", spi=0x100, reqid=5, bytes_=4242, packets=7)
        await until(lambda: d.metrics.tunnels["peer:a"].totals("out")[0] == 4242)
        await until(lambda: len(src.lookups) >= 3)
        # ...with lookups of the tunnel's two SAs only, and no dump besides the first.
        assert all(sorted(keys) == sorted([out.key_id, inb.key_id]) for keys in src.lookups)
        assert src.dumps == 1 and d.metrics.sa_table["redumps_start"] == 1
        assert d.metrics.sa_table["lookups"] >= 6 and d.metrics.sa_table["size"] == 502

        # Events were lost (ENOBUFS -> OVERFLOW) while the kernel changed: exactly one
        # re-dump, and the table converges to the kernel's.
        src.sas = [src.sas[0], inb, *_bystanders(300)]
        src.queue.put_nowait(XfrmEvent(EventKind.OVERFLOW))
        await until(lambda: d.metrics.sa_table["redumps_overrun"] == 1)
        n_lookups = len(src.lookups)
        await until(lambda: len(src.lookups) >= n_lookups + 3)  # several refresh periods later
        assert src.dumps == 2 and d.metrics.sa_table["overruns"] == 1
        assert d.metrics.sa_table["redumps_schedule"] == 0
        assert sorted(sa.key_id for sa in d.table) == sorted(sa.key_id for sa in src.sas)
        assert d.metrics.sa_table["size"] == 302
        d.request_stop()
        assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(main())


def test_sources_without_targeted_lookups_fall_back_to_redumps(tmp_path: Path) -> None:
    h = Harness(tmp_path, SCALE, [make_sa(LOCAL, "192.0.2.10", spi=0x100)])
    dumps = []
    orig = h.sas.dump

    async def counting() -> list:
        dumps.append(1)
        return await orig()

    h.sas.dump = counting  # type: ignore[method-assign]

    async def main() -> None:
        d = h.daemon()
        task = asyncio.ensure_future(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        await until(lambda: d.metrics.sa_table["redumps_schedule"] >= 2)
        d.request_stop()
        assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(main())


def test_full_dump_freezes_the_table_and_the_next_one_releases_what_died(tmp_path: Path) -> None:
    """The table's records are kept out of the cyclic collector's full passes (gc.freeze
    after a full dump), and a re-dump unfreezes first, so cyclic garbage that was alive at
    the last freeze is collected then, not kept for ever (an agent re-dumps every 10 min)."""
    import gc
    import weakref

    class Node:
        pass

    h = Harness(tmp_path, SCALE)
    h.sas = src = CountingSAs([make_sa(LOCAL, "192.0.2.10", spi=0x100, reqid=5), *_bystanders(50)])
    cycle = Node()
    cycle.me = cycle  # alive at the first freeze; garbage (a cycle) soon after
    dead = weakref.ref(cycle)

    async def main() -> None:
        nonlocal cycle
        d = h.daemon()
        task = asyncio.ensure_future(d.run())
        try:
            await asyncio.wait_for(d.ready.wait(), 10)
            assert gc.get_freeze_count() > 0
            cycle = None
            gc.collect()
            assert dead() is not None  # frozen: not collected
            src.queue.put_nowait(XfrmEvent(EventKind.OVERFLOW))
            await until(lambda: d.metrics.sa_table["redumps_overrun"] == 1)
            assert dead() is None and gc.get_freeze_count() > 0
            d.request_stop()
            assert await asyncio.wait_for(task, 10) == 0
        finally:
            gc.unfreeze()

    asyncio.run(main())
