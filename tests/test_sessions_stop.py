"""Stopping sessions without losing their results, shutdown while sending, and the
server's per-session packet rate / count caps (ServerConfig.max_rate, max_reflected)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import time

import pytest

from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import AsyncControlClient, ControlListener
from agent.control.client import ControlClient
from agent.control.keyring import StaticKeySource
from agent.control.server import ControlServer, ServerConfig, slots_rate
from agent.engine import udp
from agent.sessions.session import (
    OwampHandler,
    PingOptions,
    ReflectPolicer,
    TwampHandler,
    owping,
    twamp_ping,
)
from netlink.secret import Secret

KEYS = StaticKeySource({"alice": Secret(b"stop passphrase")})
LO = ipaddress.ip_address("127.0.0.1")


async def _listener(twamp: bool, config: ServerConfig = ServerConfig(count=1024)) -> ControlListener:
    lst = ControlListener(TwampHandler if twamp else OwampHandler, twamp=twamp, hosts=["127.0.0.1"], port=0,
                          config=config, key_source=KEYS)
    await lst.start()
    return lst


def _opts(port: int, **kw) -> PingOptions:
    return PingOptions("127.0.0.1", port, count=kw.pop("count", 1000), interval=kw.pop("interval", 0.01),
                       wanted=("auth",), key_id="alice", key_source=KEYS, wait=0.5, timeout=5.0, **kw)


def _stop_after(delay: float) -> asyncio.Event:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(delay, stop.set)
    return stop


# ------------------------------------------------------------------------------ stop hooks


def test_run_twamp_sender_stop_returns_records_so_far() -> None:
    async def main() -> None:
        ep = udp.TwampReflectorEndpoint(("127.0.0.1", 0), hardware=False)
        await ep.start()
        try:
            sock = udp.open_udp_socket(("127.0.0.1", 0))
            ep.add_session("s", sock.getsockname())
            t0 = time.monotonic()
            try:
                recs = await udp.run_twamp_sender(("127.0.0.1", 0), ("127.0.0.1", ep.port), count=10_000,
                                                  interval=0.01, timeout=5.0, hardware=False, sock=sock,
                                                  stop=_stop_after(0.2))
            finally:
                sock.close()
            assert time.monotonic() - t0 < 1.0  # neither the schedule nor the 5 s timeout is waited out
            assert 5 <= len(recs) < 100 and [r.seq for r in recs] == list(range(len(recs)))
            assert sum(1 for r in recs if not r.lost) >= len(recs) - 2
        finally:
            ep.close()

    asyncio.run(main())


def test_twamp_ping_stop_finishes_the_conversation() -> None:
    async def main() -> None:
        lst = await _listener(True)
        try:
            t0 = time.monotonic()
            res = await twamp_ping(_opts(lst.addresses[0][1]), stop=_stop_after(0.2))
            assert time.monotonic() - t0 < 2.0
            assert 5 <= res.summary.loss.sent < 1000 and res.summary.loss.received >= res.summary.loss.sent - 2
        finally:
            await lst.close()

    asyncio.run(main())


def test_owping_stop_sends_stop_sessions_and_keeps_results() -> None:
    async def main() -> None:
        lst = await _listener(False)
        try:
            t0 = time.monotonic()
            res = await owping(_opts(lst.addresses[0][1]), stop=_stop_after(0.4))
            assert time.monotonic() - t0 < 3.0
            # Our Stop-Sessions said how many we sent; the server's said how many it sent
            # (its sender stopped, not cancelled): both are partial and consistent.
            assert 5 <= res.forward.sent < 1000 and res.forward.received >= res.forward.sent - 2
            assert 5 <= res.reverse.sent < 1000 and res.reverse.received >= res.reverse.sent - 2
            assert res.reverse.lost <= 2
        finally:
            await lst.close()

    asyncio.run(main())


def test_owamp_server_shutdown_while_sending_is_quiet(caplog) -> None:
    """Closing the listener while the OWAMP server sends: no 'Invalid file descriptor: -1'
    (the socket used to be closed under the cancelled sender), no error logged."""

    async def main() -> None:
        lst = await _listener(False, ServerConfig(count=1024))
        conn = await AsyncControlClient.connect("127.0.0.1", lst.addresses[0][1], twamp=False, timeout=5)
        try:
            sid = m.make_sid(conn.local[0], 1)
            req = m.RequestSession(conn.peer[0], conn.local[0], 0, 9, sid=sid, conf_sender=True, conf_receiver=False,
                                   padding_length=0, timeout=1 << 32, num_packets=10_000,
                                   slots=(m.Slot.seconds(m.Slot.FIXED, 0.005),))
            assert (await conn.request_session(req)).ok
            assert await conn.start_sessions() == m.ACCEPT_OK
            await asyncio.sleep(0.1)
            await lst.close()
            await asyncio.sleep(0.1)
            gc.collect()  # a failed, unretrieved sender task reports itself when collected
        finally:
            await conn.close()

    errors: list[dict] = []
    with caplog.at_level(logging.DEBUG):
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _l, ctx: errors.append(ctx))
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
    assert not errors
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or "file descriptor" in r.getMessage()]


def test_reflector_session_log_line_is_debug(caplog, monkeypatch) -> None:
    monkeypatch.setattr(TwampHandler, "max_stop_timeout", 0.0)  # retire at once: the line is written now

    async def main() -> None:
        lst = await _listener(True)
        try:
            await twamp_ping(_opts(lst.addresses[0][1], count=2))
            await asyncio.sleep(0.05)
        finally:
            await lst.close()

    with caplog.at_level(logging.DEBUG, logger="agent.sessions.session"):
        asyncio.run(main())
    lines = [r for r in caplog.records if r.getMessage().startswith("reflector session")]
    assert lines and all(r.levelno == logging.DEBUG for r in lines)


# ------------------------------------------------------------------------------ caps


def test_slots_rate() -> None:
    assert slots_rate((m.Slot.seconds(m.Slot.FIXED, 0.01),)) == pytest.approx(100)
    assert slots_rate((m.Slot.seconds(0, 0.1), m.Slot.seconds(1, 0.3))) == pytest.approx(5)
    assert slots_rate((m.Slot(1, 0),)) == float("inf")


def _owamp_request(rate: float, n: int = 100) -> m.RequestSession:
    return m.RequestSession(LO, LO, 9, 0, conf_sender=False, conf_receiver=True, padding_length=0,
                            timeout=1 << 32, num_packets=n, slots=(m.Slot.seconds(m.Slot.FIXED, 1 / rate),))


def _ready_pair(config: ServerConfig) -> tuple[ControlServer, ControlClient]:
    srv = ControlServer(False, config, None, local=(LO, 861), peer=(LO, 40000))
    cli = ControlClient(False, ["unauth"])
    for _ in range(4):
        cli.receive_data(srv.data_to_send())
        srv.receive_data(cli.data_to_send())
    assert cli.state == "ready"
    return srv, cli


@pytest.mark.parametrize("rate,n,accept", [(50, 100, m.ACCEPT_OK), (200, 100, m.ACCEPT_PERMANENT_LIMIT),
                                           (50, 1001, m.ACCEPT_PERMANENT_LIMIT)])
def test_owamp_request_over_the_caps_is_refused(rate: float, n: int, accept: int) -> None:
    srv, cli = _ready_pair(ServerConfig(count=1024, max_rate=100, max_packets=1000))
    cli.request_session(_owamp_request(rate, n))
    evs = srv.receive_data(cli.data_to_send())
    if accept == m.ACCEPT_OK:
        assert isinstance(evs[0], ev.SessionRequested)
        return
    assert isinstance(evs[0], ev.SessionRefused) and evs[0].accept == accept
    (got,) = cli.receive_data(srv.data_to_send())
    assert isinstance(got, ev.SessionAccepted) and got.accept.accept == accept


def test_server_config_caps_are_checked() -> None:
    assert ServerConfig().max_rate is None and ServerConfig().max_reflected is None  # no cap by default
    with pytest.raises(ValueError):
        ServerConfig(max_rate=0)
    with pytest.raises(ValueError):
        ServerConfig(max_reflected=0)


def test_policer_token_bucket_and_count() -> None:
    now = [0.0]
    p = ReflectPolicer(lambda data, *a: data, rate=100.0, count=None, clock=lambda: now[0])
    assert p.depth == 100.0
    assert sum(p(b"x") is not None for _ in range(150)) == 100  # one second's worth, no more
    assert p.policed_rate == 50
    now[0] += 0.1  # 10 tokens back
    assert sum(p(b"x") is not None for _ in range(20)) == 10
    c = ReflectPolicer(lambda data, *a: None if data == b"bad" else data, rate=None, count=3)
    assert c(b"bad") is None and c.reflected == 0  # what the reflector drops itself does not count
    assert [c(b"x") for _ in range(5)] == [b"x"] * 3 + [None] * 2
    assert c.counters() == {"policed_rate": 0, "policed_count": 2, "policed_client": 0}


def test_twamp_reflector_polices_rate_and_count() -> None:
    async def main() -> None:
        lst = await _listener(True, ServerConfig(count=1024, max_rate=20.0, max_reflected=1000))
        try:
            t0 = time.monotonic()
            res = await twamp_ping(_opts(lst.addresses[0][1], count=60, interval=0.001))
            spent = time.monotonic() - t0
            # 60 packets in ~60 ms at a 20 packets/s cap: the bucket's depth (16) plus what
            # refills while they trickle in (a busy host spreads them out)
            assert 16 <= res.summary.loss.received <= 16 + 20 * spent + 1 < 60
            counted = TwampHandler.finished.get(res.sid)
            if counted is not None:  # retired after the request's Timeout
                assert counted["policed_rate"] == 60 - res.summary.loss.received
        finally:
            await lst.close()
        lst = await _listener(True, ServerConfig(count=1024, max_reflected=3))
        try:
            res = await twamp_ping(_opts(lst.addresses[0][1], count=6, interval=0.005))
            assert res.summary.loss.received == 3
        finally:
            await lst.close()
        assert TwampHandler.finished[res.sid]["policed_count"] == 3  # close() recorded it

    asyncio.run(main())


def test_cli_server_caps(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    base = [sys.executable, "-m", "agent", "server", "--listen", "127.0.0.1", "--protocol", "owamp",
            "--owamp-port", "0"]
    bad = subprocess.run(base + ["--max-rate", "0"], cwd=root, env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--max-rate" in bad.stderr and len(bad.stderr.splitlines()) == 1
    srv = subprocess.Popen(base + ["--max-packets", "2", "--max-rate", "50", "--duration", "30"], cwd=root, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = srv.stdout.readline().split(" port ")[1].split(",")[0]
        r = subprocess.run([sys.executable, "-m", "agent", "owping", "127.0.0.1", "--port", port, "-c", "3",
                            "-i", "0.01", "--wait", "0.2"], cwd=root, env=env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 1 and "refused: permanent resource limitation" in r.stderr, r.stderr
    finally:
        srv.terminate()
        srv.wait(10)
