"""Full O/TWAMP sessions: the control plane (agent.control) glued to the test plane's
asyncio UDP adapters (agent.engine.udp: TwampReflectorEndpoint, OwampReceiverEndpoint,
run_twamp_sender; kernel RX/TX stamps, TTL) and statistics (agent.sessions.results).

The test keys each session needs come from the control connection
(``ControlServer.test_keys(sid)`` / ``SessionAccepted.test_keys``): RFC 4656 §4.1.2
derivation, or the key source's ``test_keys`` hook for IPsec-bound modes.

Server side: :class:`TwampHandler` / :class:`OwampHandler` answer a ControlServer's
events (one instance per control connection). Client side: :func:`twamp_ping` and
:func:`owping` run one complete conversation each.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import AsyncControlClient, ConnectionLost, ControlError, family_of
from agent.control.modes import Mode
from agent.control.server import ControlServer
from agent.engine import udp
from agent.engine.packets import (
    Proto,
    reflect_offset,
    security_from_mode,
    sender_base_len,
    symmetric_padding,
)
from agent.engine.receiver import OwampReceiver
from agent.engine.sender import PacketRecord, Schedule
from agent.engine.timefmt import ntp_from_unix_ns, unix_ns_from_ntp
from agent.engine.udp import OwampReceiverEndpoint, TwampReflectorEndpoint
from agent.sessions import results

log = logging.getLogger(__name__)

_NS = 1_000_000_000
NTP_SECOND = 1 << 32
START_LEAD_S = 0.2  # OWAMP Start Time = now + this when requesting
STOP_MARGIN_NS = 50_000_000  # RFC 4656 §3.8's "small increment" after Timeout before Stop-Sessions


PORT_TRIES = 64  # ports of the test range tried before a session is refused (Accept=5)
# Test-port policy events, by name: "port_substituted" (a request outside the range was
# answered with a port from it), "port_exhausted" (no free port in the range). Exported
# as xwamp_server_policy_total (docs/metrics.md).
POLICY: collections.Counter = collections.Counter()
# Test-plane drop counters that are caps against hostile peers (agent.engine.reflector,
# agent.engine.receiver), added to POLICY when their session ends.
DROP_CAPS = ("replayed", "tlv_over_cap", "duplicates", "over_cap", "out_of_range")


def test_port_candidates(requested: int, ports: tuple[int, int] | None) -> list[int]:
    """Ports to try for a session, in order: the requested one if it lies in ``ports``
    (ServerConfig.test_ports), then up to PORT_TRIES from the range starting at a random
    one (an attacker cannot predict them). ``ports`` None: the requested port, then any
    (client-side helpers)."""
    if ports is None:
        return [requested, 0] if requested else [0]
    lo, hi = ports
    out = [requested] if lo <= requested <= hi else []
    n = hi - lo + 1
    first = random.randrange(n)
    out += [lo + (first + i) % n for i in range(min(n, PORT_TRIES))]
    return out


def _note_port(requested: int, got: int, ports: tuple[int, int] | None) -> None:
    if ports is not None and requested and requested != got:
        POLICY["port_substituted"] += 1
        log.info("test port %d requested outside %d-%d (or busy): offering %d", requested, ports[0], ports[1], got)


async def _started_endpoint(cls: type, host: str, port: int, ports: tuple[int, int] | None = None,
                            iface: str | None = None):
    """A started endpoint of ``cls`` on the requested port if it is free and in ``ports``,
    else on another port of ``ports`` (RFC 5357 §3.5 lets Accept-Session name the port
    the reflector uses; RFC 4656 §3.5: a port the server configures itself "SHOULD be
    disregarded" in the request)."""
    for p in test_port_candidates(port, ports):
        ep = cls((host, p), iface=iface, hardware=bool(iface))  # ServerConfig.test_iface: hardware stamps
        try:
            await ep.start()
        except OSError:
            ep.close()
            if p == 0:
                raise
            continue
        _note_port(port, ep.port, ports)
        return ep
    POLICY["port_exhausted"] += 1
    raise OSError(f"no free UDP port in {ports[0]}-{ports[1]}" if ports else "no UDP port")


def _bound_test_socket(host: str, port: int, ports: tuple[int, int] | None, dscp: int | None) -> socket.socket:
    """An OWAMP sender's UDP socket on a port of the test range (see _started_endpoint)."""
    for p in test_port_candidates(port, ports):
        try:
            sock = udp.open_udp_socket((host, p), dscp=dscp)
        except OSError:
            if p == 0:
                raise
            continue
        _note_port(port, sock.getsockname()[1], ports)
        return sock
    POLICY["port_exhausted"] += 1
    raise OSError(f"no free UDP port in {ports[0]}-{ports[1]}" if ports else "no UDP port")


async def _reflector_endpoint(host: str, port: int, ports: tuple[int, int] | None = None,
                              iface: str | None = None) -> TwampReflectorEndpoint:
    return await _started_endpoint(TwampReflectorEndpoint, host, port, ports, iface)


async def _receiver_endpoint(host: str, port: int, ports: tuple[int, int] | None = None,
                             iface: str | None = None) -> OwampReceiverEndpoint:
    return await _started_endpoint(OwampReceiverEndpoint, host, port, ports, iface)


def _seconds(ntp_duration: int) -> float:
    return ntp_duration / NTP_SECOND


def _start_ns(start_time: int) -> int | None:
    """Request Start Time (NTP) as Unix ns; None for 0 ("as soon as possible")."""
    return unix_ns_from_ntp(start_time) if start_time else None


# ------------------------------------------------------------------------------ server side


def _control_ips(srv: ControlServer, req: m.RequestSession | m.RequestTWSession) -> tuple:
    """(peer, local) addresses of the control connection; the request's when unknown."""
    return (srv.peer[0] if srv.peer else req.sender_address, srv.local[0] if srv.local else req.receiver_address)


REFWAIT_S = 900.0  # RFC 5357 §4.2: default REFWAIT
MAX_STOP_TIMEOUT_S = 60.0  # cap on how long a stopped session keeps its port (its request's Timeout)
MAX_CATCH_UP_S = 1.0  # an OWAMP sender catches up on a Start Time at most this (or Timeout) late


class ReflectPolicer:
    """Server-side caps on one TWAMP reflector session (ServerConfig.max_rate, max_reflected).

    Request-TW-Session states neither rate nor count (RFC 5357 §3.5), so a request cannot
    be refused for them: the reflector polices instead. Wraps the session's ``reflect``:
    a token bucket of ``rate`` packets/s, one second deep (at least BURST packets, so an
    absolute schedule catching up after a stall passes), and at most ``count`` replies.
    What it drops is not reflected and counted in ``policed_rate`` / ``policed_count``."""

    BURST = 16.0

    def __init__(self, reflect: Callable[..., Any], rate: float | None, count: int | None,
                 clock: Callable[[], float] = time.monotonic, shared: Any = None) -> None:
        """``shared``: the client address's bucket (agent.control.admission.TokenBucket, from
        ListenerLimits.max_rate_per_client), taken after this session's own."""
        self._reflect = reflect
        self.rate, self.count = rate, count
        self.depth = max(self.BURST, rate or 0.0)
        self._tokens, self._clock = self.depth, clock
        self._last = clock()
        self._shared = shared
        self.reflected = self.policed_rate = self.policed_count = self.policed_client = 0

    def __call__(self, data: bytes, *args: Any) -> bytes | None:
        if self.count is not None and self.reflected >= self.count:
            self.policed_count += 1
            return None
        if self.rate is not None:
            now = self._clock()
            self._tokens = min(self.depth, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                self.policed_rate += 1
                return None
            self._tokens -= 1.0
        if self._shared is not None and not self._shared.take():
            self.policed_client += 1
            return None
        out = self._reflect(data, *args)
        if out is not None:
            self.reflected += 1
        return out

    def counters(self) -> dict[str, int]:
        return {"policed_rate": self.policed_rate, "policed_count": self.policed_count,
                "policed_client": self.policed_client}


@dataclass
class _TwSession:
    ep: TwampReflectorEndpoint
    peer: tuple[str, int]
    request: m.RequestTWSession
    timer: asyncio.TimerHandle | None = None  # unused since StartGate; kept for subclasses
    policer: ReflectPolicer | None = None
    gate: "StartGate | None" = None

    def counters(self) -> dict[str, int]:
        c = self.ep.counters()
        if self.policer is not None:
            c.update(self.policer.counters())
        if self.gate is not None:
            c["before_start"] = self.gate.early
        return c


class StartGate:
    """Wraps a reflector session's ``reflect`` until Start Time: a packet received (by its
    receive stamp) before Start Time is not answered (RFC 5357 §3.5, "not before"); the
    first one at or after it removes the gate, so the hot path is the plain one again."""

    __slots__ = ("sess", "inner", "not_before_ns", "early")

    def __init__(self, sess, not_before_ns: int) -> None:
        self.sess = sess
        self.inner = sess.reflect
        self.not_before_ns = not_before_ns
        self.early = 0

    def __call__(self, data: bytes, rx_ns: int, *rest):
        if rx_ns < self.not_before_ns:
            self.early += 1
            return None
        self.sess.reflect = self.inner
        return self.inner(data, rx_ns, *rest)


class TwampHandler:
    """Session-Reflector side of one TWAMP control connection (agent.engine.udp endpoints).

    Timing (RFC 5357): a session reflects from Start-Sessions, or from its Start Time if
    that is later (§3.5: "not before Start-Sessions"); after Stop-Sessions it keeps
    reflecting for its request's Timeout (§3.8, capped at ``max_stop_timeout``), then
    closes; a running session that received nothing for ``refwait`` seconds is
    discontinued (§4.2 REFWAIT, default 900 s).
    """

    refwait: float = REFWAIT_S
    max_stop_timeout: float = MAX_STOP_TIMEOUT_S

    def __init__(self, srv: ControlServer) -> None:
        self.srv = srv
        self.sessions: dict[bytes, _TwSession] = {}
        self.active: set[bytes] = set()
        self._loop = asyncio.get_running_loop()
        self._refwait_task: asyncio.Task | None = None

    async def on_event(self, srv: ControlServer, e: ev.Event) -> None:
        if isinstance(e, ev.SessionRequested):
            req = e.request
            assert isinstance(req, m.RequestTWSession)
            peer_ip, local_ip = _control_ips(srv, req)
            sender_ip, _ = req.resolved_addresses(peer_ip, local_ip)
            try:
                ep = await _reflector_endpoint(str(local_ip), req.receiver_port, srv.config.test_ports,
                                               srv.config.test_iface)
            except OSError as err:
                log.info("cannot open a reflector port: %s", err)
                srv.accept_session(m.ACCEPT_TEMPORARY_LIMIT)
                return
            self.sessions[e.sid] = _TwSession(ep, (str(sender_ip), req.sender_port), req)
            srv.accept_session(m.ACCEPT_OK, ep.port, e.sid)
        elif isinstance(e, ev.StartRequested):
            self._start(list(self.sessions))  # RFC 5357 §4.2: reflect only after Start-Sessions
            srv.start_ack(m.ACCEPT_OK)
        elif isinstance(e, ev.StopRequested):
            self._retire(list(self.sessions))
        elif isinstance(e, ev.StartNRequested):
            known = tuple(s for s in e.msg.sids if s in self.sessions)
            if len(known) != len(e.msg.sids):
                srv.start_n_ack(m.ACCEPT_FAILURE, e.msg.sids)
                return
            self._start(list(known))
            srv.start_n_ack(m.ACCEPT_OK, e.msg.sids)
        elif isinstance(e, ev.StopNRequested):
            self._retire([s for s in e.msg.sids if s in self.sessions])
            srv.stop_n_ack(m.ACCEPT_OK, e.msg.sids)

    def _start(self, sids: list[bytes]) -> None:
        now = time.time_ns()
        for sid in sids:
            s = self.sessions[sid]
            if sid in self.active:
                continue
            at = _start_ns(s.request.start_time)
            # RFC 5357 §3.5: a later Start Time wins. The session is registered now and each
            # packet is judged by its receive stamp against Start Time (StartGate): a timer
            # firing at Start Time lost packets that arrived within a loop turn of it.
            self._activate(sid, at if at is not None and at > now else None)

    def _activate(self, sid: bytes, not_before_ns: int | None = None) -> None:
        s = self.sessions.get(sid)
        if s is None or sid in self.active:
            return
        s.timer = None
        req = s.request
        # Replies carry the requested Type-P DSCP (RFC 5357 §3.5); RFC 6038 Reflect Octets
        # when negotiated (the endpoint checks the mode bit).
        sess = s.ep.add_session(sid, s.peer, mode=self.srv.mode, keys=self.srv.test_keys(sid), dscp=req.dscp,
                                reflect_length=req.reflect_length)
        sess.last_rx_ns = time.time_ns()  # REFWAIT counts from the start
        cfg = self.srv.config
        budget = getattr(self.srv, "rate_budget", None)  # set by ControlListener (max_rate_per_client)
        if cfg.max_rate is not None or cfg.max_reflected is not None or budget is not None:
            # The endpoint calls sess.reflect per packet: the instance attribute shadows the
            # method, so the reflector's hot path stays as it is when no cap is set.
            s.policer = ReflectPolicer(sess.reflect, cfg.max_rate, cfg.max_reflected, shared=budget)
            sess.reflect = s.policer  # type: ignore[method-assign]
        if not_before_ns is not None:
            sess.last_rx_ns = not_before_ns  # REFWAIT counts from Start Time
            s.gate = StartGate(sess, not_before_ns)
            sess.reflect = s.gate  # type: ignore[method-assign]
        self.active.add(sid)
        if self._refwait_task is None:
            self._refwait_task = self._loop.create_task(self._watch_refwait())

    async def _watch_refwait(self) -> None:
        """RFC 5357 §4.2: discontinue sessions that received nothing for REFWAIT seconds."""
        period = min(max(self.refwait / 10, 0.05), 30.0)
        while True:
            await asyncio.sleep(period)
            limit = time.time_ns() - int(self.refwait * 1e9)
            for sid in [sid for sid in self.active if sid in self.sessions]:
                sess = self.sessions[sid].ep.session(sid)
                if sess is not None and sess.last_rx_ns < limit:
                    log.info("reflector session %s: nothing for %.0f s (REFWAIT): stopped", sid.hex(), self.refwait)
                    self._retire([sid], 0.0)
                    self.srv.sessions.pop(sid, None)  # no longer counts against the session caps

    def _retire(self, sids: list[bytes], grace: float | None = None) -> None:
        """Keep reflecting late packets for the request's Timeout after the stop (RFC 5357 §3.8)."""
        for sid in sids:
            s = self.sessions.pop(sid)
            if s.timer is not None:
                s.timer.cancel()
            self.active.discard(sid)
            wait = min(_seconds(s.request.timeout), self.max_stop_timeout) if grace is None else grace
            self._loop.call_later(wait, self._finish, sid, s)

    def _finish(self, sid: bytes, s: _TwSession) -> None:
        counters = s.counters()
        s.ep.close()
        log.debug("reflector session %s: %s", sid.hex(), counters)  # one per session cycle: not info
        self._remember(sid, counters)

    finished: dict[bytes, dict[str, int]] = {}  # class-wide: counters of retired sessions (tests, logs)
    MAX_FINISHED = 1024  # the most recent ones only: a long-running server must not grow without bound

    def _remember(self, sid: bytes, counters: dict[str, int]) -> None:
        policed = {k: v for k, v in counters.items() if (k.startswith("policed_") or k in DROP_CAPS) and v}
        if policed:  # the caps that cut this session short: counted and said once per session
            POLICY.update(policed)
            log.info("reflector session %s policed: %s", sid.hex(),
                     ", ".join(f"{k}={v}" for k, v in sorted(policed.items())))
        done = self.finished
        done[sid] = counters
        while len(done) > self.MAX_FINISHED:
            del done[next(iter(done))]

    def close(self) -> None:
        if self._refwait_task is not None:
            self._refwait_task.cancel()
        for sid, s in self.sessions.items():
            if s.timer is not None:
                s.timer.cancel()
            self._remember(sid, s.counters())
            s.ep.close()
        self.sessions.clear()


@dataclass
class _OwSession:
    sid: bytes
    request: m.RequestSession
    receiver_ep: OwampReceiverEndpoint | None = None
    receiver: OwampReceiver | None = None
    peer: tuple[str, int] | None = None
    send_sock: socket.socket | None = None
    dest: tuple[str, int] | None = None
    task: asyncio.Task | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # ends our sending, keeping the count
    sent: int = 0
    next_seqno: int | None = None
    progress: udp.SendProgress = field(default_factory=udp.SendProgress)  # packets sent so far


def schedule_from_slots(sid: bytes, slots: tuple[m.Slot, ...]) -> Schedule:
    """The RFC 4656 §5 schedule of a session: what a receiver (perfSONAR's or ours) checks
    send times against, so both ends must compute it from the SID and the slots."""
    return Schedule.from_slots(sid, [(s.kind, s.value) for s in slots])


class OwampHandler:
    """Receiver (and sender) side of one OWAMP control connection.

    Both roles follow the request's timing (RFC 4656 §3.5, §4.2): as sender we start at
    Start Time (never before Start-Sessions) on the §5 schedule; as receiver we discard
    packets whose send time is more than Timeout from their arrival or from their
    scheduled time."""

    def __init__(self, srv: ControlServer) -> None:
        self.srv = srv
        self.sessions: dict[bytes, _OwSession] = {}

    async def on_event(self, srv: ControlServer, e: ev.Event) -> None:
        if isinstance(e, ev.SessionRequested):
            req = e.request
            assert isinstance(req, m.RequestSession)
            peer_ip, local_ip = _control_ips(srv, req)
            try:
                if req.conf_receiver:  # we receive what the client sends
                    sender_ip, _ = req.resolved_addresses(peer_ip, local_ip)
                    ep = await _receiver_endpoint(str(local_ip), req.receiver_port, srv.config.test_ports,
                                                  srv.config.test_iface)
                    s = _OwSession(e.sid, req, receiver_ep=ep, peer=(str(sender_ip), req.sender_port))
                    port = ep.port
                else:  # we send to the client's receiver
                    _, recv_ip = req.resolved_addresses(local_ip, peer_ip)
                    sock = _bound_test_socket(str(local_ip), req.sender_port, srv.config.test_ports, req.dscp or None)
                    s = _OwSession(e.sid, req, send_sock=sock, dest=(str(recv_ip), req.receiver_port))
                    port = sock.getsockname()[1]
            except OSError as err:
                log.info("cannot set up OWAMP session: %s", err)
                srv.accept_session(m.ACCEPT_TEMPORARY_LIMIT)
                return
            self.sessions[e.sid] = s
            srv.accept_session(m.ACCEPT_OK, port, e.sid)
        elif isinstance(e, ev.StartRequested):
            loop = asyncio.get_running_loop()
            for s in self.sessions.values():
                if s.receiver_ep is not None and s.receiver is None:
                    s.receiver = add_receiver_session(s.receiver_ep, s.sid, s.peer, s.request, srv.mode,
                                                      srv.test_keys(s.sid))
                elif s.send_sock is not None and s.task is None:
                    s.task = loop.create_task(self._send(s))
            srv.start_ack(m.ACCEPT_OK)
        elif isinstance(e, ev.StopRequested):
            # RFC 4656 §3.8, on receipt: drop the records sent within Timeout of now (the
            # client waits Timeout before a normal stop, so only a premature one loses any).
            now = time.time_ns()
            for s in self.sessions.values():
                if s.receiver is not None and (n := s.receiver.stop(now)):
                    log.info("Stop-Sessions: discarded %d records of session %s sent within Timeout "
                             "(RFC 4656 §3.8)", n, s.sid.hex())
            for d in e.stop.descriptions:
                if d.sid in self.sessions:
                    self.sessions[d.sid].next_seqno = d.next_seqno
            descs = await self.stop_sessions()
            srv.send_stop_sessions(m.ACCEPT_OK, descs)
        elif isinstance(e, ev.FetchRequested):
            s = self.sessions.get(e.fetch.sid)
            if s is None or s.receiver is None:
                srv.reject_fetch(m.ACCEPT_FAILURE)
                return
            recs = fetch_records(s.receiver, e.fetch.begin_seq, e.fetch.end_seq, s.next_seqno)
            nxt = s.next_seqno if s.next_seqno is not None else s.request.num_packets
            # RFC 4656 §3.9: "A reproduction of the Request-Session command ... modified so that
            # actual sender and receiver port numbers that were used ... always appear in the
            # reproduction"; and the SID the session ran under, not the request's zeros.
            used = dataclasses.replace(s.request, sid=s.sid, receiver_port=s.receiver_ep.port if s.receiver_ep
                                       else s.request.receiver_port)
            srv.send_fetch_response(m.FetchAck(m.ACCEPT_OK, s.next_seqno is not None, nxt, 0, len(recs)),
                                    used, (), recs)

    async def stop_sessions(self, timeout: float = 2.0) -> tuple[m.SessionDescription, ...]:
        """Stop the sessions we send and describe them for Stop-Sessions: RFC 4656 §3.8
        Next Seqno = packets actually sent (both sides send Stop-Sessions in OWAMP). Also
        ControlListener.abort's hook for a server-initiated stop."""
        tasks = []
        for s in self.sessions.values():
            s.stop.set()
            if s.task is not None and not s.task.done():
                tasks.append(s.task)
        if tasks:  # the senders return at once; the timeout only guards against a stuck one
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for t in late:
                t.cancel()
        return tuple(m.SessionDescription(s.sid, s.progress.sent) for s in self.sessions.values()
                     if s.send_sock is not None)

    async def _send(self, s: _OwSession) -> None:
        req = s.request
        assert s.send_sock is not None and s.dest is not None
        at = _start_ns(req.start_time)  # the task starts at Start-Sessions: never earlier
        now = time.time_ns()
        if at is not None and now - at > max(_seconds(req.timeout), MAX_CATCH_UP_S) * 1e9:
            at = now  # a Start Time long past (skewed client clock): no burst of overdue packets
        await udp.run_twamp_sender(
            ("", 0), s.dest, self.srv.mode, self.srv.test_keys(s.sid), count=req.num_packets,
            schedule=schedule_from_slots(s.sid, req.slots), padding=req.padding_length, proto=Proto.OWAMP,
            sock=s.send_sock, iface=self.srv.config.test_iface, hardware=bool(self.srv.config.test_iface),
            start_ns=at, stop=s.stop,  # at None: now; recent past: catch up
            progress=s.progress, keep_records=False)  # a count, not 2**20 records (issue 11 row 3)
        s.sent = s.progress.sent

    def close(self) -> None:
        for s in self.sessions.values():
            if s.receiver is not None:
                capped = {k: v for k, v in s.receiver.counters.as_dict().items() if k in DROP_CAPS and v}
                if capped:  # e.g. one packet replayed over and over: counted, never stored
                    POLICY.update(capped)
                    log.info("receiver session %s capped: %s", s.sid.hex(),
                             ", ".join(f"{k}={v}" for k, v in sorted(capped.items())))
            if s.receiver_ep is not None:
                s.receiver_ep.close()
            sock = s.send_sock
            if s.task is not None and not s.task.done() and sock is not None:
                # The sender still has the socket registered: close it once the cancelled
                # task has let go of it, not under its feet (shutdown while sending).
                s.task.add_done_callback(lambda _t, sock=sock: sock.close())
                s.task.cancel()
            elif sock is not None:
                sock.close()
        self.sessions.clear()


class SaBoundHandler:
    """Wraps a connection handler (TwampHandler, OwampHandler): an IPsec-bound connection
    lives as long as its SA pair. When the binder's RekeyTracker says Stop (deleted, no
    successor within the grace period; wire-format §5) the connection is aborted with
    Stop-Sessions Accept=2 through ``abort(srv, accept)`` (ControlListener.abort). On a
    Rebind nothing happens here: the client stops, reconnects and binds to the new pair.
    ``runtime`` is an agent.sessions.bound.BinderRuntime (its ``keys`` made the binding)."""

    def __init__(self, inner: Any, srv: ControlServer, runtime: Any,
                 abort: Callable[[ControlServer, int], object]) -> None:
        self.inner, self.srv, self.runtime, self._abort = inner, srv, runtime, abort
        self.key: tuple[str, int] | None = None
        self.stopped: str | None = None  # the Stop's reason, e.g. "sa_deleted"

    def __getattr__(self, name: str) -> Any:  # the inner handler's optional hooks (OWAMP stop_sessions)
        return getattr(self.inner, name)

    async def on_event(self, srv: ControlServer, e: ev.Event) -> None:
        if isinstance(e, ev.SetupComplete) and self.key is None:
            from agent.binder.announce import IPSEC_BITS
            from agent.binder.keys import BinderRefusal

            if e.mode & IPSEC_BITS and srv.context is not None:
                try:  # made when the greeting announced it; the key source keeps it per connection
                    binding = self.runtime.keys.binding(srv.context)
                except BinderRefusal as err:
                    log.info("control peer %s: %s", srv.peer, err)
                    self._abort(srv, m.ACCEPT_INTERNAL_ERROR)
                    return
                self.key = ("server", id(self))
                self.runtime.bind(self.key, binding, self._on_action)
        await self.inner.on_event(srv, e)

    def _on_action(self, action: Any) -> None:
        from agent.binder.announce import Stop

        self.key = None  # the tracker dropped it
        if isinstance(action, Stop):
            self.stopped = action.reason.value
            log.info("control peer %s: SA pair gone (%s): stopping its sessions", self.srv.peer, self.stopped)
            self._abort(self.srv, m.ACCEPT_INTERNAL_ERROR)

    def close(self) -> None:
        if self.key is not None:
            self.runtime.release(self.key)
            self.key = None
        self.inner.close()


def add_receiver_session(ep: OwampReceiverEndpoint, sid: bytes, peer: tuple[str, int] | None,
                         req: m.RequestSession, mode: int, keys) -> OwampReceiver:
    """An OWAMP receiver for ``req`` with its RFC 4656 §4.2 validity window: Timeout (0 =
    no check), and the §5 schedule from Start Time (when one was given)."""
    start = _start_ns(req.start_time)
    return ep.add_session(sid, peer, mode=mode, keys=keys, expected=req.num_packets,
                          timeout_s=_seconds(req.timeout) if req.timeout else None,
                          schedule=schedule_from_slots(sid, req.slots) if start is not None else None,
                          start_ns=start)


def fetch_records(rcv: OwampReceiver, begin: int, end: int, next_seqno: int | None) -> tuple[m.DataRecord, ...]:
    """RFC 4656 §3.8 records (the receiver encodes them; lost packets below Next Seqno
    included), parsed into DataRecords for the Fetch-Session answer."""
    raw = rcv.fetch_records(begin, end, next_seqno)
    size = m.DataRecord.SIZE
    return tuple(m.DataRecord.unpack(raw[o:o + size]) for o in range(0, len(raw) - len(raw) % size, size))


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
    features: int = 0  # TWAMP capability bits to select when offered (RFC 5938, RFC 6038)
    reflect_length: int = 0  # RFC 6038 Length of padding to reflect (selects Reflect Octets)
    local_addr: str | None = None  # source address of control and test traffic (a tunnel's inner address)
    iface: str | None = None  # hardware stamps from this NIC (switched on if off; docs/timestamping.md)


@dataclass
class PingResult:
    records: list[PacketRecord]
    summary: results.Summary
    mode: int
    counters: dict[str, int]
    peer: str
    sid: bytes = b""


def _hardware_stamps(iface: str | None) -> bool:
    """Opt in to hardware stamps on ``iface``: the NIC is configured (TX on; RX all, else
    ntp-all, else software RX) unless someone else's config is in place."""
    from agent.engine import timestamping as ts

    return ts.hardware_opt_in(iface)


def _duration_ntp(s: float) -> int:
    return int(s * NTP_SECOND)


async def twamp_ping(opt: PingOptions, on_record: Callable[[PacketRecord], None] | None = None,
                     stop: asyncio.Event | None = None) -> PingResult:
    """One TWAMP conversation: set-up, Request-TW-Session, Start, packets, Stop.

    ``stop``: once set, sending ends and the conversation finishes normally (Stop-Sessions)
    with the records so far.

    ``opt.reflect_length`` > 0 selects RFC 6038 Reflect Octets (refused if the server does
    not offer it): the request carries a random 16-bit Octets to be reflected that the
    Accept-Session must echo, and every reply must carry our padding to be reflected."""
    features = opt.features | (int(Mode.REFLECT_OCTETS) if opt.reflect_length else 0)
    conn = await AsyncControlClient.connect(opt.host, opt.port, twamp=True, wanted=opt.wanted, key_id=opt.key_id,
                                            key_source=opt.key_source, max_count=opt.max_count, timeout=opt.timeout,
                                            family=family_of(opt.host), features=features,
                                            local_addr=opt.local_addr)
    sock: socket.socket | None = None
    try:
        mode = conn.cli.mode
        reflect = opt.reflect_length if mode & Mode.REFLECT_OCTETS else 0
        if opt.reflect_length and not reflect:
            raise ControlError("the server does not offer RFC 6038 Reflect Octets")
        local_ip, peer_ip = conn.local[0], conn.peer[0]
        sock = udp.open_udp_socket((str(local_ip), 0), dscp=opt.dscp or None)
        sec = security_from_mode(mode)
        pad = opt.padding if opt.padding is not None else symmetric_padding(Proto.TWAMP, sec)
        refl_at = reflect_offset(mode)
        if reflect:  # the octets to be reflected must fit in our padding
            pad = max(pad, refl_at - sender_base_len(Proto.TWAMP, sec) + reflect)
        token = int.from_bytes(os.urandom(2), "big") | 1 if reflect else 0
        req = m.RequestTWSession(local_ip, peer_ip, sock.getsockname()[1], opt.test_port, padding_length=pad,
                                 timeout=_duration_ntp(opt.wait), type_p=m.typep_from_dscp(opt.dscp),
                                 octets_to_reflect=token, reflect_length=reflect)
        try:
            acc = await conn.request_tw_session(req)
        except ConnectionLost as e:
            # An OWAMP server greets like a TWAMP one (RFC 4656 §3.1) and only drops the
            # connection at Request-TW-Session, a command OWAMP does not have.
            raise ControlError(f"{e} at Request-TW-Session: port {conn.peer[1]} does not speak TWAMP-Control "
                               f"(an OWAMP server? TWAMP-Control is TCP 862, OWAMP-Control 861)") from None
        if not acc.ok:
            raise ControlError(f"session refused: {m.ACCEPT_NAMES[acc.accept.accept]}")
        if reflect and acc.accept.reflected_octets != token:  # RFC 6038 §4.1: echoed as sent
            raise ControlError("Accept-Session did not echo our Octets to be reflected")
        if await conn.start_sessions() != m.ACCEPT_OK:
            raise ControlError("Start-Sessions refused")
        records = await udp.run_twamp_sender(
            ("", 0), (str(peer_ip), acc.accept.port), mode, acc.test_keys, count=opt.count,
            interval=opt.interval, schedule=opt.schedule, padding=pad, timeout=opt.wait, sock=sock,
            on_record=on_record, iface=opt.iface, hardware=_hardware_stamps(opt.iface),
            reflect=(refl_at, reflect) if reflect else None,
            server_octets=acc.accept.server_octets if reflect else 0, stop=stop)
        await conn.stop_sessions(1)
        counters = {"sent": len(records), "replies": sum(1 for r in records if not r.lost)}
        if reflect:
            counters["reflect_mismatch"] = sum(1 for r in records if r.reflected_ok is False)
        return PingResult(records, results.summarize(records, reflector_stateful=True), mode,
                          counters, str(peer_ip), acc.accept.sid)
    finally:
        if sock is not None:
            sock.close()
        if opt.iface:  # leave the NIC's stamping as we found it
            from agent.engine import timestamping as ts

            ts.restore_nic_configs()
        await conn.close()


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


async def owping(opt: PingOptions, stop: asyncio.Event | None = None) -> OwpingResult:
    """OWAMP both ways: we send to the server's receiver and fetch its records (forward);
    the server sends to our receiver (reverse).

    ``stop``: once set, our sending ends and we send Stop-Sessions with the packets sent
    so far (RFC 4656 §3.8), then fetch as usual: a stopped session keeps its results."""
    conn = await AsyncControlClient.connect(opt.host, opt.port, twamp=False, wanted=opt.wanted, key_id=opt.key_id,
                                            key_source=opt.key_source, max_count=opt.max_count, timeout=opt.timeout,
                                            family=family_of(opt.host), local_addr=opt.local_addr)
    send_sock: socket.socket | None = None
    recv_ep: OwampReceiverEndpoint | None = None
    try:
        local_ip, peer_ip = conn.local[0], conn.peer[0]
        slot = m.Slot.seconds(m.Slot.EXPONENTIAL if opt.schedule == "poisson" else m.Slot.FIXED, opt.interval)
        pad = opt.padding or 0
        send_sock = udp.open_udp_socket((str(local_ip), 0), dscp=opt.dscp or None)
        recv_ep = await _receiver_endpoint(str(local_ip), 0, None, opt.iface if _hardware_stamps(opt.iface) else None)
        # RFC 4656 §3.5: Start Time is when sending begins (never before Start-Sessions); a
        # short lead keeps it in the future while the requests and Start-Sessions go out.
        start_ns = time.time_ns() + int(START_LEAD_S * _NS)
        common = dict(padding_length=pad, timeout=_duration_ntp(opt.wait), type_p=m.typep_from_dscp(opt.dscp),
                      num_packets=opt.count, slots=(slot,), start_time=ntp_from_unix_ns(start_ns))
        fwd = await conn.request_session(m.RequestSession(local_ip, peer_ip, send_sock.getsockname()[1],
                                                          opt.test_port, conf_sender=False, conf_receiver=True,
                                                          **common))
        if not fwd.ok:
            raise ControlError(f"forward session refused: {m.ACCEPT_NAMES[fwd.accept.accept]}")
        # We receive the reverse session, so we make its SID (RFC 4656 §3.5).
        my_sid = m.make_sid(local_ip, ntp_from_unix_ns(time.time_ns()))
        rev = await conn.request_session(m.RequestSession(peer_ip, local_ip, 0, recv_ep.port, sid=my_sid,
                                                          conf_sender=True, conf_receiver=False, **common))
        if not rev.ok:
            raise ControlError(f"reverse session refused: {m.ACCEPT_NAMES[rev.accept.accept]}")
        # Match the server's packets by address only: we do not rely on Accept-Session's Port
        # naming the server's source port for a Conf-Sender session (not checked against RFC text).
        receiver = add_receiver_session(recv_ep, my_sid, (str(peer_ip), 0), rev.request, conn.cli.mode,
                                        conn.cli.test_keys(my_sid))
        if await conn.start_sessions() != m.ACCEPT_OK:
            raise ControlError("Start-Sessions refused")
        sent = await udp.run_twamp_sender(
            ("", 0), (str(peer_ip), fwd.accept.port), conn.cli.mode, fwd.test_keys, count=opt.count,
            schedule=schedule_from_slots(fwd.accept.sid, (slot,)), padding=pad, proto=Proto.OWAMP, sock=send_sock,
            iface=opt.iface, hardware=_hardware_stamps(opt.iface), start_ns=start_ns,
            stop=stop)  # late: catch up, later packets stay on schedule
        loop = asyncio.get_running_loop()
        end = loop.time() + opt.wait + opt.interval
        # RFC 4656 §3.8: the receiver "MUST discard any packet records ... with a (computed)
        # send time that falls between the current time minus Timeout and the current time",
        # and "each side ... SHOULD wait until all sessions are complete before sending the
        # Stop-Sessions message", complete being "Timeout after the scheduled time for the
        # last sequence number" (plus "a small increment"). Our last packet's send time is at
        # or after its scheduled time, so Stop-Sessions goes no earlier than that + Timeout.
        # A stop (Ctrl-C) ends our sending at once but still waits out Timeout after the last
        # packet we did send: a premature Stop-Sessions would make the server discard them.
        fwd_done_ns = max((r.t1_ns for r in sent), default=time.time_ns()) + int(opt.wait * _NS) + STOP_MARGIN_NS
        while True:
            rev_done = (stop is not None and stop.is_set()) or len(receiver.records) >= opt.count \
                or loop.time() >= end
            if rev_done and time.time_ns() >= fwd_done_ns:
                break
            await asyncio.sleep(0.01)
        stop = await conn.stop_sessions(1, m.ACCEPT_OK, (m.SessionDescription(fwd.accept.sid, len(sent)),))
        receiver.stop(time.time_ns())  # §3.8 applies to us as the reverse session's receiver too
        their_sent = opt.count
        if stop is not None:
            for d in stop.descriptions:
                if d.sid == my_sid:
                    their_sent = d.next_seqno
        fetched = await conn.fetch_session(fwd.accept.sid, timeout=opt.timeout)
        if fetched.ack.accept != m.ACCEPT_OK:
            raise ControlError(f"Fetch-Session refused: {m.ACCEPT_NAMES[fetched.ack.accept]}")
        rev_records = fetch_records(receiver, 0, 0xFFFFFFFF, their_sent)
        # Our receiver writes a record, received or lost, for every seq below Next Seqno but
        # those §3.8 discarded (sent within Timeout of the stop): they are not lost, they
        # are out of the measurement, so the reverse direction's count is the records'.
        rev_sent = len({r.seq for r in rev_records})
        return OwpingResult(one_way_stats(fetched.records, len(sent)), one_way_stats(rev_records, rev_sent),
                            conn.cli.mode, fetched.records, rev_records, receiver.counters.as_dict())
    finally:
        if send_sock is not None:
            send_sock.close()
        if recv_ep is not None:
            recv_ep.close()
        await conn.close()


