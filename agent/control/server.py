"""Sans-IO O/TWAMP-Control server (RFC 4656 §3, RFC 5357 §3, RFC 5938).

    srv = ControlServer(twamp=True, config=ServerConfig(...), key_source=..., local=..., peer=...)
    sock.send(srv.data_to_send())                # the Server-Greeting
    for event in srv.receive_data(sock.recv()):  # SessionRequested, StartRequested, ...
        ... srv.accept_session(...) / srv.start_ack(...) ...
    sock.send(srv.data_to_send())
    if srv.closed: sock.close()

The state machine answers by itself whatever needs no application decision:
bad passphrases and modes not offered (Server-Start Accept != 0, then close),
requests over the per-connection session cap, malformed input (close).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from agent.control import events as ev
from agent.control import messages as m
from agent.control import modes as md
from agent.control._conn import _Conn
from agent.control.authguard import AuthGuard
from agent.control.states import (
    COMMANDS,
    INITIAL,
    SEND,
    Decision,
    Msg,
    Role,
    State,
    UsageError,
    on_answer,
    on_receive,
    on_send,
    on_unknown_command,
)
from agent.control.keyring import (
    HandshakeContext,
    IPAddress,
    Pbkdf2Job,
    SetupRefused,
    TokenRejected,
    hooked_open_token,
    open_client_token,
    token_key_or_job,
)
from agent.control.messages import ProtocolError
from agent.control.security import (
    DEFAULT_SERVER_COUNT,
    MIN_COUNT,
    RecvStream,
    SendStream,
    SessionKeys,
)
from agent.engine.timefmt import ntp_from_unix_ns
from netlink.secret import Secret

log = logging.getLogger(__name__)

# What an unknown KeyID is derived against: the refusal then costs what a known one's does,
# so response time does not tell which identities exist (issue 11, item 6).
_DUMMY_PASSPHRASE = Secret(os.urandom(32))


# perfSONAR's documented testports example: a range operators already open in firewalls.
DEFAULT_TEST_PORTS = (8760, 9960)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    modes: int = md.Mode.UNAUTHENTICATED | md.Mode.AUTHENTICATED | md.Mode.ENCRYPTED | md.Mode.MIXED
    count: int = DEFAULT_SERVER_COUNT  # PBKDF2 iterations we ask clients to spend (and spend ourselves)
    max_sessions: int = 16  # per control connection
    max_packets: int = 1 << 20  # OWAMP Number of Packets we accept in one session
    max_padding: int = 65000
    max_slots: int = 1 << 12
    # OWAMP Conf-Sender makes the server send a packet stream to the Receiver Address: only
    # to the control connection's peer unless allowed, or the server is a traffic cannon.
    allow_third_party_receivers: bool = False
    # A Start Time further ahead than this is refused: the session would hold a port idle.
    max_start_delay: float = 3600.0
    # Packets per second one test session may send (None: no cap). OWAMP requests carry
    # their schedule, so one over the cap is refused (Accept=4); a TWAMP Request-TW-Session
    # carries neither rate nor count (RFC 5357 §3.5), so the reflector polices instead
    # (agent.sessions.session.TwampHandler): what exceeds the rate is not reflected.
    max_rate: float | None = None
    # Packets one TWAMP reflector session answers at most (None: no cap); OWAMP: max_packets.
    max_reflected: int | None = None
    # UDP test ports (first, last) the server binds; like twampd's testports. Never below
    # 1024: a peer must not make us squat IKE (500/4500), DNS or NTP (issue 11 row 5).
    test_ports: tuple[int, int] = DEFAULT_TEST_PORTS
    # NIC whose hardware stamps the test sessions' sockets use (None: software stamps); the
    # command or agent switched its stamping on (agent.engine.timestamping.hardware_opt_in).
    test_iface: str | None = None
    # Plain unauthenticated mode (no key mode): False when the server has keys and was not
    # asked for it (a keyed or IPsec-bound unauth mode still works).
    allow_plain_unauth: bool = True
    # Counts and rate-limits failed authentications per source address (None: neither).
    # Shared by every connection (and listener) given this config: it holds state.
    auth_guard: AuthGuard | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.count < MIN_COUNT or self.count & (self.count - 1):
            raise ValueError("count must be a power of two >= 1024")
        if self.max_rate is not None and not self.max_rate > 0:
            raise ValueError("max_rate must be > 0 packets/s")
        if self.max_reflected is not None and self.max_reflected < 1:
            raise ValueError("max_reflected must be >= 1")
        lo, hi = self.test_ports
        if not 1024 <= lo <= hi <= 65535:
            raise ValueError("test ports must be a range within 1024-65535")


@dataclass
class ServerSession:
    sid: bytes
    request: m.RequestSession | m.RequestTWSession
    port: int


class ControlServer(_Conn):
    role = Role.SERVER

    def __init__(
        self,
        twamp: bool = True,
        config: ServerConfig = ServerConfig(),
        key_source: object | None = None,
        local: tuple[IPAddress, int] | None = None,
        peer: tuple[IPAddress, int] | None = None,
        refuse: bool = False,
        now_ntp: Callable[[], int] | None = None,
        uptime_ntp: int | None = None,
        defer_keys: bool = False,
    ) -> None:
        super().__init__(twamp, defer_keys)
        self.config = config
        self._key_source = key_source
        self.local = local
        self.peer = peer
        self._now = now_ntp or (lambda: ntp_from_unix_ns(time.time_ns()))
        self._uptime = uptime_ntp if uptime_ntp is not None else self._now()
        self.sessions: dict[bytes, ServerSession] = {}
        self._pending: tuple[m.RequestSession | m.RequestTWSession, bytes] | None = None
        self._awaiting: Decision | None = None  # which application answer we wait for
        self.key_id = ""
        self._resume_state = State.REQUEST  # where WAIT_APP returns to (states.RESUME)
        offered = md.offerable(config.modes, twamp)
        if key_source is None:  # without keys only unauthenticated mode can work
            offered &= ~int(md.Mode.AUTHENTICATED | md.Mode.ENCRYPTED | md.Mode.MIXED)
        if refuse:
            offered = 0  # Modes = 0: "server does not wish to talk" (RFC 4656 §3.1)
        challenge, salt = os.urandom(16), os.urandom(16)
        ctx = HandshakeContext("server", "twamp" if twamp else "owamp", local, peer, 0, salt, config.count)
        extra = None
        hook = getattr(key_source, "greeting_extra", None)
        if hook is not None and not refuse:
            try:
                extra = hook(ctx)
            except Exception:  # a failing key source must not take the listener down
                log.exception("greeting_extra failed: not offering announced key modes")
        unused = bytes(extra) if extra else bytes(12)
        if len(unused) != 12:
            raise ValueError("greeting_extra must return 12 octets")
        serves = getattr(key_source, "serves_key_mode", None)
        for b, k in md.key_modes(twamp).items():
            if k.announced and not any(unused):  # no announcement: nothing to key the announced modes from
                offered &= ~int(b)  # int: ~ on an IntFlag only spans its members
            elif not k.announced and not (serves is not None and serves(b, ctx.protocol)):
                offered &= ~int(b)  # e.g. RFC 7717 without an IKE key source
        self._ctx = HandshakeContext(ctx.role, ctx.protocol, local, peer, 0, salt, config.count, unused)
        self.offered = int(offered)
        self.greeting = m.ServerGreeting(offered, challenge, salt, config.count, unused)
        self._out += self.greeting.pack()
        if refuse:
            self.close("refused: server busy")
        else:
            self.state = INITIAL[self.role]

    # ------------------------------------------------------------------ input
    def _step(self) -> list[ev.Event] | None:
        if self.state == State.SETUP:
            return self._on_setup()
        if self.state in (State.REQUEST, State.TEST):
            return self._on_command()
        return None  # WAIT_APP / WAIT_KEY: pipelined input waits (states.HOLD_STATES)

    def _on_setup(self) -> list[ev.Event] | None:
        if not self._have(m.SetUpResponse.SIZE):
            return None
        on_receive(self.role, self.proto, self.state, Msg.SET_UP_RESPONSE)
        resp = m.SetUpResponse.unpack(self._recv.take(m.SetUpResponse.SIZE))
        if resp.mode == 0:
            return [self.close("client declined all offered modes")]
        try:
            sec, keymode, features = md.split_mode(resp.mode, self.twamp)
        except ValueError as e:
            return self._reject_setup(m.ACCEPT_NOT_SUPPORTED, str(e))
        if resp.mode & ~int(self.offered):
            return self._reject_setup(m.ACCEPT_NOT_SUPPORTED, f"mode {resp.mode} not offered")
        if keymode is not None and not sec.control_crypto and not keymode.with_unauth:
            return self._reject_setup(m.ACCEPT_NOT_SUPPORTED, f"{keymode.name} needs a keyed mode")
        if keymode is None and not sec.control_crypto and not sec.test_auth and not self.config.allow_plain_unauth:
            return self._reject_setup(m.ACCEPT_NOT_SUPPORTED, "plain unauthenticated mode not allowed")
        self.mode = resp.mode
        self.key_id = resp.key_id
        ctx = HandshakeContext(self._ctx.role, self._ctx.protocol, self.local, self.peer, resp.mode,
                               self.greeting.salt, self.greeting.count, self.greeting.unused, resp.key_id_raw)
        self._ctx = ctx
        if not sec.control_crypto:
            return self._start_control(None, sec.test_auth, resp.client_iv)
        challenge = self.greeting.challenge
        guard, addr = self.config.auth_guard, self.peer[0] if self.peer is not None else None
        if guard is not None and addr is not None and not guard.allow(addr):
            # this address spent its failure budget: no derivation for it until it refills
            return self._reject_setup(m.ACCEPT_TEMPORARY_LIMIT, "authentication rate limit")
        # Key-source hooks run here (they may keep state); only PBKDF2 may leave the loop.
        try:
            keys = hooked_open_token(self._key_source, resp.key_id, ctx, challenge, resp.token)
            key = None if keys is not None else token_key_or_job(self._key_source, resp.key_id, ctx)
        except TokenRejected:
            return self._auth_failed("bad_token", "authentication failed")
        except SetupRefused as e:  # e.g. RFC 7717 §5.3: no IKE SA for the KeyID -> Accept=6
            return self._reject_setup(e.accept, str(e))
        except Exception:
            log.exception("key source failed")
            return self._reject_setup(m.ACCEPT_INTERNAL_ERROR, "key source failed")
        if keys is not None:
            return self._start_control(keys, sec.test_auth, resp.client_iv)
        unknown = key is None
        if key is None:  # the same work as a known identity, then the same refusal
            key = Pbkdf2Job(_DUMMY_PASSPHRASE, self.greeting.salt, self.greeting.count)

        def opened(result: object, error: BaseException | None) -> list[ev.Event]:
            if error is not None:
                log.error("key derivation failed: %s", type(error).__name__)
                return self._reject_setup(m.ACCEPT_INTERNAL_ERROR, "key derivation failed")
            assert isinstance(result, Secret)
            try:
                opened_keys = open_client_token(result, challenge, resp.token)
            except TokenRejected:
                return self._auth_failed("unknown_key" if unknown else "bad_token",
                                         "unknown key identity" if unknown else "authentication failed")
            if unknown:  # pragma: no cover - a Token that opens with the random dummy key
                return self._auth_failed("unknown_key", "unknown key identity")
            return self._start_control(opened_keys, sec.test_auth, resp.client_iv)

        if isinstance(key, Pbkdf2Job):
            return self._derive(key, opened)
        return opened(key, None)

    def _start_control(self, keys: SessionKeys | None, test_auth: bool, client_iv: bytes) -> list[ev.Event]:
        """Server-Start Accept=0; with keys, both directions switch to AES-CBC + HMAC (RFC 4656 §3.1)."""
        server_iv = os.urandom(16)
        if keys is not None:
            self._keys = keys
            self._test_plane_secure = test_auth
            self._send = SendStream(keys, server_iv)
            self._switch_recv(RecvStream(keys, client_iv))
        start = m.ServerStart(m.ACCEPT_OK, server_iv, self._uptime).pack()
        self._out += start[:32]  # clear part; Start-Time opens our stream and our HMAC chain
        self._emit(start[32:])
        row = on_receive(self.role, self.proto, State.SETUP, Msg.SET_UP_RESPONSE)
        self.state = State(row.ok)
        return [ev.SetupComplete(self.mode, self.key_id)]

    def _auth_failed(self, kind: str, reason: str) -> list[ev.Event]:
        """Server-Start Accept=1 (RFC 4656 §3.1), counted against the peer's address."""
        guard = self.config.auth_guard
        if guard is not None and self.peer is not None:
            guard.failed(self.peer[0], kind)
        return self._reject_setup(m.ACCEPT_FAILURE, reason)

    def _reject_setup(self, accept: int, reason: str) -> list[ev.Event]:
        self._out += m.ServerStart(accept, os.urandom(16), 0).pack()  # all clear: no keys agreed
        self.close(reason)
        return [ev.SetupRejected(accept, reason)]

    def _on_command(self) -> list[ev.Event] | None:
        if not self._have(16):
            return None
        first = bytes(self._recv.plain[:16])
        cmd = first[0]
        kind = COMMANDS.get(cmd)
        if kind is None:
            raise on_unknown_command(self.role, self.proto, self.state, cmd)
        row = on_receive(self.role, self.proto, self.state, kind)  # refuses what has no row
        if cmd == m.CMD_REQUEST_TW_SESSION:
            msg = self._take(m.RequestTWSession.SIZE, m.RequestTWSession.hmac_offsets())
            return None if msg is None else self._on_request(m.RequestTWSession.unpack(msg), row.ok)
        if cmd == m.CMD_REQUEST_SESSION:
            n = m.RequestSession.length_from_first_block(first)
            nslots = (n - 128) // 16
            if nslots > self.config.max_slots:
                raise ProtocolError("too many schedule slots")
            msg = self._take(n, (96, n - 16))
            return None if msg is None else self._on_request(m.RequestSession.unpack(msg), row.ok)
        if cmd == m.CMD_START_SESSIONS:
            msg = self._take(32, m.StartSessions.hmac_offsets())
            if msg is None:
                return None
            m.StartSessions.unpack(msg)
            self._decide(row.ok)
            return [ev.StartRequested()]
        if cmd == m.CMD_STOP_SESSIONS:
            if self.owamp and int.from_bytes(first[4:8], "big") > len(self.sessions):
                # RFC 4656 §3.8: one description per session the client sent; no more
                # (checked on the first block, before we wait for the rest)
                raise ProtocolError("Stop-Sessions describes more sessions than were requested")
            stop = self._take_stop()
            if stop is None:
                return None
            for d in stop.descriptions:  # the receiver bounds them (OwampReceiver.fetch_records)
                s = self.sessions.get(d.sid)
                n = s.request.num_packets if s is not None and isinstance(s.request, m.RequestSession) else None
                if n is not None and d.next_seqno > n:
                    log.info("control peer %s: Stop-Sessions Next Seqno %d over Number of Packets %d: bounded",
                             self.peer, d.next_seqno, n)
            if self.twamp:
                self.sessions.clear()
            self._decide(row.ok)
            return [ev.StopRequested(stop)]
        if cmd == m.CMD_FETCH_SESSION:
            msg = self._take(48, m.FetchSession.hmac_offsets())
            if msg is None:
                return None
            self._decide(row.ok)
            return [ev.FetchRequested(m.FetchSession.unpack(msg))]
        if cmd in (m.CMD_START_N_SESSIONS, m.CMD_STOP_N_SESSIONS):
            cls = m.StartNSessions if cmd == m.CMD_START_N_SESSIONS else m.StopNSessions
            n = cls.needed_length(bytes(self._recv.plain))
            if n is None:
                return None
            msg = self._take(n, (n - 16,))
            if msg is None:
                return None
            parsed = cls.unpack(msg)
            if not parsed.sids:  # RFC 5938 §3.2, §3.4: Number of Sessions "MUST be one or greater"
                raise ProtocolError(f"{kind} with no session")
            self._decide(row.ok)
            if cmd == m.CMD_START_N_SESSIONS:
                return [ev.StartNRequested(parsed)]
            return [ev.StopNRequested(parsed)]
        raise ProtocolError(f"unknown command {cmd}")  # pragma: no cover - COMMANDS filters

    def _decide(self, nxt: State | Decision) -> None:
        """Take the row's next state; a Decision holds in WAIT_APP for the application."""
        if isinstance(nxt, Decision):
            self._awaiting, self._resume_state, self.state = nxt, self.state, State.WAIT_APP
        else:
            self.state = nxt

    def _on_request(self, req: m.RequestSession | m.RequestTWSession, nxt: State | Decision) -> list[ev.Event]:
        refuse: tuple[int, str] | None = None
        if len(self.sessions) >= self.config.max_sessions:
            refuse = (m.ACCEPT_PERMANENT_LIMIT, "session limit for this connection reached")
        elif req.padding_length > self.config.max_padding:
            refuse = (m.ACCEPT_NOT_SUPPORTED, "padding too large")
        elif isinstance(req, m.RequestTWSession) and req.reflect_length > self.config.max_padding:
            refuse = (m.ACCEPT_NOT_SUPPORTED, "padding to reflect too large")
        elif req.start_time and req.start_time - self._now() > int(self.config.max_start_delay * (1 << 32)):
            refuse = (m.ACCEPT_NOT_SUPPORTED, "Start Time too far ahead")
        elif isinstance(req, m.RequestSession) and req.conf_sender and req.conf_receiver:
            refuse = (m.ACCEPT_NOT_SUPPORTED, "a session between two third parties")  # RFC 4656 §3.5
        elif req.dscp is None:
            refuse = (m.ACCEPT_NOT_SUPPORTED, "Type-P descriptor is not a DSCP")
        elif isinstance(req, m.RequestSession) and req.num_packets > self.config.max_packets:
            refuse = (m.ACCEPT_PERMANENT_LIMIT, "too many packets")  # a policy cap: asking again will not help
        elif (isinstance(req, m.RequestSession) and self.config.max_rate is not None
              and slots_rate(req.slots) > self.config.max_rate * RATE_SLACK):
            refuse = (m.ACCEPT_PERMANENT_LIMIT, "packet rate over the server's cap")
        elif (isinstance(req, m.RequestSession) and req.conf_sender and self.peer is not None
              and not self.config.allow_third_party_receivers
              and not req.receiver_address.is_unspecified and req.receiver_address != self.peer[0]):
            refuse = (m.ACCEPT_FAILURE, "receiver address is not the control peer")
        if refuse is not None:
            self._emit(m.AcceptSession(refuse[0]).pack(), m.AcceptSession.hmac_offsets())
            return [ev.SessionRefused(req, refuse[0], refuse[1])]
        # The receiver of the test packets makes the SID (RFC 4656 §3.5): the server when it
        # reflects (TWAMP) or receives (OWAMP Conf-Receiver), else the client sent its own.
        if isinstance(req, m.RequestSession) and req.conf_sender:
            sid = req.sid
        else:
            recv = req.receiver_address
            if recv.is_unspecified and self.local is not None:
                recv = self.local[0]
            sid = m.make_sid(recv, self._now())
        self._pending = (req, sid)
        self._decide(nxt)
        return [ev.SessionRequested(req, sid)]

    # ------------------------------------------------------------------ application answers
    def _answer(self, what: Decision) -> None:
        if self.closed:
            raise UsageError("connection closed")
        if self._awaiting != what:
            raise UsageError(f"not waiting for {what} (waiting for {self._awaiting})")
        self._awaiting = None

    def _answered(self, what: Decision, accepted: bool) -> None:
        self.state = on_answer(self.proto, what, accepted, self._resume_state)

    def accept_session(self, accept: int, port: int = 0, sid: bytes | None = None,
                       server_octets: int = 0) -> ServerSession | None:
        """Answer the pending SessionRequested. Returns the session record if accepted.

        With RFC 6038 Reflect Octets negotiated, Accept-Session echoes the request's Octets
        to be reflected and carries ``server_octets`` (0: we need none)."""
        self._answer(Decision.ACCEPT)
        assert self._pending is not None
        req, default_sid = self._pending
        self._pending = None
        use_sid = sid if sid is not None else default_sid
        ok = accept == m.ACCEPT_OK
        refl = ok and isinstance(req, m.RequestTWSession) and bool(self.mode & md.Mode.REFLECT_OCTETS)
        msg = m.AcceptSession(accept, port if ok else 0, use_sid if ok else bytes(16),
                              req.octets_to_reflect if refl else 0, server_octets if refl else 0)
        self._emit(msg.pack(), msg.hmac_offsets())
        self._answered(Decision.ACCEPT, ok)
        if accept != m.ACCEPT_OK:
            return None
        s = ServerSession(use_sid, req, port)
        self.sessions[use_sid] = s
        return s

    def start_ack(self, accept: int = m.ACCEPT_OK) -> None:
        self._answer(Decision.START)
        self._emit(m.StartAck(accept).pack(), m.StartAck.hmac_offsets())
        self._answered(Decision.START, accept == m.ACCEPT_OK)

    def send_stop_sessions(self, accept: int = m.ACCEPT_OK,
                           descriptions: tuple[m.SessionDescription, ...] = ()) -> None:
        """OWAMP answer to the client's Stop-Sessions (our sent sessions), or a server-
        initiated stop. TWAMP servers use it only to abort (RFC 5357 §3.8)."""
        if self.closed:
            raise UsageError("connection closed")
        if self._awaiting == Decision.STOP:
            self._answer(Decision.STOP)
            nxt = on_answer(self.proto, Decision.STOP, True, self._resume_state)
        else:
            nxt = on_send(self.role, self.proto, self.state, Msg.STOP_SESSIONS)  # our own stop
        n = len(descriptions) if self.owamp else len(self.sessions)
        msg = m.StopSessions(accept, n, tuple(descriptions))
        self._emit(msg.pack(), msg.hmac_offsets())
        self.sessions.clear()
        self.state = nxt

    @property
    def may_stop(self) -> bool:
        """Whether the server may send Stop-Sessions of its own accord now (not with RFC
        5938: commands 2 and 3 "MUST NOT" be used, and Stop-N is the client's alone)."""
        return not self.closed and Msg.STOP_SESSIONS in SEND[(self.role, self.proto)].get(self.state, {})

    def send_fetch_response(self, ack: m.FetchAck, request: m.RequestSession | None = None,
                            skip_ranges: tuple[tuple[int, int], ...] = (),
                            records: tuple[m.DataRecord, ...] = ()) -> None:
        """Fetch-Ack, then (if accepted) the original Request-Session, skip ranges and records."""
        self._answer(Decision.FETCH)
        self._emit(ack.pack(), ack.hmac_offsets())
        if ack.accept == m.ACCEPT_OK:
            if request is None or len(skip_ranges) != ack.num_skip_ranges or len(records) != ack.num_records:
                raise UsageError("fetch response does not match its Fetch-Ack")
            self._emit(request.pack(), request.hmac_offsets())
            sk = m.FetchSkipRanges(tuple(skip_ranges))
            self._emit(sk.pack(), sk.hmac_offsets())
            rec = m.FetchRecords(tuple(records))
            self._emit(rec.pack(), rec.hmac_offsets())
        self._answered(Decision.FETCH, ack.accept == m.ACCEPT_OK)

    def reject_fetch(self, accept: int = m.ACCEPT_FAILURE) -> None:
        self.send_fetch_response(m.FetchAck(accept))

    def start_n_ack(self, accept: int, sids: tuple[bytes, ...]) -> None:
        self._answer(Decision.START_N)
        msg = m.StartNAck(tuple(sids), accept)
        self._emit(msg.pack(), msg.hmac_offsets())
        self._answered(Decision.START_N, accept == m.ACCEPT_OK)

    def stop_n_ack(self, accept: int, sids: tuple[bytes, ...]) -> None:
        self._answer(Decision.STOP_N)
        msg = m.StopNAck(tuple(sids), accept)
        self._emit(msg.pack(), msg.hmac_offsets())
        if accept == m.ACCEPT_OK:
            for s in sids:
                self.sessions.pop(s, None)
        self._answered(Decision.STOP_N, accept == m.ACCEPT_OK)

    def resume(self) -> list[ev.Event]:
        """Process input that arrived while we waited for the application."""
        return self.receive_data(b"")

    @property
    def awaiting(self) -> Decision | None:
        return self._awaiting


def parse_port_range(text: str) -> tuple[int, int]:
    """``"8760-9960"`` (or one port) as (first, last); ValueError unless 1024 <= first <= last <= 65535."""
    lo, sep, hi = text.strip().partition("-")
    try:
        rng = (int(lo), int(hi) if sep else int(lo))
    except ValueError:
        raise ValueError(f"test ports {text!r}: expected LOW-HIGH") from None
    if not 1024 <= rng[0] <= rng[1] <= 65535:
        raise ValueError(f"test ports {text!r}: must be a range within 1024-65535")
    return rng


# A gap in NTP format is rounded to 2**-32 s: 1/max_rate itself must pass the cap.
RATE_SLACK = 1 + 1e-6


def slots_rate(slots: tuple[m.Slot, ...]) -> float:
    """Mean packets per second of an RFC 4656 §3.5 schedule: the slots repeat in a cycle and
    an exponential slot's value is its mean gap (§5), so rate = slots / sum of values.
    A zero-length cycle (all gaps 0: send as fast as possible) is an infinite rate."""
    total = sum(s.value for s in slots) / (1 << 32)  # slot values are NTP-format durations
    return len(slots) / total if total > 0 else float("inf")


def local_address(addr: str) -> IPAddress:
    return ipaddress.ip_address(addr.split("%", 1)[0])
