"""Session timing on the server: TWAMP Start Time (RFC 5357 §3.5), the stop Timeout
(§3.8) and REFWAIT (§4.2); the OWAMP receiver's validity window from Request-Session
(RFC 4656 §4.2, §5); Start Times too far ahead are refused."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import AsyncControlClient, ControlListener
from agent.control.server import ControlServer, ServerConfig
from agent.engine.packets import Proto, Security
from agent.engine.sender import TestSender
from agent.engine.timefmt import ntp_from_unix_ns
from agent.sessions.session import OwampHandler, TwampHandler, schedule_from_slots

LO = ipaddress.IPv4Address("127.0.0.1")
CFG = ServerConfig(count=1024)
NTP_S = 1 << 32


class Recorder:
    def __init__(self, cls) -> None:
        self.cls = cls
        self.handlers: list = []

    def __call__(self, srv):
        h = self.cls(srv)
        self.handlers.append(h)
        return h


async def _setup(twamp: bool, factory) -> tuple[ControlListener, AsyncControlClient, socket.socket]:
    lst = ControlListener(factory, twamp=twamp, hosts=["127.0.0.1"], port=0, config=CFG)
    await lst.start()
    conn = await AsyncControlClient.connect("127.0.0.1", lst.addresses[0][1], twamp=twamp)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return lst, conn, sock


async def _probe(sock: socket.socket, snd: TestSender, n: int, dest: tuple[str, int], wait: float = 0.3) -> bool:
    """Send packet n; True if a reply came back within ``wait``."""
    loop = asyncio.get_running_loop()
    sock.sendto(snd.build(n, time.time_ns()), dest)
    try:
        await asyncio.wait_for(loop.sock_recv(sock, 2048), wait)
        return True
    except (asyncio.TimeoutError, ConnectionRefusedError):
        return False


async def _tw_session(conn: AsyncControlClient, sock: socket.socket, **kw) -> tuple[str, int]:
    req = m.RequestTWSession(LO, LO, sock.getsockname()[1], 0, padding_length=27, **kw)
    acc = await conn.request_tw_session(req)
    assert acc.ok
    return "127.0.0.1", acc.accept.port


def test_twamp_reflects_from_start_time_not_start_sessions() -> None:
    async def main() -> None:
        lst, conn, sock = await _setup(True, TwampHandler)
        snd = TestSender(count=10)
        try:
            start = time.time_ns() + 700_000_000
            dest = await _tw_session(conn, sock, start_time=ntp_from_unix_ns(start), timeout=NTP_S)
            assert await conn.start_sessions() == 0
            assert not await _probe(sock, snd, 0, dest)  # Start-Sessions alone does not start it
            await asyncio.sleep(max(0.0, (start - time.time_ns()) / 1e9) + 0.05)
            assert await _probe(sock, snd, 1, dest)
            await conn.stop_sessions(1)
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    asyncio.run(main())


def test_twamp_keeps_reflecting_for_timeout_after_stop() -> None:
    async def main() -> None:
        lst, conn, sock = await _setup(True, TwampHandler)
        snd = TestSender(count=10)
        try:
            dest = await _tw_session(conn, sock, timeout=NTP_S * 6 // 10)  # 0.6 s
            assert await conn.start_sessions() == 0
            assert await _probe(sock, snd, 0, dest)
            await conn.stop_sessions(1)
            await asyncio.sleep(0.05)
            assert await _probe(sock, snd, 1, dest)  # in flight within Timeout: still reflected
            await asyncio.sleep(0.7)
            assert not await _probe(sock, snd, 2, dest)  # past Timeout: the session is gone
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    asyncio.run(main())


def test_refwait_discontinues_a_silent_session() -> None:
    class ShortRefwait(TwampHandler):
        refwait = 0.3

    async def main() -> None:
        rec = Recorder(ShortRefwait)
        lst, conn, sock = await _setup(True, rec)
        snd = TestSender(count=10)
        try:
            dest = await _tw_session(conn, sock, timeout=NTP_S)
            assert await conn.start_sessions() == 0
            assert await _probe(sock, snd, 0, dest)
            await asyncio.sleep(0.2)
            assert await _probe(sock, snd, 1, dest)  # traffic keeps it alive
            await asyncio.sleep(0.8)
            h = rec.handlers[0]
            assert not h.active and not h.sessions and not h.srv.sessions
            assert not await _probe(sock, snd, 2, dest)
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    asyncio.run(main())


def test_start_time_too_far_ahead_is_refused() -> None:
    now = ntp_from_unix_ns(time.time_ns())
    srv = ControlServer(True, ServerConfig(count=1024, max_start_delay=60), None, local=(LO, 862), peer=(LO, 9))
    srv.data_to_send()
    srv.receive_data(m.SetUpResponse(1).pack())
    srv.data_to_send()
    evs = srv.receive_data(m.RequestTWSession(LO, LO, 1, 2, start_time=now + 120 * NTP_S).pack())
    assert isinstance(evs[0], ev.SessionRefused) and evs[0].accept == m.ACCEPT_NOT_SUPPORTED
    evs = srv.receive_data(m.RequestTWSession(LO, LO, 1, 2, start_time=now + 30 * NTP_S).pack())
    assert isinstance(evs[0], ev.SessionRequested)


def test_owamp_receiver_applies_the_requests_validity_window() -> None:
    async def main() -> None:
        rec = Recorder(OwampHandler)
        lst, conn, sock = await _setup(False, rec)
        try:
            start = time.time_ns() + 200_000_000
            slots = (m.Slot.seconds(m.Slot.FIXED, 0.05),)
            acc = await conn.request_session(m.RequestSession(
                LO, LO, sock.getsockname()[1], 0, num_packets=4, slots=slots, start_time=ntp_from_unix_ns(start),
                timeout=NTP_S // 2))
            assert acc.ok
            rcv = rec.handlers[0].sessions[acc.accept.sid].receiver
            assert rcv is None  # made at Start-Sessions
            assert await conn.start_sessions() == 0
            rcv = rec.handlers[0].sessions[acc.accept.sid].receiver
            sched = schedule_from_slots(acc.accept.sid, slots)
            snd = TestSender(Proto.OWAMP, Security.UNAUTH, count=4, schedule=sched, symmetric=False)
            dest = ("127.0.0.1", acc.accept.port)
            await asyncio.sleep(max(0.0, (start + sched.offset_ns(0) - time.time_ns()) / 1e9))
            sock.sendto(snd.build(0, time.time_ns()), dest)  # on schedule
            sock.sendto(snd.build(3, time.time_ns()), dest)  # 0.15 s early: within Timeout 0.5 s
            sock.sendto(snd.build(2, time.time_ns() - 2_000_000_000), dest)  # claims a send 2 s ago
            await asyncio.sleep(0.2)
            assert rcv.counters.recorded == 2 and rcv.counters.invalid_time == 1
            await conn.stop_sessions(1, 0, (m.SessionDescription(acc.accept.sid, 4),))
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    asyncio.run(main())


def test_receiver_endpoint_passes_the_validity_window_through() -> None:
    from agent.engine.sender import Schedule
    from agent.engine.udp import OwampReceiverEndpoint

    async def main() -> None:
        ep = OwampReceiverEndpoint(("127.0.0.1", 0), hardware=False)
        await ep.start()
        try:
            start = time.time_ns()
            rcv = ep.add_session(b"s" * 16, ("127.0.0.1", 0), timeout_s=0.5, schedule=Schedule.fixed(1.0),
                                 start_ns=start, expected=3)
            snd = TestSender(Proto.OWAMP, Security.UNAUTH, count=3, symmetric=False)
            assert rcv.on_packet(snd.build(0, start), start + 1000, 64) is not None
            assert rcv.on_packet(snd.build(1, start), start + 1000, 64) is None  # 1 s off its schedule
            assert rcv.on_packet(snd.build(2, start - 2 * 10**9), start, 64) is None  # 2 s in flight
            assert rcv.counters.invalid_time == 2
        finally:
            ep.close()

    asyncio.run(main())


def test_owamp_server_sender_does_not_burst_on_a_long_past_start_time() -> None:
    async def main() -> None:
        lst, conn, sock = await _setup(False, OwampHandler)
        try:
            my_sid = m.make_sid(LO, ntp_from_unix_ns(time.time_ns()))
            acc = await conn.request_session(m.RequestSession(
                LO, LO, 0, sock.getsockname()[1], sid=my_sid, conf_sender=True, conf_receiver=False, num_packets=3,
                slots=(m.Slot.seconds(m.Slot.FIXED, 0.3),), start_time=ntp_from_unix_ns(time.time_ns()) - 3600 * NTP_S))
            assert acc.ok
            assert await conn.start_sessions() == 0
            await asyncio.sleep(0.15)
            early = 0
            while True:
                try:
                    sock.recv(2048)
                    early += 1
                except BlockingIOError:
                    break
            assert early == 0  # an hour-old Start Time: the schedule starts now, packet 0 at +0.3 s
            await asyncio.sleep(0.3)
            assert sock.recv(2048)  # then it does arrive
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    asyncio.run(main())


def test_twamp_packet_received_at_start_time_is_reflected() -> None:
    """Issue 13 §3: a packet that arrives at Start Time, before a timer set for Start Time
    has run, is answered: the session is registered at Start-Sessions and each packet is
    judged by its receive stamp. (The old timer lost it as unknown_peer, and the drop log
    raised KeyError 'bad_hmac'.) Deterministic: asyncio runs I/O callbacks before the
    timers that fell due during the same blocking wait."""
    async def main() -> None:
        rec = Recorder(TwampHandler)
        lst, conn, sock = await _setup(True, rec)
        snd = TestSender(count=10)
        loop = asyncio.get_running_loop()
        try:
            start = time.time_ns() + 400_000_000
            dest = await _tw_session(conn, sock, start_time=ntp_from_unix_ns(start), timeout=NTP_S)
            assert await conn.start_sessions() == 0
            while time.time_ns() < start + 2_000_000:  # block the loop past Start Time
                time.sleep(0.01)
            sock.sendto(snd.build(0, time.time_ns()), dest)
            time.sleep(0.05)  # the packet is queued before the loop's next turn
            await asyncio.wait_for(loop.sock_recv(sock, 2048), 5)
            (h,) = rec.handlers
            (s,) = h.sessions.values()
            assert s.counters()["unknown_peer"] == 0 and s.counters()["before_start"] == 0
            await conn.stop_sessions(1)
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    asyncio.run(main())


def test_drop_log_with_counters_an_endpoint_lacks() -> None:
    """Issue 13 §3: the rate-limited drop log must not raise KeyError for a counter the
    endpoint does not have (an endpoint with no session has no 'bad_hmac')."""
    from agent.engine.udp import _RateLimitedLog

    _RateLimitedLog("x", 0.0).maybe({"unknown_peer": 3, "send_errors": 0},
                                    ("bad_hmac", "short", "unknown_peer", "malformed_tlv"))


class TrimmingOwampServer(OwampHandler):
    """A receiver that does what RFC 4656 §3.8 says on Stop-Sessions: it "MUST discard any
    packet records ... with a (computed) send time that falls between the current time
    minus Timeout and the current time"."""

    trimmed = 0

    async def on_event(self, srv, e) -> None:
        if isinstance(e, ev.StopRequested):
            from agent.engine.timefmt import unix_ns_from_ntp

            now = time.time_ns()
            for s in self.sessions.values():
                if s.receiver is None:
                    continue
                limit = now - int(s.request.timeout * 1e9 / NTP_S)
                keep = [r for r in s.receiver.records if unix_ns_from_ntp(r.send_timestamp) < limit]
                type(self).trimmed += len(s.receiver.records) - len(keep)
                s.receiver.records[:] = keep
        await super().on_event(srv, e)


def test_owping_waits_timeout_before_stop_sessions() -> None:
    """Issue 13 §3: against a receiver that trims as §3.8 says, xwamp owping kept none of
    the forward direction (Stop-Sessions right after the reverse packets were in)."""
    from agent.sessions.session import PingOptions, owping

    async def main():
        lst = ControlListener(TrimmingOwampServer, twamp=False, hosts=["127.0.0.1"], port=0, config=CFG)
        await lst.start()
        try:
            opt = PingOptions("127.0.0.1", lst.addresses[0][1], count=5, interval=0.01, wait=0.5, timeout=20)
            return await owping(opt)
        finally:
            await lst.close()

    res = asyncio.run(main())
    assert TrimmingOwampServer.trimmed == 0
    assert len(res.forward_records) == 5 and res.forward.received == 5


def test_fetch_session_reproduction_carries_real_sid_and_port() -> None:
    """Issue 13 §3 / RFC 4656 §3.9: the reproduced Request-Session carries the session's
    SID and "actual sender and receiver port numbers that were used", not the request's
    SID 0 and receiver port 0."""
    async def main() -> None:
        lst, conn, sock = await _setup(False, OwampHandler)
        try:
            start = time.time_ns() + 100_000_000
            req = m.RequestSession(LO, LO, sock.getsockname()[1], 0, conf_sender=False, conf_receiver=True,
                                   num_packets=1, timeout=NTP_S // 10, start_time=ntp_from_unix_ns(start),
                                   slots=(m.Slot.seconds(m.Slot.FIXED, 0.01),))
            acc = await conn.request_session(req)
            assert acc.ok and acc.accept.port != 0
            assert await conn.start_sessions() == 0
            await conn.stop_sessions(1, m.ACCEPT_OK, (m.SessionDescription(acc.accept.sid, 0),))
            got = await conn.fetch_session(acc.accept.sid)
            assert got.ack.accept == 0 and got.request is not None
            assert got.request.sid == acc.accept.sid
            assert got.request.receiver_port == acc.accept.port
            assert got.request.sender_port == sock.getsockname()[1]
        finally:
            sock.close()
            await conn.close()
            await lst.close()

    asyncio.run(main())
