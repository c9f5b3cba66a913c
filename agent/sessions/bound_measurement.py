"""The client side of the key binder at run time: a continuous TWAMP measurement that follows
rekeys of the SA pair it is bound to (docs/wire-format.md §5)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import socket
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.binder import announce as bd
from agent.binder.announce import (
    Rebind,
    Stop,
)
from agent.binder.keys import BinderRefusal
from agent.control import messages as m
from agent.control.aio import (
    AsyncControlClient,
    ControlError,
    family_of,
)
from agent.engine import udp
from agent.engine.packets import Proto as TestProto
from agent.engine.packets import security_from_mode, symmetric_padding
from agent.engine.sender import PacketRecord, TestSender
from agent.sessions import results
from agent.sessions.bound import Action, BinderRuntime, spis

log = logging.getLogger("xwamp.bound")


# ----------------------------------------------------------------------------- client


@dataclass
class Leg:
    """One control connection of a measurement (one SA pair)."""

    spi_c2s: int | None
    spi_s2c: int | None
    reqid: int | None
    mode: int
    sid: str
    sent: int = 0
    replies: int = 0
    end: str = ""  # "done", "rebind", "sa_deleted", "error: ..."


@dataclass
class BoundResult:
    """Counters of a whole measurement; they carry on across rekeys (wire-format §5)."""

    sent: int = 0
    replies: int = 0
    bad_hmac: int = 0
    rekeys: int = 0
    legs: list[Leg] = field(default_factory=list)
    # None: ran to completion. Else machine-readable: "sa_deleted" (wire-format §5), a binder
    # refusal reason (§6, e.g. "no_sa"), "session_refused" or "control_error".
    stop_reason: str | None = None
    stop_detail: str = ""
    rtts_ns: list[int] = field(default_factory=list, repr=False)

    @property
    def lost(self) -> int:
        return self.sent - self.replies

    @property
    def rtt(self) -> results.Stats | None:
        return results.Stats.of_ns(self.rtts_ns)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("rtts_ns")
        d["lost"] = self.lost
        rtt = self.rtt
        d["rtt"] = dataclasses.asdict(rtt) if rtt is not None else None
        return d


RTT_SAMPLES = 1 << 17


class SetupFailed(Exception):
    """A control connection could not be set up; ``reason`` is a binder refusal reason
    (wire-format §6) when the binder refused, else ``control_error``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BoundTwampMeasurement:
    """A TWAMP measurement over an IPsec-bound control connection that survives rekeys.

    Runs until ``count`` packets were sent, ``duration`` seconds passed, :meth:`stop`
    is called, or the SA is deleted with no successor (``stop_reason = "sa_deleted"``).
    """

    def __init__(self, runtime: BinderRuntime, host: str, port: int, *, wanted: Sequence[str] = ("auth+ipsec-bound",),
                 key_id: str = "xwamp-ipsec", count: int | None = None, duration: float | None = None,
                 interval: float = 0.05, wait: float = 0.5, timeout: float = 10.0,
                 rebind_timeout: float = 10.0) -> None:
        self.runtime = runtime
        self.host, self.port = host, port
        self.wanted, self.key_id = tuple(wanted), key_id
        self.count, self.duration = count, duration
        self.interval, self.wait, self.timeout = interval, wait, timeout
        self.rebind_timeout = rebind_timeout
        self.result = BoundResult()
        self._stop_requested = False
        self._wake: asyncio.Event | None = None
        self._ids = itertools.count(1)

    def stop(self) -> None:
        """Finish after the current packet (thread-unsafe: call on the loop's thread)."""
        self._stop_requested = True
        if self._wake is not None:
            self._wake.set()

    def _finished(self, t0: float) -> bool:
        if self._stop_requested:
            return True
        if self.count is not None and self.result.sent >= self.count:
            return True
        return self.duration is not None and time.monotonic() - t0 >= self.duration

    async def run(self) -> BoundResult:
        self._wake = asyncio.Event()
        t0 = time.monotonic()
        rebind_deadline: float | None = None
        while not self._finished(t0):
            try:
                action = await self._leg(t0)
            except SetupFailed as e:
                if rebind_deadline is not None and time.monotonic() < rebind_deadline:
                    # The peer may not have seen the new SA yet (wire-format §5): retry.
                    log.info("re-establishing after rekey: %s; retrying", e.reason)
                    await asyncio.sleep(0.2)
                    continue
                self.result.stop_reason, self.result.stop_detail = e.reason, e.detail
                break
            rebind_deadline = None
            if isinstance(action, Rebind):
                self.result.rekeys += 1
                rebind_deadline = time.monotonic() + self.rebind_timeout
                continue
            if isinstance(action, Stop):
                self.result.stop_reason = action.reason.value
                self.result.stop_detail = spis(action.old)
                break
        return self.result

    async def _connect(self) -> AsyncControlClient:
        before = collections.Counter(self.runtime.binder.refusals)
        try:
            return await AsyncControlClient.connect(self.host, self.port, twamp=True, wanted=self.wanted,
                                                    key_id=self.key_id, key_source=self.runtime.key_source,
                                                    timeout=self.timeout, family=family_of(self.host))
        except (ControlError, BinderRefusal) as e:
            refused = collections.Counter(self.runtime.binder.refusals) - before
            reason = next(iter(refused), None) or getattr(getattr(e, "reason", None), "value", None) or "control_error"
            raise SetupFailed(reason, str(e)) from None

    async def _leg(self, t0: float) -> Action | None:
        """One control connection: set up, test until done or the binder acts, stop, close."""
        conn = await self._connect()
        loop = asyncio.get_running_loop()
        action: asyncio.Future[Action] = loop.create_future()
        key: Hashable | None = None
        sock: socket.socket | None = None
        leg: Leg | None = None
        sender: TestSender | None = None
        try:
            mode = conn.cli.mode
            binding = None
            if mode & bd.IPSEC_BITS:
                assert conn.greeting is not None
                binding = self.runtime.binding_for("client", conn.local, conn.peer, mode, conn.greeting.unused)
                key = ("client", id(self), next(self._ids))
                self.runtime.bind(key, binding, lambda a: action.done() or action.set_result(a))
                log.info("measurement bound: %s", spis(binding))
            local_ip, peer_ip = conn.local[0], conn.peer[0]
            sock = udp.open_udp_socket((str(local_ip), 0))
            sock.setblocking(False)
            sec = security_from_mode(mode)
            pad = symmetric_padding(TestProto.TWAMP, sec)
            req = m.RequestTWSession(local_ip, peer_ip, sock.getsockname()[1], 0, padding_length=pad,
                                     timeout=int(self.wait * (1 << 32)))
            acc = await conn.request_tw_session(req)
            if not acc.ok:
                raise SetupFailed("session_refused", m.ACCEPT_NAMES[acc.accept.accept])
            leg = Leg(binding.c2s.spi if binding else None, binding.s2c.spi if binding else None,
                      binding.reqid if binding else None, mode, acc.accept.sid.hex())
            self.result.legs.append(leg)
            if await conn.start_sessions() != m.ACCEPT_OK:
                raise SetupFailed("session_refused", "Start-Sessions refused")
            sender = TestSender(TestProto.TWAMP, sec, keys=acc.test_keys, padding=pad, count=1 << 31)
            await self._send_until(sender, sock, (str(peer_ip), acc.accept.port), action, leg, t0)
            await self._drain(sender, sock, action, leg)
            outcome = action.result() if action.done() else None
            leg.end = "done" if outcome is None else ("rebind" if isinstance(outcome, Rebind) else outcome.reason.value)
            # wire-format §5: Stop-Sessions with Accept = 0 before re-establishing; after a
            # Stop the tunnel is gone and the message may never arrive (Accept = 2 says why).
            accept = m.ACCEPT_INTERNAL_ERROR if isinstance(outcome, Stop) else m.ACCEPT_OK
            with contextlib.suppress(ControlError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(conn.stop_sessions(1, accept), 2.0)
            return outcome
        except ControlError as e:
            if leg is not None:
                leg.end = f"error: {e}"
            raise SetupFailed("control_error", str(e)) from None
        finally:
            if key is not None:
                self.runtime.release(key)
            if sock is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(sock.fileno())
                sock.close()
            await conn.close()

    def _on_readable(self, sock: socket.socket, sender: TestSender, leg: Leg) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors surface here: the packet is simply lost
                continue
            rec = sender.on_reply(data, time.time_ns(), None)
            if rec is not None and not rec.duplicates:
                self._count_reply(rec, leg)
        # bad_hmac is copied at the end of the leg

    def _count_reply(self, rec: PacketRecord, leg: Leg) -> None:
        leg.replies += 1
        self.result.replies += 1
        rtt = rec.rtt_ns
        if rtt is not None:
            rtts = self.result.rtts_ns
            rtts.append(rtt)
            if len(rtts) > RTT_SAMPLES:  # a long-running measurement keeps the recent half
                del rtts[: RTT_SAMPLES // 2]

    async def _send_until(self, sender: TestSender, sock: socket.socket, dest: tuple[str, int],
                          action: asyncio.Future, leg: Leg, t0: float) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._on_readable, sock, sender, leg)
        assert self._wake is not None
        wake = asyncio.ensure_future(self._wake.wait())
        start = time.monotonic()
        n = 0
        try:
            while not action.done() and not self._finished(t0):
                data = sender.build(n, time.time_ns())
                try:
                    sock.sendto(data, dest)
                except OSError as e:  # e.g. no SA any more: counted as sent and lost
                    log.debug("send seq %d: %s", n, e)
                leg.sent += 1
                self.result.sent += 1
                n += 1
                delay = start + n * self.interval - time.monotonic()
                if delay > 0:  # absolute schedule; a binder decision or stop() wakes us early
                    await asyncio.wait({action, wake}, timeout=delay)
        finally:
            wake.cancel()

    async def _drain(self, sender: TestSender, sock: socket.socket, action: asyncio.Future, leg: Leg) -> None:
        """Late replies (RFC 5357 §4.2.1 Timeout): wait until all came back or ``wait`` passed."""
        end = time.monotonic() + self.wait
        while time.monotonic() < end and sender.counters.replies < sender.counters.sent:
            await asyncio.sleep(0.02)
        self._on_readable(sock, sender, leg)
        self.result.bad_hmac += sender.counters.bad_hmac
