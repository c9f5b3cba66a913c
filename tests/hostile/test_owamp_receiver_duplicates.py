"""Issue 11 row 2: an OWAMP Conf-Receiver session, then one 14-octet test packet (seq 0)
sent over and over from the announced sender port. The receiver keeps one record per
sequence number: duplicates are counted, not stored (RSS grew ~20 MB/s before)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from tests.hostile import harness as h

SOURCE = "127.9.0.1"
SECONDS = 3.0  # of flooding; ~50k+ packets on a loaded machine


def _owamp_packet(seq: int) -> bytes:
    """RFC 4656 §4.1.2 unauthenticated: Seq(4) Timestamp(8) Error Estimate(2), no padding."""
    ntp = int((time.time() + 2208988800) * (1 << 32))
    return struct.pack("!IQH", seq, ntp, 0x0001)


async def _attack(srv: h.Served) -> tuple[int, int, int]:
    from agent.control import messages as m

    conn = await h.attacker_client(srv.owamp, twamp=False, source=SOURCE)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((SOURCE, 0))
    try:
        req = m.RequestSession(conn.local[0], conn.peer[0], udp.getsockname()[1], 0, conf_sender=False,
                               conf_receiver=True, num_packets=1, slots=(m.Slot.seconds(m.Slot.FIXED, 0.01),))
        acc = await conn.request_session(req)
        assert acc.ok
        assert await conn.start_sessions() == m.ACCEPT_OK
        dest = ("127.0.0.1", acc.accept.port)
        pkt, sent = _owamp_packet(0), 0
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            for _ in range(500):
                try:
                    udp.sendto(pkt, dest)
                    sent += 1
                except BlockingIOError:
                    pass
            for seq in (1, 7, 0xFFFFFFFF):  # beyond Number of Packets: never stored either
                udp.sendto(_owamp_packet(seq), dest)
            await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        await conn.stop_sessions(1, m.ACCEPT_OK, (m.SessionDescription(acc.accept.sid, 1),))
        fetched = await conn.fetch_session(acc.accept.sid, timeout=20)
        assert fetched.ack.accept == m.ACCEPT_OK
        return sent, len(fetched.records), srv.rss_growth()
    finally:
        udp.close()
        await conn.close()


def test_owamp_receiver_stores_one_record_per_seq(tmp_path) -> None:
    srv = h.start_server(tmp_path)
    try:
        sent, records, growth = asyncio.run(_attack(srv))
        assert sent > 1000
        assert records == 1  # one per sequence number below Number of Packets
        assert srv.alive() and growth < h.RSS_BOUND, growth
        dup = int(srv.wait_log(r"receiver session \w+ capped: duplicates=(\d+)").group(1))
        assert dup >= sent // 2  # counted (the kernel may drop some of the flood)
        assert "out_of_range=" in srv.text()  # seq >= Number of Packets: counted, not stored
        ok = srv.ping()
        assert ok["returncode"] == 0 and h.received(ok) >= 1, ok["stderr"]
    finally:
        srv.stop()
