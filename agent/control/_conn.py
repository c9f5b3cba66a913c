"""Machinery shared by the client and server state machines: buffers, streams, failure."""

from __future__ import annotations

import logging
from typing import Callable

from agent.control import events as ev
from agent.control import messages as m
from agent.control.keyring import HandshakeContext
from agent.control.messages import HMAC_LEN, ProtocolError
from agent.control import modes as md
from agent.control.security import RecvStream, SendStream, SessionKeys, derive_test_keys
from agent.control.states import HOLD_STATES, Proto, Role, State, UsageError, protocol_of
from agent.engine.keys import TestKeys

log = logging.getLogger(__name__)

MAX_BUFFER = 1 << 20  # a peer may not make us hold more than this undecoded


__all__ = ["UsageError", "_Conn"]  # UsageError lives in states.py, with the tables it enforces


KeyContinuation = Callable[[object, "BaseException | None"], list[ev.Event]]


class _Conn:
    role: Role

    def __init__(self, twamp: bool, defer_keys: bool = False) -> None:
        self.twamp = twamp
        # defer_keys: hand slow key derivations to the I/O adapter (ev.KeyNeeded) instead of
        # running them inside receive_data(), so one client's PBKDF2 never stalls the others.
        self.defer_keys = defer_keys
        self._key_cont: KeyContinuation | None = None
        self._key_state = State.CLOSED
        self.owamp = not twamp
        self._send = SendStream()
        self._recv = RecvStream()
        self._out = bytearray()
        self._keys: SessionKeys | None = None
        self.mode = 0
        self.closed = False
        self.state = State.CLOSED  # the subclass sets its initial state
        self._key_source: object | None = None
        self._ctx: HandshakeContext | None = None
        self._test_plane_secure = False
        self._released = False

    @property
    def proto(self) -> Proto:
        """Which tables apply: OWAMP, TWAMP, or TWAMP with RFC 5938 (from the selected mode)."""
        return protocol_of(self.twamp, bool(self.mode & md.Mode.INDIVIDUAL_SESSION_CONTROL))

    @property
    def context(self) -> HandshakeContext | None:
        """The HandshakeContext the key source saw (addresses, selected mode, Salt, Count,
        greeting Unused); None before the greeting. Read-only; it holds no key material."""
        return self._ctx

    # --- output ---
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _emit(self, plain: bytes, hmac_offsets: tuple[int, ...] = ()) -> None:
        self._out += self._send.seal(plain, hmac_offsets)

    # --- input ---
    def receive_data(self, data: bytes) -> list[ev.Event]:
        """Feed bytes from the peer; return the events they complete. Never raises:
        a broken peer yields a ProtocolFailure event and the connection is closed."""
        if self.closed:
            return []
        out: list[ev.Event] = []

        def run() -> None:
            self._recv.feed(bytes(data))
            if len(self._recv.plain) > MAX_BUFFER:
                raise ProtocolError("peer sent too much unanswered data")
            while not self.closed and self.state not in HOLD_STATES:
                step = self._step()
                if step is None:
                    break
                out.extend(step)

        self._guarded(run, out)
        return out

    def _guarded(self, fn: Callable[[], None], out: list[ev.Event]) -> None:
        try:
            fn()
        except ProtocolError as e:
            out.append(self._fail(str(e)))
        except Exception:  # a bug must not take the server down: close this connection only
            log.exception("control state machine error (connection closed)")
            out.append(self._fail("internal error"))

    # --- slow key derivations ---
    def _derive(self, job: Callable[[], object], cont: KeyContinuation) -> list[ev.Event]:
        """Run ``job`` now, or (defer_keys) ask the adapter for it; ``cont(result, error)``
        finishes the step either way."""
        if not self.defer_keys:
            try:
                result = job()
            except Exception as e:  # handed to cont, which decides what it means
                return cont(None, e)
            return cont(result, None)
        self._key_cont, self._key_state, self.state = cont, self.state, State.WAIT_KEY
        return [ev.KeyNeeded(job)]

    def key_ready(self, result: object = None, error: BaseException | None = None) -> list[ev.Event]:
        """The adapter's answer to ev.KeyNeeded: the job's result, or the exception it raised.
        Returns the events that completes, including those of input buffered meanwhile."""
        if self._key_cont is None:
            raise UsageError("no key derivation pending")
        cont, self._key_cont = self._key_cont, None
        out: list[ev.Event] = []
        if self.closed:  # closed meanwhile (EOF, shutdown): nothing to finish
            return out
        self.state = self._key_state
        self._guarded(lambda: out.extend(cont(result, error)), out)
        if not self.closed:
            out.extend(self.receive_data(b""))
        return out

    def _step(self) -> list[ev.Event] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _have(self, n: int) -> bool:
        return len(self._recv.plain) >= n

    def _take(self, n: int, hmac_offsets: tuple[int, ...]) -> bytes | None:
        """The next complete message of ``n`` octets, its HMACs checked; None if incomplete."""
        if not self._have(n):
            return None
        plain = self._recv.take(n)
        self._recv.verify(plain, hmac_offsets)
        return plain

    def _take_stop(self) -> m.StopSessions | None:
        """A complete Stop-Sessions (either direction; OWAMP's carries session descriptions)."""
        n = m.StopSessions.needed_length(bytes(self._recv.plain), self.owamp)
        if n is not None and n > MAX_BUFFER:  # sessions x skip ranges: refuse now, not at 1 MiB
            raise ProtocolError("Stop-Sessions longer than we hold")
        plain = None if n is None else self._take(n, (n - HMAC_LEN,))
        return None if plain is None else m.StopSessions.unpack(plain, owamp=self.owamp)

    def _switch_recv(self, stream: RecvStream) -> None:
        """Start decrypting: what is already buffered beyond the handshake is ciphertext."""
        rest = bytes(self._recv.plain)
        self._recv = stream
        if rest:
            stream.feed(rest)

    def _fail(self, reason: str) -> ev.ProtocolFailure:
        self.closed = True
        self.state = State.CLOSED
        self.release()
        return ev.ProtocolFailure(reason)

    def close(self, reason: str = "closed") -> ev.ConnectionClosed:
        self.closed = True
        self.state = State.CLOSED
        self.release()
        return ev.ConnectionClosed(reason)

    def release(self) -> None:
        """The connection is over: let the key source drop per-connection state (its
        optional ``forget(ctx)`` hook). Idempotent; the I/O adapter calls it on EOF too."""
        if self._released or self._ctx is None:
            return
        self._released = True
        hook = getattr(self._key_source, "forget", None)
        if hook is not None:
            try:
                hook(self._ctx)
            except Exception:
                log.exception("key source forget() failed")

    # --- test-plane keys ---
    def test_keys(self, sid: bytes) -> TestKeys | None:
        """Keys for the test session ``sid``: from the key source's ``test_keys`` hook if it
        answers, else derived per RFC 4656 §4.1.2; None when test packets are unauthenticated."""
        if not self._test_plane_secure:
            return None
        hook: Callable | None = getattr(self._key_source, "test_keys", None)
        if hook is not None and self._ctx is not None:
            k = hook(sid, self._ctx)
            if k is not None:
                return k
        if self._keys is None:
            return None
        return derive_test_keys(self._keys, sid)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {'twamp' if self.twamp else 'owamp'} state={self.state} mode={self.mode}>"
