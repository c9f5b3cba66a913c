"""The real session runner: a peer measured in cycles of ``count`` packets (TWAMP or OWAMP),
following rekeys of the SA pair it is bound to."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

from agent.daemon.discovery import SessionSpec
from agent.sessions.metrics import SessionMetrics

log = logging.getLogger("xwamp.agent")

STOP_TIMEOUT = 5.0  # per runner: long enough for Stop-Sessions, short of systemd's TimeoutStopSec
REBIND_TIMEOUT = 10.0  # after a rekey, the peer may need a moment to see the new pair (wire-format §5)
_bind_ids = itertools.count(1)


def _hw(iface: str | None) -> bool:
    """``iface`` set: hardware stamps from it, its stamping switched on once per process (the
    supervisor puts it back at shutdown); software stamps where it cannot (logged)."""
    from agent.engine import timestamping as ts

    return ts.hardware_opt_in(iface)


class SessionStopped(Exception):
    """The session's SA binding ended it (reason first: ``sa_deleted: spi...``); key-free."""


class CycleRunner:
    """A configured or discovered peer, measured in cycles of ``count`` packets.

    TWAMP: one control connection at a time; each cycle is Request-TW-Session,
    Start-Sessions, the packets, Stop-Sessions; then its records go to the metrics.
    :meth:`stop` interrupts the packets and still sends Stop-Sessions before closing.
    In an IPsec-derived mode the connection is bound to its SA pair (``runtime``, an
    agent.sessions.bound.BinderRuntime): on a rekey the cycle is cut short, Stop-Sessions
    (Accept=0) sent and the connection re-established on the new pair (``rebinds``);
    when the SA dies with no successor the runner ends with :class:`SessionStopped`.
    OWAMP: each cycle is one agent.sessions.session.owping conversation (both directions + fetch)."""

    def __init__(self, spec: SessionSpec, metrics: SessionMetrics, key_source: Any, runtime: Any = None) -> None:
        self.spec = spec
        self.metrics = metrics
        self.key_source = key_source
        self.runtime = runtime
        self._task: asyncio.Task | None = None
        self._sender: asyncio.Future | None = None
        self._stopping = False
        self._cycles = 0
        self.stop_sent = False
        self.binding: Any = None  # the live agent.binder.announce.Binding, for snapshots (repr is key-free)

    async def start(self) -> None:
        proto = self.spec.session.protocol
        run = self._twamp if proto == "twamp" else self._stamp if proto == "stamp" else self._owamp
        self._task = asyncio.ensure_future(run())

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        self._stopping = True
        if self._task is None or self._task.done():
            return
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()  # the cycle then sends Stop-Sessions and closes
            done, _ = await asyncio.wait({self._task}, timeout=STOP_TIMEOUT / 2)
            if done:
                return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        return {"peer": str(self.spec.address), "cycles": self._cycles, "up": self.metrics.up,
                "binding": repr(self.binding) if self.binding is not None else ""}

    async def _twamp(self) -> None:
        from agent.binder.announce import Rebind
        from agent.binder.keys import BinderRefusal
        from agent.control.aio import GreetingRefused

        rebind_deadline: float | None = None
        while not self._stopping:
            try:
                action = await self._twamp_connection()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if rebind_deadline is not None and time.monotonic() < rebind_deadline and not self._stopping:
                    log.info("re-establishing on the new SA pair failed, retrying",
                             extra={"session": self.spec.key, "error": str(e) or type(e).__name__})
                    await asyncio.sleep(0.5)
                    continue
                # Our binder refused the peer's greeting or the pair: not a network failure.
                if isinstance(e, (GreetingRefused, BinderRefusal)):
                    self.metrics.stop_binder_refused += 1
                raise
            rebind_deadline = None
            if action is None:
                return
            if isinstance(action, Rebind):
                self.metrics.rebinds += 1
                log.info("rekey: rebinding the session on the new SA pair",
                         extra={"session": self.spec.key, "spi_c2s": f"0x{action.new_c2s.spi:08x}",
                                "spi_s2c": f"0x{action.new_s2c.spi:08x}", "reqid": action.old.reqid})
                rebind_deadline = time.monotonic() + REBIND_TIMEOUT
                continue
            self.metrics.stop_sa_deleted += 1
            raise SessionStopped(f"{action.reason.value}: spi_c2s=0x{action.old.c2s.spi:08x} "
                                 f"spi_s2c=0x{action.old.s2c.spi:08x} reqid={action.old.reqid}")

    async def _twamp_connection(self) -> Any:
        """One control connection: cycles until stopped (None) or the binder acts (Rebind/Stop)."""
        from agent.binder.announce import IPSEC_BITS, Stop
        from agent.control import messages as m
        from agent.control.aio import AsyncControlClient, ControlError, family_of
        from agent.engine import udp
        from agent.engine.packets import Proto, security_from_mode, symmetric_padding

        t = self.spec.session
        host = str(self.spec.address)
        # From the configured source / the tunnel's inner address: the connection (and so
        # the test packets, sent from its local address) must take the measured path.
        local = str(self.spec.local) if self.spec.local is not None else None
        conn = await AsyncControlClient.connect(host, t.effective_port, twamp=True, wanted=t.modes,
                                                key_id=t.user or "", key_source=self.key_source,
                                                family=family_of(host), local_addr=local)
        loop = asyncio.get_running_loop()
        action: asyncio.Future = loop.create_future()
        key: tuple[str, str, int] | None = None
        try:
            mode = conn.cli.mode
            if self.runtime is not None and mode & IPSEC_BITS:
                assert conn.greeting is not None
                self.binding = self.runtime.binding_for("client", conn.local, conn.peer, mode, conn.greeting.unused)

                def on_action(a: Any) -> None:
                    if not action.done():
                        action.set_result(a)
                    if self._sender is not None and not self._sender.done():
                        self._sender.cancel()  # the cycle ends now; Stop-Sessions follows

                key = ("daemon", self.spec.key, next(_bind_ids))
                self.runtime.bind(key, self.binding, on_action)  # may decide at once (SA already gone)
                self.metrics.sa_keyed = True
                log.info("session bound to its SA pair",
                         extra={"session": self.spec.key, "spi_c2s": f"0x{self.binding.c2s.spi:08x}",
                                "spi_s2c": f"0x{self.binding.s2c.spi:08x}", "reqid": self.binding.reqid,
                                "mode": f"0x{mode:08x}"})
            local_ip, peer_ip = conn.local[0], conn.peer[0]
            pad = t.padding if t.padding is not None else symmetric_padding(Proto.TWAMP, security_from_mode(mode))
            while not self._stopping and not action.done():
                sock = udp.open_udp_socket((str(local_ip), 0), dscp=t.dscp or None)
                try:
                    req = m.RequestTWSession(local_ip, peer_ip, sock.getsockname()[1], 0, padding_length=pad,
                                             timeout=int(t.timeout * (1 << 32)), type_p=m.typep_from_dscp(t.dscp))
                    acc = await conn.request_tw_session(req)
                    if not acc.ok:
                        raise ControlError(f"session refused: {m.ACCEPT_NAMES[acc.accept.accept]}")
                    if await conn.start_sessions() != m.ACCEPT_OK:
                        raise ControlError("Start-Sessions refused")
                    self.metrics.up = True
                    self._sender = asyncio.ensure_future(udp.run_twamp_sender(
                        ("", 0), (str(peer_ip), acc.accept.port), mode, acc.test_keys, count=t.count,
                        interval=t.interval, schedule=t.schedule, padding=pad, timeout=t.timeout, sock=sock,
                        iface=t.iface, hardware=_hw(t.iface)))
                    if action.done():  # decided while we set up: no packets on a dead pair
                        self._sender.cancel()
                    records = None
                    try:
                        records = await self._sender
                    except asyncio.CancelledError:
                        if not self._stopping and not action.done():
                            raise  # we were cancelled, not just the packets
                    # wire-format §5: Accept=0 before re-establishing on a new pair; after a
                    # Stop the tunnel is gone and the message may never arrive (Accept=2 says why).
                    outcome = action.result() if action.done() else None
                    if isinstance(outcome, Stop):
                        with contextlib.suppress(ControlError, OSError, asyncio.TimeoutError):
                            await asyncio.wait_for(conn.stop_sessions(1, m.ACCEPT_INTERNAL_ERROR), 2.0)
                    else:
                        await conn.stop_sessions(1)
                    self.stop_sent = True
                    if records is None:
                        break
                    self.metrics.observe_cycle(records, reflector_stateful=True)
                    self._cycles += 1
                finally:
                    self._sender = None
                    sock.close()
            return action.result() if action.done() else None
        finally:
            if key is not None:
                self.runtime.release(key)
            self.binding = None
            self.metrics.up = False
            self.metrics.sa_keyed = False
            await conn.close()

    async def _owamp(self) -> None:
        from agent.sessions.session import PingOptions, owping

        t = self.spec.session
        while not self._stopping:
            opt = PingOptions(host=str(self.spec.address), port=t.effective_port, count=t.count, interval=t.interval,
                              schedule=t.schedule, padding=t.padding, dscp=t.dscp, wanted=t.modes,
                              key_id=t.user or "", key_source=self.key_source, wait=t.timeout, iface=t.iface)
            ow = await owping(opt)
            self.metrics.up = True
            self.metrics.observe_owamp(ow.forward_records, ow.forward.sent, ow.reverse_records, ow.reverse.sent)
            self._cycles += 1

    async def _stamp(self) -> None:
        """STAMP (RFC 8762): no control channel; each cycle is ``count`` packets to the
        reflector's UDP port, Follow-Up Telemetry asked (RFC 8972 §4.7), then the records go to
        the same metrics as TWAMP's."""
        from agent.sessions.stamp import StampOptions, stamp_session

        t = self.spec.session
        key = None
        if t.modes[0] == "auth" and t.keyfile:
            from agent.control.keyring import read_hmac_key
            from netlink.secret import Secret

            key = Secret(read_hmac_key(t.keyfile))
        local = str(self.spec.local) if self.spec.local is not None else None
        tunnel = None
        if t.modes[0] == "auth+ipsec-bound":
            from agent.sessions.stamp_keys import TunnelStampKeys, route_source

            if self.runtime is None:
                raise SessionStopped("no_sa: STAMP keyed from the tunnel needs the SA table")
            tunnel = TunnelStampKeys(self.runtime.table, self.runtime.policies)
            local = local or route_source(str(self.spec.address))
        while not self._stopping:
            if tunnel is not None:
                # wire-format §9: the current pair keys each cycle; after a rekey the next cycle takes
                # the new pair, while the reflector still accepts the old one for its grace period.
                key, tag = tunnel.sender_key(local, str(self.spec.address))
                if tag != getattr(self, "_stamp_pair", tag):
                    self.metrics.rebinds += 1
                    log.info("rekey: STAMP session keyed from the new SA pair",
                             extra={"session": self.spec.key, "pair": tag})
                self._stamp_pair = tag
                self.metrics.sa_keyed = True
            opt = StampOptions(str(self.spec.address), t.effective_port, count=t.count, interval=t.interval,
                               schedule=t.schedule, padding=t.padding, dscp=t.dscp, local_addr=local, key=key,
                               wait=t.timeout, follow_up=True, iface=t.iface if _hw(t.iface) else None)
            stop = asyncio.Event()
            self._sender = asyncio.ensure_future(stamp_session(opt, stop=stop))
            try:
                res = await self._sender
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
                return
            finally:
                self._sender = None
            self.metrics.up = bool(res.summary.loss.received)
            self.metrics.observe_cycle(res.records, reflector_stateful=res.stateful)
            self._cycles += 1
