"""RFC 4656 §3.8: "A receiver of an OWAMP-Test session, upon receipt of an OWAMP-Control
Stop-Sessions command, MUST discard any packet records -- including lost packet records --
with a (computed) send time that falls between the current time minus Timeout and the
current time." (read in khamidou/rfc-czar rfc4656.html §3.8).

Test packets are built here with ``struct`` from RFC 4656 §4.1.2 (unauthenticated: Sequence
Number, Timestamp, Error Estimate, padding) and Fetch records read with ``struct`` from §3.8
(Seq, Send/Recv Error Estimate, Send/Recv Timestamp, TTL), not with xwamp's codecs."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time

from agent.control import messages as m
from agent.control.aio import AsyncControlClient, ControlListener
from agent.control.server import ServerConfig
from agent.engine.receiver import OwampReceiver
from agent.engine.sender import Schedule
from agent.sessions.session import OwampHandler

NTP_EPOCH = 2208988800
S = 1_000_000_000
T0 = 1_700_000_000 * S
RECORD = struct.Struct("!IHHQQB")  # §3.8 data record, 25 octets


def ntp(ns: int) -> int:
    sec, frac = divmod(ns, S)
    return ((sec + NTP_EPOCH) << 32) | (frac << 32) // S


def owamp_unauth(seq: int, sent_ns: int) -> bytes:
    # §4.1.2: Sequence Number (4), Timestamp (8), Error Estimate (2: S=1, Scale 0, Multiplier 1)
    return struct.pack("!IQH", seq, ntp(sent_ns), 0x8001) + bytes(14)


def records(raw: bytes) -> dict[int, tuple]:
    return {r[0]: r for r in (RECORD.unpack_from(raw, o) for o in range(0, len(raw), RECORD.size))}


def test_stop_discards_records_sent_within_timeout_without_a_schedule() -> None:
    rcv = OwampReceiver(timeout_s=2.0)
    for seq in (0, 1, 2, 3, 4, 6, 7, 8, 9):  # seq 5 is lost; sent at T0 + seq s
        assert rcv.on_packet(owamp_unauth(seq, T0 + seq * S), T0 + seq * S + 1000, 64) is not None
    assert rcv.stop(T0 + 9 * S + S // 2) == 2  # window [7.5 s, 9.5 s]: seqs 8 and 9
    got = records(rcv.fetch_records(next_seqno=12))
    # Kept: 0-4, 7 and lost 5 (sent before the window). Discarded: 8, 9; lost 10 and 11
    # come after a packet sent in the window, so they were sent in it too.
    assert sorted(got) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert got[5][4] == 0 and got[5][5] == 255  # lost: Receive Timestamp 0, TTL 255
    assert got[7][3] == ntp(T0 + 7 * S)
    assert rcv.counters.stop_discarded == 2


def test_stop_discards_lost_records_by_their_scheduled_time() -> None:
    sched = Schedule.fixed(1.0)
    rcv = OwampReceiver(timeout_s=2.0, schedule=sched, start_ns=T0, expected=10)
    at = {seq: T0 + sched.offset_ns(seq) for seq in range(10)}
    for seq in (0, 1, 2, 5):  # 3, 4, 6-9 lost
        assert rcv.on_packet(owamp_unauth(seq, at[seq]), at[seq] + 1000, 64) is not None
    now = at[6] + S // 2
    rcv.stop(now)
    got = records(rcv.fetch_records(next_seqno=10))
    expect = sorted(s for s in range(10) if not (now - 2 * S <= at[s] <= now))
    assert sorted(got) == expect and 5 not in got and 3 in got


def test_packets_after_stop_are_not_recorded() -> None:
    rcv = OwampReceiver(timeout_s=1.0)
    rcv.stop(T0)
    assert rcv.on_packet(owamp_unauth(0, T0 - 10 * S), T0 + 1000, 64) is None
    assert rcv.counters.after_stop == 1 and rcv.fetch_records() == b""


def test_timeout_zero_keeps_every_record() -> None:
    rcv = OwampReceiver()
    assert rcv.on_packet(owamp_unauth(0, T0), T0 + 1000, 64) is not None
    assert rcv.stop(T0) == 0 and len(rcv.fetch_records()) == RECORD.size


def test_server_applies_the_window_on_a_premature_stop() -> None:
    """Through xwamp's OWAMP server, Timeout 2 s: a client sends packets 0 and 1, waits
    longer than Timeout, sends 2 and 3 and stops at once; Fetch-Session returns 0 and 1."""
    lo = ipaddress.IPv4Address("127.0.0.1")

    async def main() -> list[int]:
        handlers: list[OwampHandler] = []

        def factory(srv):
            handlers.append(OwampHandler(srv))
            return handlers[-1]

        lst = ControlListener(factory, twamp=False, hosts=["127.0.0.1"], port=0,
                              config=ServerConfig(count=1024))
        await lst.start()
        conn = await AsyncControlClient.connect("127.0.0.1", lst.addresses[0][1], twamp=False)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        try:
            acc = await conn.request_session(m.RequestSession(
                lo, lo, sock.getsockname()[1], 0, num_packets=4, timeout=2 << 32,
                slots=(m.Slot.seconds(m.Slot.FIXED, 0.01),)))
            assert acc.ok and await conn.start_sessions() == 0
            for seq in range(4):
                if seq == 2:
                    await asyncio.sleep(2.2)  # 0 and 1 now lie before the stop's window
                sock.sendto(owamp_unauth(seq, time.time_ns()), ("127.0.0.1", acc.accept.port))
            rcv = handlers[0].sessions[acc.accept.sid].receiver
            for _ in range(250):  # until the server has them (no timing claim: just arrival)
                await asyncio.sleep(0.02)
                if rcv.counters.recorded >= 4:
                    break
            assert rcv.counters.recorded == 4
            await conn.stop_sessions(1, m.ACCEPT_OK, (m.SessionDescription(acc.accept.sid, 4),))
            got = await conn.fetch_session(acc.accept.sid)
            assert got.ack.accept == 0
            return sorted(r.seq for r in got.records)
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    assert asyncio.run(main()) == [0, 1]
