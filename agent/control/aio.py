"""asyncio adapters for the sans-IO control state machines: a TCP control server and a client.

The server isolates connections: each runs in its own task; a protocol error,
a slow client (idle timeout) or a handler exception closes that connection only.
Limits: total connections, connections per client address and per /24 or /64,
a bounded share for weak (pre-auth or plain-unauth) connections, the oldest of
the busiest prefix evicted for a newcomer (agent.control.admission); sessions per
connection (ServerConfig.max_sessions) and per address, test packets/s per address
(ListenerLimits.max_rate_per_client); idle time outside running tests, and the
longest a test may keep a connection open.

``ControlListener.abort(srv)`` ends one connection from outside its task (e.g. the key
binder when the SA it is keyed from is deleted): Stop-Sessions if tests run, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from agent.control import events as ev
from agent.control import messages as m
from agent.control import modes as md
from agent.control.admission import Admission, TokenBucket
from agent.control.client import ControlClient
from agent.control.security import DEFAULT_MAX_COUNT
from agent.control.server import RATE_SLACK, ControlServer, ServerConfig, slots_rate
from agent.control.states import Deadline, deadline_kind

log = logging.getLogger(__name__)

TWAMP_PORT = 862
OWAMP_PORT = 861
READ_CHUNK = 65536


def setup_refusal(accept: int, mode: int) -> str:
    """Server-Start's Accept in words. In a keyed mode, 1 answers our Token: the server
    could not open it with the key for our KeyID (RFC 4656 §3.1), i.e. a wrong identity or
    passphrase; say so rather than "failure"."""
    from agent.control import modes as md

    keyed = any(sm.control_crypto for sm in md.security_bits(mode))
    if accept == m.ACCEPT_FAILURE and keyed:
        return "authentication failed (wrong identity or passphrase?)"
    return m.SERVER_START_ACCEPT_NAMES.get(accept, f"Accept {accept}")


class ControlError(Exception):
    """A control conversation failed (refused, peer error, timeout). Safe to print."""


class ConnectionLost(ControlError):
    """The server closed or reset the control connection while we waited for an answer."""


class GreetingRefused(ControlError):
    """Our key source refused the server's greeting: for the IPsec-bound modes, the SA pair
    it announces is not ours (draft-ietf-ippm-ipsec §4.1: the client MUST close).
    ``reason``: the refusal's machine-readable reason (wire-format §6), e.g. ``no_sa``;
    ``detail``: SPIs, protocol and addresses only."""

    def __init__(self, error: Exception) -> None:
        reason = getattr(error, "reason", None)
        self.reason: str | None = getattr(reason, "value", reason)
        self.detail: str = getattr(error, "detail", "") or str(error)
        super().__init__(f"refused the server's greeting: {error}")


def _addr(info: object) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    if not isinstance(info, tuple) or len(info) < 2:
        return None
    try:
        a = ipaddress.ip_address(str(info[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped  # dual-stack socket: speak IPv4 to IPv4 peers
    return a, int(info[1])


# ------------------------------------------------------------------------------ server


class ConnectionHandler(Protocol):
    """What the control server asks of the application for one connection."""

    async def on_event(self, srv: ControlServer, event: ev.Event) -> None: ...

    def close(self) -> None: ...


HandlerFactory = Callable[[ControlServer], ConnectionHandler]

ABORT_LINGER = 5.0  # an aborted connection whose task does not finish by then is cancelled


@dataclass
class _Live:
    """One served connection, as :meth:`ControlListener.abort` needs it."""

    handler: ConnectionHandler
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set: _converse re-checks before reading
    abort: int | None = None  # Accept of a requested abort, done by the connection's own task
    task: asyncio.Task | None = None


@dataclass
class ListenerLimits:
    """Deadlines hang off the control states (agent.control.states.DEADLINES): each runs from
    when its state was entered (or, for idle, from the last complete message), never from
    the last read, so a peer trickling bytes cannot keep a connection open."""

    max_connections: int = 64
    max_per_client: int = 8
    max_sessions_per_client: int = 32  # test sessions over all of one address's connections
    idle_timeout: float = 30.0  # seconds without a complete message outside a running test
    max_test_time: float = 3600.0  # a running test may keep a connection this long
    # Connect to Server-Start, absolute (a Set-Up-Response is one 164-octet message and a
    # PBKDF2 the client can run before answering; 5 s is ample even over a slow path).
    setup_timeout: float = 5.0
    # Start-Sessions accepted with no session to run: nothing will happen on the connection.
    empty_test_timeout: float = 10.0
    max_per_prefix: int = 32  # connections from one /24 (IPv4) or /64 (IPv6)
    max_weak: int | None = None  # pre-auth + plain-unauth connections (None: 3/4 of max_connections)
    max_rate_per_client: float | None = None  # test packets/s over all of one address's sessions

    def deadline(self, kind: Deadline) -> float | None:
        """Seconds allowed in a state of deadline ``kind`` (None: no peer deadline)."""
        return {
            Deadline.SETUP: min(self.setup_timeout, self.idle_timeout),
            Deadline.IDLE: self.idle_timeout,
            Deadline.EMPTY_TEST: min(self.empty_test_timeout, self.idle_timeout),
            Deadline.TEST: self.max_test_time,
        }.get(kind)


class _Clock:
    """The running deadline of one connection: restarted when its kind changes (a state
    change), and for IDLE when a complete message arrives; never by a bare read."""

    def __init__(self, limits: ListenerLimits, now: float) -> None:
        self.limits = limits
        self.kind = Deadline.SETUP
        self.since = now  # the set-up deadline runs from connect

    def remaining(self, srv: ControlServer, now: float, progressed: bool) -> tuple[Deadline, float | None]:
        kind = deadline_kind(srv.state, srv.proto, len(srv.sessions))
        if kind is not Deadline.NONE and (kind is not self.kind or (progressed and kind is Deadline.IDLE)):
            self.kind, self.since = kind, now
        limit = self.limits.deadline(kind)
        return kind, None if limit is None else self.since + limit - now


class _Limited:
    """One log line per interval for a repeated event (e.g. evictions under attack)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval, self.next, self.skipped = interval, 0.0, 0

    def due(self) -> bool:
        now = asyncio.get_running_loop().time()
        if now < self.next:
            self.skipped += 1
            return False
        self.next = now + self.interval
        return True


class ControlListener:
    def __init__(
        self,
        handler_factory: HandlerFactory,
        *,
        twamp: bool = True,
        hosts: Sequence[str] | None = None,
        port: int | None = None,
        config: ServerConfig = ServerConfig(),
        key_source: object | None = None,
        limits: ListenerLimits = ListenerLimits(),
    ) -> None:
        self.twamp = twamp
        self.hosts = list(hosts) if hosts else None  # None: every address, IPv4 and IPv6
        self.port = (TWAMP_PORT if twamp else OWAMP_PORT) if port is None else port
        self.config = config
        self.key_source = key_source
        self.limits = limits
        self.handler_factory = handler_factory
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._per_client: dict[str, int] = {}
        self._servers: dict[str, set[ControlServer]] = {}
        self._live: dict[ControlServer, _Live] = {}
        lim = limits
        self.admission = Admission(lim.max_connections, lim.max_per_client, lim.max_per_prefix,
                                   lim.max_weak if lim.max_weak is not None else max(1, lim.max_connections * 3 // 4))
        self._tokens: dict[object, ControlServer] = {}  # admission token -> its connection
        self._budgets: dict[str, TokenBucket] = {}  # per-address reflector rate (max_rate_per_client)
        self._log_refused, self._log_evicted = _Limited(), _Limited()
        self._log_limits: dict[str, _Limited] = {}
        self.stats = {"accepted": 0, "refused": 0, "setup_rejected": 0, "protocol_errors": 0, "timeouts": 0,
                      "evicted": 0, "refused_prefix": 0, "refused_rate": 0}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, self.hosts, self.port, reuse_address=True)

    @property
    def addresses(self) -> list[tuple]:
        return [s.getsockname() for s in self._server.sockets] if self._server else []

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t = asyncio.get_running_loop().create_task(self._run(reader, writer))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _addr(writer.get_extra_info("peername"))
        local = _addr(writer.get_extra_info("sockname"))
        key = str(peer[0]) if peer else "?"
        token = object()
        admitted, evict, why = self.admission.admit(token, peer[0] if peer else None)
        for victim in evict:  # weak connections of the heaviest prefix make room (agent.control.admission)
            self.stats["evicted"] += 1
            old = self._tokens.get(victim)
            if old is not None:
                if self._log_evicted.due():
                    log.info("control peer %s: evicted for a newcomer (%d evictions so far)", old.peer,
                             self.stats["evicted"])
                self.abort(old, m.ACCEPT_TEMPORARY_LIMIT)
        self._per_client[key] = self._per_client.get(key, 0) + 1
        handler: ConnectionHandler | None = None
        srv: ControlServer | None = None
        try:
            srv = ControlServer(self.twamp, self.config, self.key_source, local=local, peer=peer,
                                refuse=not admitted, defer_keys=True)
            if not admitted:
                self.stats["refused"] += 1
                if "prefix" in why:
                    self.stats["refused_prefix"] += 1
                if self._log_refused.due():
                    log.info("control peer %s refused: %s (%d refusals so far)", key, why, self.stats["refused"])
                writer.write(srv.data_to_send())
                await asyncio.wait_for(writer.drain(), 5)
                return
            self._tokens[token] = srv
            if self.limits.max_rate_per_client is not None:
                budget = self._budgets.get(key)
                if budget is None:
                    budget = self._budgets[key] = TokenBucket(self.limits.max_rate_per_client)
                srv.rate_budget = budget  # type: ignore[attr-defined] # read by agent.sessions' reflector policer
            self.stats["accepted"] += 1
            self._servers.setdefault(key, set()).add(srv)
            handler = self.handler_factory(srv)
            self._live[srv] = _Live(handler, task=asyncio.current_task())
            await self._converse(srv, handler, reader, writer, key, token)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            log.debug("control connection from %s: %s", key, e)
        except asyncio.CancelledError:
            raise
        except Exception:  # handler bug: close this connection, keep the server
            log.exception("control connection from %s failed", key)
        finally:
            self.admission.forget(token)
            self._tokens.pop(token, None)
            self._per_client[key] -= 1
            if not self._per_client[key]:
                del self._per_client[key]
                budget = self._budgets.pop(key, None)
                if budget is not None:
                    self.stats["policed_rate_client"] = self.stats.get("policed_rate_client", 0) + budget.policed
            if srv is not None:
                srv.release()
                self._live.pop(srv, None)
            peers = self._servers.get(key)
            if peers is not None:
                peers.discard(srv)
                if not peers:
                    del self._servers[key]
            if handler is not None:
                with contextlib.suppress(Exception):
                    handler.close()
            await _graceful_close(reader, writer)
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def abort(self, conn: ControlServer | ConnectionHandler, accept: int = m.ACCEPT_INTERNAL_ERROR) -> bool:
        """End one connection from outside its task: Stop-Sessions with ``accept`` if its
        tests run (RFC 4656 §3.8 / RFC 5357 §3.8: the server may stop them; an OWAMP
        handler's ``stop_sessions()`` hook supplies the sessions it sent, with their Next
        Seqno), then close. ``conn`` is the ControlServer or the handler made for it.

        Returns False if the connection is not (or no longer) served here. The connection's
        task does the work as soon as it is not inside a handler call (it waits for reads
        and the abort together), so no message is cut in half; a task that has not
        finished ``ABORT_LINGER`` seconds later (a peer not reading) is cancelled."""
        live = self._live.get(conn) if isinstance(conn, ControlServer) else None
        if live is None:
            live = next((lv for lv in self._live.values() if lv.handler is conn), None)
        if live is None or live.abort is not None:
            return live is not None
        live.abort = accept
        live.wake.set()
        task = live.task
        if task is not None:
            asyncio.get_running_loop().call_later(ABORT_LINGER, lambda: task.done() or task.cancel())
        return True

    async def _do_abort(self, srv: ControlServer, live: _Live) -> None:
        accept = live.abort if live.abort is not None else m.ACCEPT_INTERNAL_ERROR
        if srv.may_stop:  # in TEST, and not with RFC 5938 (its client alone stops sessions)
            descs: tuple[m.SessionDescription, ...] = ()
            hook = getattr(live.handler, "stop_sessions", None)
            if srv.owamp and hook is not None:
                descs = tuple(await hook())
            srv.send_stop_sessions(accept, descs)
        srv.close("aborted")
        log.info("control peer %s: aborted (Accept=%d)", srv.peer, accept)

    def client_sessions(self, key: str) -> int:
        return sum(len(s.sessions) for s in self._servers.get(key, ()))

    def _limited(self, reason: str) -> _Limited:
        lim = self._log_limits.get(reason)
        if lim is None:
            if len(self._log_limits) > 64:  # reasons are our own strings, but stay bounded anyway
                self._log_limits.clear()
            lim = self._log_limits[reason] = _Limited()
        return lim

    def client_send_rate(self, key: str) -> float:
        """Packets/s the OWAMP sessions we send for this address's connections add up to."""
        return sum(slots_rate(s.request.slots) for srv in self._servers.get(key, ()) for s in srv.sessions.values()
                   if isinstance(s.request, m.RequestSession) and s.request.conf_sender)

    def _over_rate(self, key: str, e: ev.Event) -> bool:
        cap = self.limits.max_rate_per_client
        req = getattr(e, "request", None)
        if cap is None or not isinstance(req, m.RequestSession) or not req.conf_sender:
            return False
        return self.client_send_rate(key) + slots_rate(req.slots) > cap * RATE_SLACK

    def _on_setup(self, token: object | None, e: ev.SetupComplete) -> None:
        """A keyed connection is no longer weak (agent.control.admission): never evicted."""
        try:
            sec, key_mode, _ = md.split_mode(e.mode, self.twamp)
        except ValueError:
            return
        if token is not None and (sec.control_crypto or key_mode is not None):
            self.admission.trusted(token)

    async def _converse(self, srv: ControlServer, handler: ConnectionHandler,
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str = "?",
                        token: object | None = None) -> None:
        pending: list[ev.Event] = []
        live = self._live.get(srv)
        loop = asyncio.get_running_loop()
        clock = _Clock(self.limits, loop.time())
        progressed = False  # a complete message since the deadline was last looked at
        while True:
            if live is not None and live.abort is not None and srv.awaiting is None and not srv.closed:
                pending.clear()  # nothing more is answered on an aborted connection
                await self._do_abort(srv, live)
            out = srv.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()
            if pending:
                e = pending.pop(0)
                progressed = True
                if isinstance(e, ev.KeyNeeded):  # PBKDF2 in a worker thread: other clients go on
                    pending.extend(srv.key_ready(*await run_key_job(e)))
                    continue
                if isinstance(e, ev.ProtocolFailure):
                    self.stats["protocol_errors"] += 1
                    log.info("control peer %s: %s", srv.peer, e.reason)
                elif isinstance(e, ev.SetupRejected):
                    self.stats["setup_rejected"] += 1
                    log.info("control peer %s refused: %s", srv.peer, e.reason)
                elif isinstance(e, ev.SessionRefused):  # a request over a cap (Accept != 0)
                    self.stats["refused_requests"] = self.stats.get("refused_requests", 0) + 1
                    if self._limited(e.reason).due():  # a peer can pipeline thousands: one line per reason
                        log.info("control peer %s: session refused (Accept=%d): %s", srv.peer, e.accept, e.reason)
                if isinstance(e, ev.SetupComplete):
                    self._on_setup(token, e)
                if isinstance(e, ev.SessionRequested) and \
                        self.client_sessions(key) >= self.limits.max_sessions_per_client:
                    self.stats["refused_sessions"] = self.stats.get("refused_sessions", 0) + 1
                    srv.accept_session(m.ACCEPT_TEMPORARY_LIMIT)  # over this address's share
                elif isinstance(e, ev.SessionRequested) and self._over_rate(key, e):
                    self.stats["refused_rate"] += 1  # this address's senders would exceed max_rate_per_client
                    if self._limited("rate").due():
                        log.info("control peer %s: session refused: over the address's rate cap", srv.peer)
                    srv.accept_session(m.ACCEPT_TEMPORARY_LIMIT)
                elif not srv.closed:
                    await handler.on_event(srv, e)
                if srv.awaiting is None and not pending and not srv.closed:
                    pending.extend(srv.resume())  # input that queued behind the answer
                continue
            if srv.closed:
                return
            if srv.awaiting is not None:
                raise RuntimeError(f"handler did not answer {srv.awaiting}")
            kind, left = clock.remaining(srv, loop.time(), progressed)
            progressed = False
            try:
                if left is not None and left <= 0:
                    raise asyncio.TimeoutError
                data = await _read_or_wake(reader, live.wake if live is not None else None, left)
            except asyncio.TimeoutError:
                self.stats["timeouts"] += 1
                key = f"timeouts_{kind.value.replace('-', '_')}"
                self.stats[key] = self.stats.get(key, 0) + 1
                log.info("control peer %s: %s deadline (%.0fs) passed in state %s: closing",
                         srv.peer, kind.value, self.limits.deadline(kind) or 0, srv.state)
                return
            if data is None:  # woken: an abort to carry out
                continue
            if not data:
                return
            pending.extend(srv.receive_data(data))


async def _read_or_wake(reader: asyncio.StreamReader, wake: asyncio.Event | None,
                        timeout: float | None) -> bytes | None:
    """The next chunk from ``reader`` (b"" at EOF), or None once ``wake`` is set (and it is
    cleared). Raises asyncio.TimeoutError after ``timeout`` seconds of neither."""
    if wake is None:
        return await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
    if wake.is_set():
        wake.clear()
        return None
    read = asyncio.ensure_future(reader.read(READ_CHUNK))
    woken = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait((read, woken), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
        if not read.done():
            read.cancel()  # StreamReader keeps unread data buffered: nothing is lost
            # A read that failed (e.g. ECONNRESET) just before the cancel reports it here;
            # its outcome is read again below, or dropped with us if we are being cancelled.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read
        elif not read.cancelled():
            read.exception()  # mark it retrieved: if we are being cancelled nobody else will
    if read.done() and not read.cancelled():
        return read.result()
    if wake.is_set():
        wake.clear()
        return None
    raise asyncio.TimeoutError


async def _graceful_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, linger: float = 1.0) -> None:
    """Half-close, then discard what the peer still sends for a moment: closing with unread
    input makes the kernel send RST, which can destroy our last message (e.g. a refusing
    Server-Start) before the peer reads it."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        end = loop.time() + linger
        budget = 1 << 16
        while budget > 0 and loop.time() < end:
            data = await asyncio.wait_for(reader.read(4096), max(0.0, end - loop.time()))
            if not data:
                break
            budget -= len(data)
    writer.close()


async def run_key_job(e: ev.KeyNeeded) -> tuple[object, BaseException | None]:
    """Run a handshake's key derivation in the loop's default executor: (result, error).
    ``cryptography``'s PBKDF2 releases the GIL, so the loop keeps serving meanwhile."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, e.job), None
    except asyncio.CancelledError:
        raise
    except Exception as err:  # handed to the state machine, which answers for it
        return None, err


# ------------------------------------------------------------------------------ client


class AsyncControlClient:
    """Request/answer helpers over one control connection."""

    def __init__(self, cli: ControlClient, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.cli = cli
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self._events: list[ev.Event] = []
        self.greeting: m.ServerGreeting | None = None

    @classmethod
    async def connect(cls, host: str, port: int | None = None, *, twamp: bool = True,
                      wanted: Sequence[str] = ("unauth",), key_id: str = "", key_source: object | None = None,
                      max_count: int = DEFAULT_MAX_COUNT, features: int = 0, timeout: float = 10.0,
                      family: int = 0, local_addr: str | tuple[str, int] | None = None) -> "AsyncControlClient":
        """Connect and run the set-up (greeting, Set-Up-Response, Server-Start).

        ``local_addr``: source address (or (address, port)) of the control connection, e.g.
        a tunnel's local inner address so the connection rides the tunnel. The test-plane
        helpers (agent.sessions.session) bind their UDP sockets to ``self.local``, which is it."""
        port = (TWAMP_PORT if twamp else OWAMP_PORT) if port is None else port
        src = (local_addr, 0) if isinstance(local_addr, str) else local_addr
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, family=family, local_addr=src), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ControlError(f"cannot connect to {host} port {port}: {e or 'timeout'}") from None
        cli = ControlClient(twamp, wanted, key_id, key_source, max_count, features,
                            local=_addr(writer.get_extra_info("sockname")), peer=_addr(writer.get_extra_info("peername")),
                            defer_keys=True)
        self = cls(cli, reader, writer, timeout)
        try:
            g = await self._wait(ev.GreetingReceived)
            self.greeting = g.greeting  # type: ignore[attr-defined]
            await self._wait(ev.Ready)
        except BaseException:
            await self.close()
            raise
        return self

    @property
    def local(self):
        return self.cli.local

    @property
    def peer(self):
        return self.cli.peer

    async def _flush(self) -> None:
        out = self.cli.data_to_send()
        if out:
            self.writer.write(out)
            await self.writer.drain()

    async def _wait(self, kind: type, timeout: float | None = None) -> ev.Event:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while True:
            await self._flush()
            job = next((e for e in self._events if isinstance(e, ev.KeyNeeded)), None)
            if job is not None:  # up to max_count PBKDF2 iterations: off the loop
                i = self._events.index(job)
                self._events[i:i + 1] = self.cli.key_ready(*await run_key_job(job))
                continue
            for i, e in enumerate(self._events):
                if isinstance(e, kind):
                    return self._events.pop(i)
                if isinstance(e, ev.ProtocolFailure):
                    if self.cli.refusal is not None:
                        raise GreetingRefused(self.cli.refusal)
                    raise ControlError(f"protocol error: {e.reason}")
                if isinstance(e, ev.SetupRefused):
                    raise ControlError(f"server refused the connection: {setup_refusal(e.accept, self.cli.mode)}")
            if self.cli.closed:
                raise ControlError("connection closed")
            left = deadline - loop.time()
            if left <= 0:
                raise ControlError(f"timed out waiting for {kind.__name__}")
            try:
                data = await asyncio.wait_for(self.reader.read(READ_CHUNK), left)
            except asyncio.TimeoutError:
                raise ControlError(f"timed out waiting for {kind.__name__}") from None
            except OSError as e:
                raise ConnectionLost(f"connection error: {e}") from None
            if not data:
                raise ConnectionLost("server closed the connection")
            self._events.extend(self.cli.receive_data(data))

    async def request_tw_session(self, req: m.RequestTWSession) -> ev.SessionAccepted:
        self.cli.request_tw_session(req)
        return await self._wait(ev.SessionAccepted)  # type: ignore[return-value]

    async def request_session(self, req: m.RequestSession) -> ev.SessionAccepted:
        self.cli.request_session(req)
        return await self._wait(ev.SessionAccepted)  # type: ignore[return-value]

    async def start_sessions(self) -> int:
        self.cli.start_sessions()
        return (await self._wait(ev.StartAckReceived)).accept  # type: ignore[attr-defined]

    async def stop_sessions(self, num_sessions: int, accept: int = m.ACCEPT_OK,
                            descriptions: tuple[m.SessionDescription, ...] = ()) -> m.StopSessions | None:
        self.cli.stop_sessions(num_sessions, accept, descriptions)
        if self.cli.twamp:
            await self._flush()
            return None
        return (await self._wait(ev.StopSessionsReceived)).stop  # type: ignore[attr-defined]

    async def fetch_session(self, sid: bytes, begin: int = 0, end: int = 0xFFFFFFFF,
                            timeout: float | None = None) -> ev.FetchResult:
        self.cli.fetch_session(sid, begin, end)
        return await self._wait(ev.FetchResult, timeout)  # type: ignore[return-value]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._flush()
        self.cli.release()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def family_of(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.split("%", 1)[0]).version == 6 else socket.AF_INET
    except ValueError:
        return 0
