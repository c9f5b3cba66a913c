"""Full O/TWAMP sessions: the control plane (agent.control) glued to the test plane
(agent.test: TestSender, ReflectorSession, OwampReceiver) over asyncio UDP sockets
with kernel RX/TX stamps and received TTL (agent.timestamping).

Server side: :class:`TwampHandler` / :class:`OwampHandler` answer a ControlServer's
events (one instance per control connection). Client side: :func:`twamp_ping` and
:func:`owping` run one complete conversation each.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent import results
from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import AsyncControlClient, ControlError, family_of
from agent.control.server import ControlServer
from agent.test.packets import Proto, Security, security_from_mode, symmetric_padding
from agent.test.receiver import OwampReceiver
from agent.test.reflector import ReflectorSession
from agent.test.sender import PacketRecord, Schedule, TestSender
from agent.timefmt import ErrorEstimate, ntp_from_unix_ns, unix_ns_from_ntp

log = logging.getLogger(__name__)

_NS = 1_000_000_000
NTP_SECOND = 1 << 32


def _ts_module():
    try:
        from agent import timestamping

        return timestamping
    except Exception:  # pragma: no cover - unsupported architecture
        return None


# ------------------------------------------------------------------------------ UDP


class UdpEndpoint:
    """A non-blocking UDP socket on the running loop. Every datagram is handed to
    ``on_packet(data, addr, rx_ns, ttl, rx_source)``; kernel TX stamps (OPT_ID key =
    n-th send on this socket) to ``on_tx(key, ns, source)``."""

    def __init__(self, sock: socket.socket, on_packet: Callable[..., None],
                 on_tx: Callable[[int, int, str], None] | None = None) -> None:
        self.sock = sock
        self.on_packet = on_packet
        self.on_tx = on_tx
        self._ts = _ts_module()
        self._cfg = None
        self._sent = 0
        if self._ts is not None:
            try:
                self._cfg = self._ts.enable_timestamping(sock, hardware=False)
            except Exception as e:  # no SO_TIMESTAMPING here: user-space stamps
                log.debug("no kernel timestamps: %s", e)
            with contextlib.suppress(OSError):
                self._ts.enable_recv_ttl(sock)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False

    @classmethod
    def open(cls, host: str, port: int, on_packet: Callable[..., None], *, dscp: int | None = None,
             on_tx: Callable[[int, int, str], None] | None = None) -> "UdpEndpoint":
        fam = family_of(host) or socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.bind((host, port))
        except OSError:
            if port == 0:
                sock.close()
                raise
            sock.bind((host, 0))  # the requested port is taken: let the kernel choose
        if dscp:
            set_dscp(sock, dscp)
        return cls(sock, on_packet, on_tx)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def send(self, data: bytes, addr: tuple) -> int:
        key = self._sent
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError, OSError) as e:
            log.debug("UDP send failed: %s", e)
        self._sent += 1
        return key

    def _readable(self) -> None:
        ts = self._ts
        if ts is None:
            try:
                while True:
                    data, addr = self.sock.recvfrom(65535)
                    self.on_packet(data, addr, time.time_ns(), None, "user")
            except (BlockingIOError, InterruptedError):
                return
        packets, tx = ts.drain_socket(self.sock, 65535, config=self._cfg)
        for data, anc, _flags, addr in packets:
            st = ts.rx_stamp(anc, config=self._cfg)
            rx_ns, src = (st.ns, st.source.value) if st is not None else (time.time_ns(), "user")
            try:
                self.on_packet(data, addr, rx_ns, ts.rx_ttl(anc), src)
            except Exception:  # one bad packet must not kill the reader
                log.exception("test packet handler failed")
        if self.on_tx is not None:
            for key, stamp in tx:
                self.on_tx(key, stamp.ns, stamp.source.value)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


def set_dscp(sock: socket.socket, dscp: int) -> None:
    tos = (dscp & 0x3F) << 2
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)


def _host(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return str(a)


def _same_ip(addr: tuple, want: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        got = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(got, ipaddress.IPv6Address) and got.ipv4_mapped is not None:
        got = got.ipv4_mapped
    return got == want


def _timeout_s(ntp_duration: int, default: float = 2.0, cap: float = 30.0) -> float:
    s = ntp_duration / NTP_SECOND if ntp_duration else default
    return max(0.0, min(s, cap))


# ------------------------------------------------------------------------------ server side


class TwampHandler:
    """Session-Reflector side of one TWAMP control connection."""

    def __init__(self, srv: ControlServer) -> None:
        self.srv = srv
        self.sessions: dict[bytes, tuple[ReflectorSession, UdpEndpoint]] = {}
        self.started = False
        self._loop = asyncio.get_running_loop()

    async def on_event(self, srv: ControlServer, e: ev.Event) -> None:
        if isinstance(e, ev.SessionRequested):
            req = e.request
            assert isinstance(req, m.RequestTWSession)
            peer_ip = srv.peer[0] if srv.peer else req.sender_address
            local_ip = srv.local[0] if srv.local else req.receiver_address
            sender_ip, recv_ip = req.resolved_addresses(peer_ip, local_ip)
            try:
                refl = ReflectorSession(Proto.TWAMP, security_from_mode(srv.mode), keys=srv.test_keys(e.sid))
                dscp = req.dscp or 0
                sid = e.sid

                def on_packet(data: bytes, addr: tuple, rx_ns: int, ttl: int | None, src: str,
                              refl: ReflectorSession = refl, sid: bytes = sid) -> None:
                    if not self.started or not _same_ip(addr, sender_ip):
                        return  # RFC 5357 §4.2: only the requested sender, only after Start-Sessions
                    if req.sender_port and addr[1] != req.sender_port:
                        return
                    out = refl.reflect(data, rx_ns, ttl, time.time_ns, peer=addr, rx_source=src)
                    if out is not None:
                        self.sessions[sid][1].send(out, addr)

                ep = UdpEndpoint.open(_host(recv_ip if srv.local is None else local_ip), req.receiver_port,
                                      on_packet, dscp=dscp)
            except (OSError, ValueError) as err:
                log.info("cannot set up reflector: %s", err)
                srv.accept_session(m.ACCEPT_TEMPORARY_LIMIT if isinstance(err, OSError) else m.ACCEPT_NOT_SUPPORTED)
                return
            self.sessions[e.sid] = (refl, ep)
            srv.accept_session(m.ACCEPT_OK, ep.port, e.sid)
        elif isinstance(e, ev.StartRequested):
            self.started = True
            srv.start_ack(m.ACCEPT_OK)
        elif isinstance(e, ev.StopRequested):
            self._retire()
        elif isinstance(e, ev.StartNRequested):
            self.started = True
            srv.start_n_ack(m.ACCEPT_OK, e.msg.sids)
        elif isinstance(e, ev.StopNRequested):
            srv.stop_n_ack(m.ACCEPT_OK, e.msg.sids)

    def _retire(self, grace: float = 1.0) -> None:
        """Keep reflecting late packets for a moment after Stop-Sessions (RFC 5357 §3.8 timeout)."""
        sessions, self.sessions = self.sessions, {}
        for sid, (refl, ep) in sessions.items():
            log.info("reflector session %s: %s", sid.hex(), refl.counters.as_dict())
            self._loop.call_later(grace, ep.close)

    def close(self) -> None:
        for refl, ep in self.sessions.values():
            log.info("reflector session closed: %s", refl.counters.as_dict())
            ep.close()
        self.sessions.clear()


@dataclass
class _OwSession:
    sid: bytes
    request: m.RequestSession
    endpoint: UdpEndpoint
    receiver: OwampReceiver | None = None
    sender: TestSender | None = None
    task: asyncio.Task | None = None
    next_seqno: int | None = None
    dest: tuple | None = None


def schedule_from_slots(slots: tuple[m.Slot, ...]) -> Schedule:
    """The first slot sets the schedule (xwamp sends single-slot schedules)."""
    s = slots[0]
    return Schedule.poisson(s.secs) if s.kind == m.Slot.EXPONENTIAL else Schedule.fixed(s.secs)


async def send_schedule(sender: TestSender, ep: UdpEndpoint, dest: tuple, count: int,
                        on_sent: Callable[[int], None] | None = None) -> None:
    """Send packets 0..count-1 at their absolute schedule times (no drift)."""
    start = time.time_ns()
    for n in range(count):
        delay = (sender.send_time_ns(n, start) - time.time_ns()) / _NS
        if delay > 0:
            await asyncio.sleep(delay)
        ep.send(sender.build(n, time.time_ns()), dest)
        if on_sent is not None:
            on_sent(n)


class OwampHandler:
    """Receiver (and sender) side of one OWAMP control connection."""

    def __init__(self, srv: ControlServer) -> None:
        self.srv = srv
        self.sessions: dict[bytes, _OwSession] = {}
        self.started = False

    async def on_event(self, srv: ControlServer, e: ev.Event) -> None:
        if isinstance(e, ev.SessionRequested):
            req = e.request
            assert isinstance(req, m.RequestSession)
            sec = security_from_mode(srv.mode)
            keys = srv.test_keys(e.sid)
            peer_ip = srv.peer[0] if srv.peer else req.sender_address
            local_ip = srv.local[0] if srv.local else req.receiver_address
            try:
                if req.conf_receiver:
                    rcv = OwampReceiver(sec, keys=keys, expected=req.num_packets)
                    sender_ip, _ = req.resolved_addresses(peer_ip, local_ip)

                    def on_packet(data: bytes, addr: tuple, rx_ns: int, ttl: int | None, src: str,
                                  rcv: OwampReceiver = rcv) -> None:
                        if self.started and _same_ip(addr, sender_ip):
                            rcv.on_packet(data, rx_ns, ttl, src)

                    ep = UdpEndpoint.open(_host(local_ip), req.receiver_port, on_packet, dscp=req.dscp or 0)
                    s = _OwSession(e.sid, req, ep, receiver=rcv)
                else:
                    _, recv_ip = req.resolved_addresses(local_ip, peer_ip)
                    snd = TestSender(Proto.OWAMP, sec, keys=keys, count=req.num_packets,
                                     schedule=schedule_from_slots(req.slots), padding=req.padding_length,
                                     symmetric=False)
                    ep = UdpEndpoint.open(_host(local_ip), 0, lambda *a: None, dscp=req.dscp or 0)
                    s = _OwSession(e.sid, req, ep, sender=snd, dest=(_host(recv_ip), req.receiver_port))
            except (OSError, ValueError) as err:
                log.info("cannot set up OWAMP session: %s", err)
                srv.accept_session(m.ACCEPT_TEMPORARY_LIMIT if isinstance(err, OSError) else m.ACCEPT_NOT_SUPPORTED)
                return
            self.sessions[e.sid] = s
            srv.accept_session(m.ACCEPT_OK, ep.port, e.sid)
        elif isinstance(e, ev.StartRequested):
            self.started = True
            loop = asyncio.get_running_loop()
            for s in self.sessions.values():
                if s.sender is not None and s.task is None:
                    s.task = loop.create_task(send_schedule(s.sender, s.endpoint, s.dest, s.request.num_packets))
            srv.start_ack(m.ACCEPT_OK)
        elif isinstance(e, ev.StopRequested):
            for d in e.stop.descriptions:
                if d.sid in self.sessions:
                    self.sessions[d.sid].next_seqno = d.next_seqno
            descs = []
            for s in self.sessions.values():
                if s.sender is not None:
                    if s.task is not None:
                        s.task.cancel()
                    descs.append(m.SessionDescription(s.sid, s.sender.counters.sent))
            srv.send_stop_sessions(m.ACCEPT_OK, tuple(descs))
            await asyncio.sleep(0.2)  # late packets already in flight
            self.started = False
        elif isinstance(e, ev.FetchRequested):
            s = self.sessions.get(e.fetch.sid)
            if s is None or s.receiver is None:
                srv.reject_fetch(m.ACCEPT_FAILURE)
                return
            recs = fetch_records(s.receiver, e.fetch.begin_seq, e.fetch.end_seq, s.next_seqno)
            nxt = s.next_seqno if s.next_seqno is not None else s.request.num_packets
            srv.send_fetch_response(m.FetchAck(m.ACCEPT_OK, s.next_seqno is not None, nxt, 0, len(recs)),
                                    s.request, (), recs)

    def close(self) -> None:
        for s in self.sessions.values():
            if s.task is not None:
                s.task.cancel()
            s.endpoint.close()
        self.sessions.clear()


def fetch_records(rcv: OwampReceiver, begin: int, end: int, next_seqno: int | None) -> tuple[m.DataRecord, ...]:
    """RFC 4656 §3.8 records for begin <= seq <= end in arrival order; packets below
    Next Seqno that never arrived are appended as lost (Receive Timestamp 0)."""
    out = [m.DataRecord(r.seq, r.send_timestamp, ErrorEstimate.unpack(r.send_error), r.recv_timestamp,
                        ErrorEstimate.unpack(r.recv_error), r.ttl)
           for r in rcv.records if begin <= r.seq <= end]
    if next_seqno is not None:
        seen = {r.seq for r in rcv.records}
        zero = ErrorEstimate(False, False, 0, 1)
        out += [m.DataRecord(s, 0, zero, 0, zero, 255) for s in range(begin, min(end + 1, next_seqno)) if s not in seen]
    return tuple(out)


# ------------------------------------------------------------------------------ client side


@dataclass
class PingOptions:
    host: str
    port: int | None = None
    count: int = 10
    interval: float = 1.0
    schedule: str = "fixed"  # or "poisson" (exponential gaps)
    padding: int | None = None
    dscp: int = 0
    wanted: tuple[str, ...] = ("unauth",)
    key_id: str = ""
    key_source: object | None = None
    max_count: int = 1 << 20
    wait: float = 2.0  # how long to wait for late replies after the last packet
    timeout: float = 10.0  # control-plane answers
    test_port: int = 0  # requested reflector / receiver UDP port (0: server's choice)


@dataclass
class PingResult:
    records: list[PacketRecord]
    summary: results.Summary
    mode: int
    counters: dict[str, int]
    peer: str
    sid: bytes = b""


def _duration_ntp(s: float) -> int:
    return int(s * NTP_SECOND)


async def twamp_ping(opt: PingOptions, on_record: Callable[[PacketRecord], None] | None = None) -> PingResult:
    conn = await AsyncControlClient.connect(opt.host, opt.port, twamp=True, wanted=opt.wanted, key_id=opt.key_id,
                                            key_source=opt.key_source, max_count=opt.max_count, timeout=opt.timeout,
                                            family=family_of(opt.host))
    ep: UdpEndpoint | None = None
    try:
        local_ip, peer_ip = conn.local[0], conn.peer[0]
        sender: TestSender | None = None

        def on_packet(data: bytes, addr: tuple, rx_ns: int, ttl: int | None, src: str) -> None:
            if sender is None:
                return
            rec = sender.on_reply(data, rx_ns, ttl, src)
            if rec is not None and on_record is not None and not rec.duplicates:
                on_record(rec)

        def on_tx(key: int, ns: int, src: str) -> None:
            if sender is not None:
                sender.on_tx_stamp(key, ns, src)

        ep = UdpEndpoint.open(str(local_ip), 0, on_packet, dscp=opt.dscp, on_tx=on_tx)
        sec = security_from_mode(conn.cli.mode)
        schedule = Schedule.poisson(opt.interval) if opt.schedule == "poisson" else Schedule.fixed(opt.interval)
        pad = opt.padding if opt.padding is not None else symmetric_padding(Proto.TWAMP, sec)
        req = m.RequestTWSession(local_ip, peer_ip, ep.port, opt.test_port, padding_length=pad,
                                 timeout=_duration_ntp(opt.wait), type_p=m.typep_from_dscp(opt.dscp))
        acc = await conn.request_tw_session(req)
        if not acc.ok:
            raise ControlError(f"session refused: {m.ACCEPT_NAMES[acc.accept.accept]}")
        sender = TestSender(Proto.TWAMP, sec, keys=acc.test_keys, count=opt.count, schedule=schedule,
                            padding=pad, symmetric=True)
        if await conn.start_sessions() != m.ACCEPT_OK:
            raise ControlError("Start-Sessions refused")
        dest = (str(peer_ip), acc.accept.port)
        await send_schedule(sender, ep, dest, opt.count)
        await _wait_replies(sender, opt.wait)
        await conn.stop_sessions(1)
        recs = sender.records()
        return PingResult(recs, results.summarize(recs, reflector_stateful=True), conn.cli.mode,
                          sender.counters.as_dict(), str(peer_ip), acc.accept.sid)
    finally:
        if ep is not None:
            ep.close()
        await conn.close()


async def _wait_replies(sender: TestSender, wait: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + wait
    while loop.time() < end:
        if all(not r.lost for r in sender.records()):
            return
        await asyncio.sleep(0.01)


@dataclass
class OneWayStats:
    sent: int
    received: int
    lost: int
    duplicates: int
    delay: results.Stats | None
    synced: bool
    ttl: tuple[int, int] | None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def one_way_stats(records: tuple[m.DataRecord, ...] | list[m.DataRecord], sent: int) -> OneWayStats:
    got = [r for r in records if not r.lost]
    seen: set[int] = set()
    dups = 0
    delays = []
    for r in got:
        if r.seq in seen:
            dups += 1
            continue
        seen.add(r.seq)
        delays.append(unix_ns_from_ntp(r.recv_time) - unix_ns_from_ntp(r.send_time))
    ttls = [r.ttl for r in got if r.ttl != 255]
    synced = bool(got) and all(r.send_error.synced and r.recv_error.synced for r in got)
    return OneWayStats(sent, len(seen), max(0, sent - len(seen)), dups, results.Stats.of_ns(delays), synced,
                       (min(ttls), max(ttls)) if ttls else None)


@dataclass
class OwpingResult:
    forward: OneWayStats  # we -> server (fetched from the server)
    reverse: OneWayStats  # server -> we (our receiver)
    mode: int
    forward_records: tuple[m.DataRecord, ...] = field(default=(), repr=False)
    reverse_records: tuple[m.DataRecord, ...] = field(default=(), repr=False)
    receiver_counters: dict[str, int] = field(default_factory=dict)


async def owping(opt: PingOptions) -> OwpingResult:
    conn = await AsyncControlClient.connect(opt.host, opt.port, twamp=False, wanted=opt.wanted, key_id=opt.key_id,
                                            key_source=opt.key_source, max_count=opt.max_count, timeout=opt.timeout,
                                            family=family_of(opt.host))
    send_ep = recv_ep = None
    try:
        local_ip, peer_ip = conn.local[0], conn.peer[0]
        sec = security_from_mode(conn.cli.mode)
        slot = m.Slot.seconds(m.Slot.EXPONENTIAL if opt.schedule == "poisson" else m.Slot.FIXED, opt.interval)
        pad = opt.padding or 0
        receiver: OwampReceiver | None = None
        started = False

        def on_packet(data: bytes, addr: tuple, rx_ns: int, ttl: int | None, src: str) -> None:
            if receiver is not None and started and _same_ip(addr, peer_ip):
                receiver.on_packet(data, rx_ns, ttl, src)

        send_ep = UdpEndpoint.open(str(local_ip), 0, lambda *a: None, dscp=opt.dscp)
        recv_ep = UdpEndpoint.open(str(local_ip), 0, on_packet)
        common = dict(padding_length=pad, timeout=_duration_ntp(opt.wait), type_p=m.typep_from_dscp(opt.dscp),
                      num_packets=opt.count, slots=(slot,))
        fwd = await conn.request_session(m.RequestSession(local_ip, peer_ip, send_ep.port, opt.test_port,
                                                          conf_sender=False, conf_receiver=True, **common))
        if not fwd.ok:
            raise ControlError(f"forward session refused: {m.ACCEPT_NAMES[fwd.accept.accept]}")
        my_sid = m.make_sid(local_ip, ntp_from_unix_ns(time.time_ns()))
        rev = await conn.request_session(m.RequestSession(peer_ip, local_ip, 0, recv_ep.port, sid=my_sid,
                                                          conf_sender=True, conf_receiver=False, **common))
        if not rev.ok:
            raise ControlError(f"reverse session refused: {m.ACCEPT_NAMES[rev.accept.accept]}")
        receiver = OwampReceiver(sec, keys=conn.cli.test_keys(my_sid), expected=opt.count)
        sender = TestSender(Proto.OWAMP, sec, keys=fwd.test_keys, count=opt.count,
                            schedule=schedule_from_slots((slot,)), padding=pad, symmetric=False)
        started = True
        if await conn.start_sessions() != m.ACCEPT_OK:
            raise ControlError("Start-Sessions refused")
        await send_schedule(sender, send_ep, (str(peer_ip), fwd.accept.port), opt.count)
        # the server's packets follow their own schedule: give them the same time plus the wait
        loop = asyncio.get_running_loop()
        end = loop.time() + opt.wait
        while loop.time() < end and len(receiver.records) < opt.count:
            await asyncio.sleep(0.01)
        stop = await conn.stop_sessions(1, m.ACCEPT_OK, (m.SessionDescription(fwd.accept.sid, sender.counters.sent),))
        their_sent = opt.count
        if stop is not None:
            for d in stop.descriptions:
                if d.sid == my_sid:
                    their_sent = d.next_seqno
        fetched = await conn.fetch_session(fwd.accept.sid, timeout=opt.timeout)
        if fetched.ack.accept != m.ACCEPT_OK:
            raise ControlError(f"Fetch-Session refused: {m.ACCEPT_NAMES[fetched.ack.accept]}")
        rev_records = fetch_records(receiver, 0, 0xFFFFFFFF, their_sent)
        return OwpingResult(one_way_stats(fetched.records, sender.counters.sent),
                            one_way_stats(rev_records, their_sent), conn.cli.mode,
                            fetched.records, rev_records, receiver.counters.as_dict())
    finally:
        for e in (send_ep, recv_ep):
            if e is not None:
                e.close()
        await conn.close()


def random_sid() -> bytes:
    return os.urandom(16)
