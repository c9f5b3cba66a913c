"""Issue 11 row 4: ``xwamp agent`` parsed ``[server] max_rate`` (default 1000) and never
handed it to its server: TWAMP reflected 34,756 packets/s. Now every ``[server]`` cap
reaches the listeners, and a reflector session is policed at ``max_rate`` (RFC 5357 §3.5:
Request-TW-Session carries no rate to refuse on), counted in ``xwamp_server_caps_total``."""

from __future__ import annotations

import asyncio
import re
import socket

from tests.hostile import harness as h

SOURCE = "127.9.0.4"
RATE = 100.0


async def _run(srv: h.Served) -> tuple[int, int, float]:
    conn = await h.attacker_client(srv.twamp, twamp=True, source=SOURCE)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((SOURCE, 0))
    try:
        acc = await h.twamp_session(conn, sock)
        assert acc.ok
        assert await conn.start_sessions() == 0
        return await asyncio.to_thread(h.blast, sock, ("127.0.0.1", acc.accept.port), 2.0)
    finally:
        sock.close()
        await conn.close()


def test_agent_polices_twamp_reflection_at_max_rate(tmp_path) -> None:
    srv = h.start_agent(tmp_path, server_toml=f"max_rate = {RATE}")
    try:
        sent, replies, elapsed = asyncio.run(_run(srv))
        assert sent > 10 * RATE * elapsed  # the attacker asked for far more than the cap
        # one second's bucket, then the rate: never more
        assert replies <= RATE * (elapsed + 0.5) + RATE, (sent, replies, elapsed)
        srv.wait_log(r"reflector session \w+ policed: .*policed_rate=\d+")
        body = h.scrape(srv.metrics)
        m = re.search(r'^xwamp_server_caps_total\{cap="policed_rate"\} (\S+)$', body, re.M)
        assert m and float(m.group(1)) > 0, body[-2000:]
        assert srv.alive() and srv.rss_growth() < h.RSS_BOUND
        ok = srv.ping()
        assert ok["returncode"] == 0 and h.received(ok) >= 1, ok["stderr"]
    finally:
        srv.stop()
