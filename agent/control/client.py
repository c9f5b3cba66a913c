"""Sans-IO O/TWAMP-Control client (RFC 4656 §3, RFC 5357 §3, RFC 5938).

    cli = ControlClient(twamp=True, wanted=["auth"], key_id="alice", key_source=keys)
    for event in cli.receive_data(sock.recv()):   # GreetingReceived (Set-Up-Response queued), Ready
        ...
    cli.request_tw_session(req); sock.send(cli.data_to_send())
    ... SessionAccepted(test_keys=...) ... cli.start_sessions() ... StartAckReceived ...
    cli.stop_sessions(); sock.send(cli.data_to_send())

Requests may be pipelined: answers come back in order (RFC 4656 §3.4).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Sequence

from agent.control import events as ev
from agent.control import messages as m
from agent.control import modes as md
from agent.control._conn import _Conn
from agent.control.states import INITIAL, Msg, Role, State, UsageError, on_receive, on_send, on_unknown_command
from agent.control.keyring import (
    HandshakeContext,
    IPAddress,
    Pbkdf2Job,
    hooked_client_token,
    make_client_token,
    token_key_or_job,
)
from agent.control.messages import ProtocolError
from agent.control.security import (
    DEFAULT_MAX_COUNT,
    RecvStream,
    SendStream,
    SessionKeys,
)
from netlink.secret import Secret


class ControlClient(_Conn):
    role = Role.CLIENT

    def __init__(
        self,
        twamp: bool = True,
        wanted: Sequence[str] = ("unauth",),
        key_id: str = "",
        key_source: object | None = None,
        max_count: int = DEFAULT_MAX_COUNT,
        features: int = 0,
        local: tuple[IPAddress, int] | None = None,
        peer: tuple[IPAddress, int] | None = None,
        defer_keys: bool = False,
    ) -> None:
        super().__init__(twamp, defer_keys)
        self.wanted = list(wanted)
        self.key_id = key_id
        self._key_source = key_source
        self.max_count = max_count
        self.features = features
        self.local = local
        self.peer = peer
        self.greeting: m.ServerGreeting | None = None
        self.start_time = 0
        self.state = INITIAL[self.role]
        self._start_head: bytes | None = None  # Server-Start's clear part, its tail not yet in
        self._pending: deque[tuple[Msg, object]] = deque()  # expected answers, in order (§3.4)
        self._fetch_stage: tuple | None = None
        # Why our key source refused the greeting (e.g. agent.binder.keys.BinderRefusal: the
        # announced SA pair is not in our kernel); the connection then fails. No key material.
        self.refusal: Exception | None = None

    # ------------------------------------------------------------------ input
    def _step(self) -> list[ev.Event] | None:
        if self.state == State.GREETING:
            return self._on_greeting()
        if self.state == State.SERVER_START:
            return self._on_server_start()
        if self.state in (State.READY, State.TEST):
            return self._on_answer()
        return None

    def _on_greeting(self) -> list[ev.Event] | None:
        if not self._have(m.ServerGreeting.SIZE):
            return None
        row = on_receive(self.role, self.proto, self.state, Msg.SERVER_GREETING)
        g = m.ServerGreeting.unpack(self._recv.take(m.ServerGreeting.SIZE))
        self.greeting = g
        if g.modes == 0:
            raise ProtocolError("server offers no modes (it does not wish to talk)")
        offered = g.modes
        pick = getattr(self._key_source, "filter_offer", None)
        if pick is not None:  # e.g. RFC 7717 §5.1: no IKE SA for this peer -> fall back
            pre = HandshakeContext("client", "twamp" if self.twamp else "owamp", self.local, self.peer, 0,
                                   g.salt, g.count, g.unused)
            offered = self._key_hook(pick, pre, offered)
        sec_bit = md.choose(offered, self.wanted, self.twamp)
        if sec_bit is None:
            raise ProtocolError(f"server offers modes {g.modes:#x}, none of {self.wanted}")
        sec, _key, _ = md.split_mode(sec_bit, self.twamp)  # sec_bit may include a key-mode bit
        mode = sec_bit | (self.features & g.modes & md.TWAMP_FEATURES if self.twamp else 0)
        self.mode = mode
        client_iv = os.urandom(16)
        ctx = HandshakeContext("client", "twamp" if self.twamp else "owamp", self.local, self.peer, mode,
                               g.salt, g.count, g.unused)
        self._ctx = ctx
        validate = getattr(self._key_source, "validate", None)
        if _key is not None and validate is not None:
            # e.g. the IPsec binder checks the announced SA pair against our kernel (draft §4.1)
            self._key_hook(validate, ctx)
        greeted: list[ev.Event] = [ev.GreetingReceived(g, mode)]
        if not sec.control_crypto:
            self._out += m.SetUpResponse(mode).pack()
            self.state = State(row.ok)
            return greeted
        if self._key_source is None:
            raise ProtocolError("an authenticated mode needs a key source")
        # Key-source hooks run here; only PBKDF2 (up to max_count iterations) may leave the loop.
        made = self._key_hook(hooked_client_token, self._key_source, self.key_id, ctx, g.challenge)
        if made is not None:
            return greeted + self._send_setup(mode, made, sec.test_auth, client_iv)
        key = self._key_hook(token_key_or_job, self._key_source, self.key_id, ctx, self.max_count)
        if key is None:
            raise ProtocolError(f"no key for identity {self.key_id!r}")

        def derived(result: object, error: BaseException | None) -> list[ev.Event]:
            if error is not None or not isinstance(result, Secret):
                raise ProtocolError("key derivation failed")
            return self._send_setup(mode, make_client_token(result, g.challenge), sec.test_auth, client_iv)

        self.state = State(row.ok)  # what the derivation resumes to
        if isinstance(key, Pbkdf2Job):
            return greeted + self._derive(key, derived)
        return greeted + derived(key, None)

    def _key_hook(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a key-source hook; its refusal closes the connection as a ProtocolError and
        is kept in ``self.refusal`` (the caller may tell it apart from a broken server)."""
        try:
            return fn(*args)
        except ProtocolError:
            raise
        except Exception as e:
            self.refusal = e
            raise ProtocolError(f"key source refused the greeting: {e}") from None

    def _send_setup(self, mode: int, made: tuple[bytes, SessionKeys], test_auth: bool,
                    client_iv: bytes) -> list[ev.Event]:
        """Set-Up-Response with the Token; our direction is encrypted from now on (RFC 4656 §3.1)."""
        token, keys = made
        octets = getattr(self._key_source, "key_id_octets", None)
        raw = octets(self._ctx) if octets is not None else None  # RFC 7717 §5.3: SPIi | SPIr
        self._out += m.SetUpResponse(mode, self.key_id, token, client_iv, raw or b"").pack()
        self._keys = keys
        self._test_plane_secure = test_auth
        self._send = SendStream(keys, client_iv)
        self.state = State(on_receive(self.role, self.proto, State.GREETING, Msg.SERVER_GREETING).ok)
        return []

    def _on_server_start(self) -> list[ev.Event] | None:
        row = on_receive(self.role, self.proto, self.state, Msg.SERVER_START)
        if self._start_head is None:
            if not self._have(m.ServerStart.SIZE if self._keys is None else m.ServerStart.CLEAR):
                return None
            head = self._recv.take(32)
            accept = head[15]
            if accept != m.ACCEPT_NO_IKE_SA:  # RFC 7717 §5.3's 6 exists for Server-Start
                accept = m.read_accept(accept)  # RFC 4656 §3.3: an unknown value reads as 1
            if accept != m.ACCEPT_OK:
                self.close(f"server refused: {m.SERVER_START_ACCEPT_NAMES[accept]}")  # row.refused: CLOSED
                return [ev.SetupRefused(accept)]
            if self._keys is not None:
                self._switch_recv(RecvStream(self._keys, head[16:32]))
            self._start_head = head
        if not self._have(16):  # Start-Time comes encrypted, maybe in a later segment
            return None
        tail = self._recv.take(16)
        self._recv.verify(tail, ())  # Start-Time joins the server's HMAC chain
        self.start_time = int.from_bytes(tail[:8], "big")
        self.state = State(row.ok)
        return [ev.Ready(self.start_time)]

    def _on_answer(self) -> list[ev.Event] | None:
        buf = self._recv.plain
        if not self._pending:
            # Unsolicited: only a server Stop-Sessions is allowed (RFC 4656 §3.8, RFC 5357 §3.8).
            if not self._have(16):
                return None
            if buf[0] != m.CMD_STOP_SESSIONS:  # nothing asked for: only a command can come
                raise on_unknown_command(self.role, self.proto, self.state, buf[0])
            return self._read_stop()
        kind, ctx = self._pending[0]
        row = on_receive(self.role, self.proto, self.state, kind)
        if kind is Msg.ACCEPT_SESSION:
            msg = self._take(m.AcceptSession.SIZE, m.AcceptSession.hmac_offsets())
            if msg is None:
                return None
            self._pending.popleft()
            acc = m.AcceptSession.unpack(msg)
            keys = self.test_keys(acc.sid) if acc.accept == m.ACCEPT_OK else None
            self.state = State(row.ok)
            return [ev.SessionAccepted(ctx, acc, keys)]  # type: ignore[arg-type]
        if kind is Msg.START_ACK:
            msg = self._take(32, m.StartAck.hmac_offsets())
            if msg is None:
                return None
            self._pending.popleft()
            a = m.StartAck.unpack(msg).accept
            self._next(row, a == m.ACCEPT_OK)
            return [ev.StartAckReceived(a)]
        if kind is Msg.STOP_SESSIONS:
            return self._read_stop()
        if kind is Msg.FETCH_ACK:
            return self._on_fetch(row)
        if kind in (Msg.START_N_ACK, Msg.STOP_N_ACK):
            cls = m.StartNAck if kind is Msg.START_N_ACK else m.StopNAck
            n = cls.needed_length(bytes(buf))
            if n is None:
                return None
            msg = self._take(n, (n - 16,))
            if msg is None:
                return None
            self._pending.popleft()
            parsed = cls.unpack(msg)
            if kind is Msg.START_N_ACK:
                # a refused Start-N-Ack leaves a running test running (states: TEST -> TEST)
                self._next(row, parsed.accept == m.ACCEPT_OK)
                return [ev.StartNAckReceived(parsed)]
            self._next(row, True)
            return [ev.StopNAckReceived(parsed)]
        raise ProtocolError("internal: unknown pending answer")  # pragma: no cover

    def _next(self, row, accepted: bool) -> None:
        """The row's next state: ``ok`` when the answer's Accept is 0, else ``refused``."""
        nxt = row.ok if accepted or row.refused is None else row.refused
        self.state = State(nxt)

    def _read_stop(self) -> list[ev.Event] | None:
        row = on_receive(self.role, self.proto, self.state, Msg.STOP_SESSIONS)
        stop = self._take_stop()
        if stop is None:
            return None
        if self._pending and self._pending[0][0] is Msg.STOP_SESSIONS:
            self._pending.popleft()
        self._next(row, True)
        return [ev.StopSessionsReceived(stop)]

    def _on_fetch(self, row) -> list[ev.Event] | None:
        # Stages: Fetch-Ack, then Request-Session, skip ranges, records (RFC 4656 §3.8).
        stage = self._fetch_stage
        if stage is None:
            msg = self._take(32, m.FetchAck.hmac_offsets())
            if msg is None:
                return None
            ack = m.FetchAck.unpack(msg)
            if ack.accept != m.ACCEPT_OK:
                self._pending.popleft()
                self._next(row, False)
                return [ev.FetchResult(ack)]
            if ack.num_records > 1 << 24 or ack.num_skip_ranges > 1 << 20:
                raise ProtocolError("Fetch-Ack announces too much data")
            self._fetch_stage = (ack,)
            return []
        if len(stage) == 1:
            if not self._have(16):
                return None
            n = m.RequestSession.length_from_first_block(bytes(self._recv.plain[:16]))
            msg = self._take(n, (96, n - 16))
            if msg is None:
                return None
            self._fetch_stage = (stage[0], m.RequestSession.unpack(msg))
            return []
        ack = stage[0]
        if len(stage) == 2:
            n = m.FetchSkipRanges.size_for(ack.num_skip_ranges)
            msg = self._take(n, (n - 16,))
            if msg is None:
                return None
            self._fetch_stage = (*stage, m.FetchSkipRanges.unpack(msg, ack.num_skip_ranges).ranges)
            return []
        n = m.FetchRecords.size_for(ack.num_records)
        msg = self._take(n, (n - 16,))
        if msg is None:
            return None
        recs = m.FetchRecords.unpack(msg, ack.num_records).records
        self._fetch_stage = None
        self._pending.popleft()
        self._next(row, True)
        return [ev.FetchResult(ack, stage[1], stage[2], recs)]

    # ------------------------------------------------------------------ requests
    def _send_msg(self, msg: Msg) -> State:
        """The state after sending ``msg`` now (states.SEND); UsageError if not allowed."""
        if self.closed:
            raise UsageError("connection closed")
        return on_send(self.role, self.proto, self.state, msg)

    def request_tw_session(self, req: m.RequestTWSession) -> None:
        if not self.twamp:
            raise UsageError("Request-TW-Session is TWAMP only")
        nxt = self._send_msg(Msg.REQUEST_TW_SESSION)
        self._emit(req.pack(), req.hmac_offsets())
        self._pending.append((Msg.ACCEPT_SESSION, req))
        self.state = nxt

    def request_session(self, req: m.RequestSession) -> None:
        if self.twamp:
            raise UsageError("Request-Session is OWAMP only")
        nxt = self._send_msg(Msg.REQUEST_SESSION)
        self._emit(req.pack(), req.hmac_offsets())
        self._pending.append((Msg.ACCEPT_SESSION, req))
        self.state = nxt

    def start_sessions(self) -> None:
        nxt = self._send_msg(Msg.START_SESSIONS)
        self._emit(m.StartSessions().pack(), m.StartSessions.hmac_offsets())
        self._pending.append((Msg.START_ACK, None))
        self.state = nxt

    def stop_sessions(self, num_sessions: int, accept: int = m.ACCEPT_OK,
                      descriptions: tuple[m.SessionDescription, ...] = ()) -> None:
        """TWAMP: num_sessions = the sessions being stopped (never 0 when some run:
        perfSONAR aborts). OWAMP: one description per session we sent; the server answers
        with its own Stop-Sessions (StopSessionsReceived)."""
        nxt = self._send_msg(Msg.STOP_SESSIONS)
        msg = m.StopSessions(accept, len(descriptions) if self.owamp else num_sessions, tuple(descriptions))
        self._emit(msg.pack(), msg.hmac_offsets())
        if self.owamp:
            self._pending.append((Msg.STOP_SESSIONS, None))
        self.state = nxt

    def fetch_session(self, sid: bytes, begin: int = 0, end: int = 0xFFFFFFFF) -> None:
        if self.twamp:
            raise UsageError("Fetch-Session is OWAMP only")
        nxt = self._send_msg(Msg.FETCH_SESSION)
        msg = m.FetchSession(sid, begin, end)
        self._emit(msg.pack(), msg.hmac_offsets())
        self._pending.append((Msg.FETCH_ACK, None))
        self.state = nxt

    def start_n_sessions(self, sids: tuple[bytes, ...]) -> None:
        nxt = self._isc(Msg.START_N_SESSIONS, sids)
        msg = m.StartNSessions(tuple(sids))
        self._emit(msg.pack(), msg.hmac_offsets())
        self._pending.append((Msg.START_N_ACK, None))
        self.state = nxt

    def stop_n_sessions(self, sids: tuple[bytes, ...]) -> None:
        nxt = self._isc(Msg.STOP_N_SESSIONS, sids)
        msg = m.StopNSessions(tuple(sids))
        self._emit(msg.pack(), msg.hmac_offsets())
        self._pending.append((Msg.STOP_N_ACK, None))
        self.state = nxt

    def _isc(self, msg: Msg, sids: tuple[bytes, ...]) -> State:
        if not (self.twamp and self.mode & md.Mode.INDIVIDUAL_SESSION_CONTROL):
            raise UsageError("individual session control was not negotiated (RFC 5938)")
        if not sids:
            raise UsageError(f"{msg} needs at least one SID (RFC 5938 §3.2, §3.4)")
        return self._send_msg(msg)

    @property
    def pending(self) -> int:
        return len(self._pending)
