"""Issue 11 row 5 / item 3: Request-TW-Session and Request-Session asking for UDP port 500,
4500, 53 or 123 were granted and bound (with CAP_NET_BIND_SERVICE: squatting IKE). Test
ports now come from a range (``--test-ports``, ``[server] test_ports``; default 8760-9960,
never below 1024). A port outside it is answered with one inside: RFC 5357 §3.5's
Accept-Session carries the port the reflector uses, and RFC 4656 §3.5 says a port the
server configures itself "SHOULD be disregarded" in the request."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest

from tests.hostile import harness as h

SOURCE = "127.9.0.5"
SQUAT = (500, 4500, 53, 123)


async def _run(srv: h.Served, lo: int, hi: int) -> list[int]:
    from agent.control import messages as m

    ports: list[int] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((SOURCE, 0))
    tw = await h.attacker_client(srv.twamp, twamp=True, source=SOURCE)
    ow = await h.attacker_client(srv.owamp, twamp=False, source=SOURCE)
    try:
        for want in SQUAT:
            acc = await h.twamp_session(tw, sock, receiver_port=want)
            assert acc.ok
            ports.append(acc.accept.port)
            slot = (m.Slot.seconds(m.Slot.FIXED, 0.1),)
            recv = await ow.request_session(m.RequestSession(ow.local[0], ow.peer[0], sock.getsockname()[1], want,
                                                             conf_sender=False, conf_receiver=True, num_packets=1,
                                                             slots=slot))
            send = await ow.request_session(m.RequestSession(ow.peer[0], ow.local[0], want, sock.getsockname()[1],
                                                             sid=m.make_sid(ow.local[0], 0), conf_sender=True,
                                                             conf_receiver=False, num_packets=1, slots=slot))
            assert recv.ok and send.ok
            ports += [recv.accept.port, send.accept.port]
        free = next(p for p in range(lo, hi + 1) if p not in ports)
        inside = await h.twamp_session(tw, sock, receiver_port=free)  # a free port inside: granted as asked
        assert inside.ok and inside.accept.port == free
        for p in SQUAT:  # nobody holds them: we can bind them ourselves
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.bind(("127.0.0.1", p))
            except PermissionError:
                pass  # not root: nobody could
            finally:
                probe.close()
        return ports
    finally:
        sock.close()
        await tw.close()
        await ow.close()


def test_test_ports_come_from_the_range(tmp_path) -> None:
    lo, hi = 20010, 20029
    srv = h.start_server(tmp_path, "--test-ports", f"{lo}-{hi}")
    try:
        ports = asyncio.run(_run(srv, lo, hi))
        assert all(lo <= p <= hi for p in ports), ports
        srv.wait_log(r"test port 500 requested outside 20010-20029 \(or busy\): offering 200[12]\d")
        assert srv.alive() and srv.rss_growth() < h.RSS_BOUND
        ok = srv.ping()
        assert ok["returncode"] == 0 and h.received(ok) >= 1, ok["stderr"]
    finally:
        srv.stop()


@pytest.mark.parametrize("bad", ["500-600", "9000-8000", "x"])
def test_test_ports_below_1024_are_a_usage_error(bad: str) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "server", "--test-ports", bad, "--duration", "0.1"],
                       cwd=h.ROOT, env=h.env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_agent_config_test_ports() -> None:
    from agent.daemon import config as cfg

    assert cfg.parse({}).server.test_ports == (8760, 9960)
    assert cfg.parse({"server": {"test_ports": "30000-30099"}}).server.test_ports == (30000, 30099)
    with pytest.raises(cfg.ConfigError, match="server.test_ports"):
        cfg.parse({"server": {"test_ports": "500-4500"}})
