"""Issue 11 row 3: an OWAMP Conf-Sender session of 2**20 packets at gap 0 made the server
send 57-95k packets/s (99 % CPU, ~555 MB RSS) and go on ~10 s after the control
connection closed. Now: a request over ``--max-rate`` is refused (Accept=4), an address's
senders together stay under ``--max-rate-per-client`` (Accept=5), what is accepted is
sent on its schedule, and nothing is sent once the control connection has ended."""

from __future__ import annotations

import asyncio
import socket
import time

from tests.hostile import harness as h

SOURCE = "127.9.0.3"
RATE = 1000.0  # the server's --max-rate default


def _drain(sock: socket.socket, seconds: float) -> int:
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sock.recv(2048)
            n += 1
        except (BlockingIOError, socket.timeout):
            time.sleep(0.01)
    return n


async def _run(srv: h.Served) -> dict:
    from agent.control import messages as m

    out: dict = {}
    conn = await h.attacker_client(srv.owamp, twamp=False, source=SOURCE)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((SOURCE, 0))
    rx.setblocking(False)
    port = rx.getsockname()[1]

    def request(gap: float, packets: int) -> m.RequestSession:
        sid = m.make_sid(conn.local[0], 0)
        return m.RequestSession(conn.peer[0], conn.local[0], 0, port, sid=sid, conf_sender=True, conf_receiver=False,
                                num_packets=packets, slots=(m.Slot.seconds(m.Slot.FIXED, gap),))

    try:
        flood = await conn.request_session(request(0.0, 1 << 20))  # gap 0: an infinite rate
        out["flood_accept"] = flood.accept.accept
        accepted = []
        for _ in range(5):  # 1000 pps each: the fifth would take the address over 4000 pps
            a = await conn.request_session(request(1 / RATE, 100_000))
            accepted.append(a.accept.accept)
        out["accepts"] = accepted
        assert await conn.start_sessions() == m.ACCEPT_OK
        t0 = time.monotonic()
        out["during"] = await asyncio.to_thread(_drain, rx, 1.0)
        out["window"] = time.monotonic() - t0
        out["rss"] = srv.rss_growth()
    finally:
        await conn.close()  # no Stop-Sessions: the peer just goes away
    await asyncio.sleep(1.5)  # what was in flight, and the server noticing the close
    _drain(rx, 0.2)
    out["after"] = await asyncio.to_thread(_drain, rx, 2.0)
    rx.close()
    return out


def test_owamp_sender_capped_and_stopped_with_its_connection(tmp_path) -> None:
    srv = h.start_server(tmp_path)
    try:
        r = asyncio.run(_run(srv))
        assert r["flood_accept"] == 4  # RFC 4656 §3.5 Accept 4: permanent resource limitation
        assert r["accepts"] == [0, 0, 0, 0, 5]  # the address's share: temporary resource limitation
        # four sessions at 1000 pps each, on their schedule: never more than the caps allow
        assert 0 < r["during"] <= 4 * RATE * r["window"] * 1.2 + 100, r
        assert r["after"] == 0, r  # the control connection ended: so did the sending
        assert srv.alive() and r["rss"] < h.RSS_BOUND
        srv.wait_log(r"session refused \(Accept=4\): packet rate over the server's cap")
        srv.wait_log(r"session refused: over the address's rate cap")
        ok = srv.ping()
        assert ok["returncode"] == 0 and h.received(ok) >= 1, ok["stderr"]
    finally:
        srv.stop()
