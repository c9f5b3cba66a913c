"""The key binder at run time: TWAMP sessions that live and die with the IPsec SA they run in.

Glue between the netlink layer (a live :class:`netlink.table.SATable` kept current by
XFRM notifications), the key binder (:mod:`agent.binder`) and the O/TWAMP planes
(:mod:`agent.control.aio`, :mod:`agent.session`), per docs/wire-format.md §5.

API
---
:class:`XfrmFollower`
    netlink.monitor.TableFollower (the live SATable) plus a :class:`PolicyMap` folded
    from the same notifications; hands every event to its subscribers *after* the
    table applied it (RekeyTracker's contract). ``inject(event)`` for tests.
:class:`PolicyMap`
    the policy -> tunnel-endpoint mapping: a control connection between *inner*
    addresses rides an SA between *outer* ones (wire-format §2.1 "Addresses").
:class:`TunnelBinder`
    a :class:`agent.binder.Binder` that maps the connection's addresses through the
    PolicyMap before binding, so tunnel-mode SAs with distinct inner addresses bind.
:class:`BinderRuntime`
    one per namespace: table, binder, ``key_source`` (BinderKeySource chained before
    any passphrase sources), RekeyTracker; ``bind(key, binding, handler)`` routes the
    tracker's Rebind/Stop to whoever owns that binding.
:class:`BoundReflector`
    the per-connection TWAMP handler of a bound server (the agent's server uses it).
:class:`BoundTwampServer`
    a TWAMP server (ControlListener + session.TwampHandler) whose IPsec-bound
    connections stop reflecting with reason ``sa_deleted`` when their SA dies.
:class:`BoundTwampMeasurement`
    a continuous TWAMP measurement that follows rekeys: on Rebind it stops the
    sessions (Stop-Sessions, Accept=0), reconnects, binds to the new SA pair and
    restarts; its counters carry on and the rekey is counted. On Stop it ends with
    ``stop_reason = "sa_deleted"``. Results: :class:`BoundResult`.
:class:`NetnsLoop`
    an asyncio loop in a thread that setns(2)-ed into a named network namespace.

Logs carry SPIs, reqids, protocols and at most Secret fingerprints; never keys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from agent import binder as bd
from agent import results
from agent.binder import Binder, BinderConfig, BinderKeySource, Binding, Rebind, RekeyTracker, Stop
from agent.control import events as ev
from agent.control import messages as m
from agent.control.aio import AsyncControlClient, ControlError, ControlListener, ListenerLimits, family_of
from agent.control.server import ControlServer, ServerConfig
from agent.ipsec_keys import BinderRefusal
from agent.keyring import ChainedKeySource, HandshakeContext
from agent.keysource import IKEKeySource
from agent.session import TwampHandler
from agent.test import udp
from agent.test.packets import Proto as TestProto
from agent.test.packets import security_from_mode, symmetric_padding
from agent.test.sender import PacketRecord, TestSender
from netlink.events import EventKind, XfrmEvent
from netlink.netns import setns
from netlink.records import SA, IPAddress, Mode, Policy, Proto
from netlink.table import SATable

log = logging.getLogger("xwamp.bound")

T = TypeVar("T")
Action = Rebind | Stop


def _plain(a: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (dual-stack sockets) -> IPv4, the form policies and SAs use."""
    mapped = getattr(a, "ipv4_mapped", None)
    return mapped if mapped is not None else a


# ----------------------------------------------------------------------------- policies


@dataclass(frozen=True, slots=True)
class Outer:
    """Where a flow between two inner addresses is carried: the tunnel's outer endpoints."""

    local: IPAddress
    peer: IPAddress
    reqid: int  # the template's reqid (0 = any)
    proto: int


def _in_prefix(addr: IPAddress, net: IPAddress, plen: int) -> bool:
    if addr.version != net.version:
        return plen == 0 and net.is_unspecified
    if plen == 0:
        return True
    bits = 32 if addr.version == 4 else 128
    shift = bits - plen
    return (int(addr) >> shift) == (int(net) >> shift)


def _policy_key(p: Policy) -> Hashable:
    # The kernel identifies a policy by (selector, mark, if_id, direction, type) (xfrm_policy_bysel_ctx).
    mark = (p.mark.value, p.mark.mask) if p.mark is not None else None
    return (int(p.direction), p.selector, mark, p.if_id, p.policy_type)


class PolicyMap:
    """Outbound policies, to find which tunnel (outer addresses, reqid) carries a flow.

    RFC 4301 §4.4.1: the SPD entry whose selector matches the packet (here: the
    control connection's addresses) names the SA bundle; in tunnel mode its template
    carries the outer addresses. Only ``dir out`` policies matter: the SA pair the
    binder wants is named by the outbound template (its reverse is found by reqid).
    Port/protocol selectors are not looked at (xwamp binds per address pair).
    """

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._by_key: dict[Hashable, Policy] = {}
        for p in policies:
            self.put(p)

    def put(self, p: Policy) -> None:
        self._by_key[_policy_key(p)] = p

    def clear(self) -> None:
        self._by_key.clear()

    def __len__(self) -> int:
        return len(self._by_key)

    def apply(self, event: XfrmEvent) -> None:
        kind, p = event.kind, event.policy
        if kind in (EventKind.NEW_POLICY, EventKind.UPD_POLICY) and p is not None:
            self.put(p)
        elif (kind is EventKind.DEL_POLICY or (kind is EventKind.POLICY_EXPIRE and event.hard)) and p is not None:
            if self._by_key.pop(_policy_key(p), None) is None and p.index:
                for k, q in list(self._by_key.items()):  # deletion by index only
                    if q.index == p.index and int(q.direction) == int(p.direction):
                        del self._by_key[k]
        elif kind is EventKind.FLUSH_POLICY:
            self.clear()

    def out_policies(self) -> list[Policy]:
        """The outbound ALLOW policies with templates (the ones naming tunnels)."""
        return [p for p in self._by_key.values() if int(p.direction) == 1 and p.action == 0 and p.templates]

    def outer(self, local: IPAddress, peer: IPAddress) -> Outer | None:
        """The tunnel carrying local -> peer, or None (no tunnel-mode policy: transport
        mode or host-to-host, where the SA's addresses are the connection's own)."""
        local, peer = _plain(local), _plain(peer)
        best: tuple[tuple[int, int], Policy] | None = None
        for p in self._by_key.values():
            s = p.selector
            if int(p.direction) != 1 or p.action != 0 or not p.templates:  # XFRM_POLICY_OUT, ALLOW
                continue
            if not (_in_prefix(local, s.saddr, s.prefixlen_s) and _in_prefix(peer, s.daddr, s.prefixlen_d)):
                continue
            # Lower priority value wins (xfrm_policy_lookup_bytype); then the more specific selector.
            rank = (p.priority, -(s.prefixlen_s + s.prefixlen_d))
            if best is None or rank < best[0]:
                best = (rank, p)
        if best is None:
            return None
        tmpls = [t for t in best[1].templates if t.proto in (Proto.ESP, Proto.AH)]
        if not tmpls:
            return None
        # The outermost tunnel template gives the wire addresses; ESP keys an AH+ESP bundle.
        tunnel = next((t for t in tmpls if t.mode in (Mode.TUNNEL, Mode.BEET) and not t.daddr.is_unspecified), None)
        if tunnel is None:
            return None
        keyed = next((t for t in tmpls if t.proto == Proto.ESP), tmpls[0])
        return Outer(tunnel.saddr, tunnel.daddr, keyed.reqid, int(keyed.proto))

    def __repr__(self) -> str:
        return f"<PolicyMap {len(self)} policies>"


class TunnelBinder(Binder):
    """A Binder for tunnel-mode SAs whose inner (connection) addresses differ from the
    outer (SA) ones: the addresses are mapped through the outbound policy first.

    Limitation: several CHILD_SAs between the same outer pair (distinct reqids) are
    told apart only by Binder's "newest pair" rule, not by the policy's reqid.
    """

    def __init__(self, table: SATable, policies: PolicyMap | None = None, config: BinderConfig | None = None,
                 ike: IKEKeySource | None = None) -> None:
        super().__init__(table, config, ike)
        self.policies = policies

    def outer(self, local: IPAddress, peer: IPAddress) -> tuple[IPAddress, IPAddress]:
        local, peer = _plain(local), _plain(peer)
        o = self.policies.outer(local, peer) if self.policies is not None else None
        return (o.local, o.peer) if o is not None else (local, peer)

    def announce(self, server: IPAddress, client: IPAddress, *, count: bool = True) -> Binding:
        s, c = self.outer(server, client)
        return super().announce(s, c, count=count)

    def accept(self, unused: bytes, client: IPAddress, server: IPAddress) -> Binding:
        c, s = self.outer(client, server)
        return super().accept(unused, c, s)


# ----------------------------------------------------------------------------- follower


class XfrmFollower:
    """The SA table and policies of one network namespace, kept current.

    SAs: :class:`netlink.monitor.TableFollower` (subscribe, dump, follow; re-dump on
    overflow). Policies: dumped once after the follower subscribed, then folded from
    the same notifications into a :class:`PolicyMap` (re-dumped on OVERFLOW).
    Subscribers get every event after the table applied it (RekeyTracker's contract).

    ``netns``: the namespace's name; give it even when running on a :class:`NetnsLoop`
    thread, since the follower re-dumps from worker threads, which live in the
    process's original namespace. ``inject(event)`` feeds events from elsewhere (tests).
    """

    def __init__(self, netns: str | None = None, sas: Iterable[SA] = (), policies: PolicyMap | None = None) -> None:
        from netlink.monitor import TableFollower  # pyroute2 is imported by the live path only

        self.netns = netns
        self.follower = TableFollower(netns, on_event=self._on_event)
        self.table: SATable = self.follower.table
        for sa in sas:
            self.table.put(sa)
        self.policies = policies if policies is not None else PolicyMap()
        self._subs: list[Callable[[XfrmEvent], None]] = []
        self._task: asyncio.Task | None = None
        self.stats = collections.Counter[str]()

    def subscribe(self, cb: Callable[[XfrmEvent], None]) -> None:
        self._subs.append(cb)

    def _dump_policies(self) -> None:
        from netlink.client import XfrmClient

        with XfrmClient(self.netns) as xc:
            pols = xc.dump_policies()
        self.policies.clear()
        for p in pols:
            self.policies.put(p)

    async def start(self) -> None:
        """Subscribe and dump (in a worker thread), then follow on the running loop."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.follower.start)
        await loop.run_in_executor(None, self._dump_policies)  # after subscribing: no change is missed
        self._task = loop.create_task(self.follower.run())

    def _on_event(self, event: XfrmEvent) -> None:
        self.stats[event.kind.value] += 1
        if event.kind is EventKind.OVERFLOW:
            try:  # policy notifications may be lost too (the SAs were re-dumped already)
                self._dump_policies()
            except Exception:
                log.exception("re-dumping policies after an overflow failed")
        else:
            self.policies.apply(event)
        for cb in list(self._subs):
            try:
                cb(event)
            except Exception:  # one subscriber's bug must not stop the table from following
                log.exception("XFRM event subscriber failed")

    def inject(self, event: XfrmEvent) -> None:
        """Apply one event to the table and policies, then tell the subscribers."""
        if event.kind is not EventKind.OVERFLOW:
            self.table.apply(event)
        self._on_event(event)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.follower.close()


# ----------------------------------------------------------------------------- runtime


class BinderRuntime:
    """The binder of one namespace, with the rekey tracker driving bound sessions.

    ``key_source`` is what O/TWAMP servers and clients get: the BinderKeySource
    chained before any ``fallback`` sources (passphrases for the classic modes).
    Feed events with :meth:`on_event` after the table applied them (an
    :class:`XfrmFollower` subscription does that) and run :meth:`run_ticker` (or
    call :meth:`tick`) so grace periods end in a Stop.
    """

    def __init__(self, table: SATable, policies: PolicyMap | None = None, *, config: BinderConfig | None = None,
                 ike: IKEKeySource | None = None, grace: float = 5.0, fallback: Sequence[object] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        bd.register_modes()
        self.table = table
        self.policies = policies
        self.binder = TunnelBinder(table, policies, config, ike)
        self.keys = BinderKeySource(self.binder)
        self.key_source = ChainedKeySource(self.keys, *fallback)
        self.tracker = RekeyTracker(table, grace)
        self.clock = clock
        self._handlers: dict[Hashable, Callable[[Action], None]] = {}
        self._bound: dict[Hashable, Binding] = {}
        self._ticker: asyncio.Task | None = None

    @classmethod
    def following(cls, follower: XfrmFollower, **kw: Any) -> "BinderRuntime":
        rt = cls(follower.table, follower.policies, **kw)
        follower.subscribe(rt.on_event)
        return rt

    @property
    def rekeys(self) -> int:
        return self.tracker.rekeys

    def counters(self) -> dict[str, int]:
        """For exporters (wire-format §5/§6: ``xwamp_rekeys_total``,
        ``xwamp_binder_refusals_total{reason}``): rekeys, stops, bound sessions, refusals."""
        out = {"rekeys": self.tracker.rekeys, "stops": self.tracker.stops, "bound": len(self._bound)}
        out.update({f"refusals_{r}": n for r, n in sorted(self.binder.refusals.items())})
        return out

    @property
    def stops(self) -> int:
        return self.tracker.stops

    def binding_for(self, role: Literal["client", "server"], local: tuple[IPAddress, int] | None,
                    peer: tuple[IPAddress, int] | None, mode: int, unused: bytes = bytes(12)) -> Binding:
        """The binding the key source made (or makes) for this control connection."""
        return self.keys.binding(HandshakeContext(role, "twamp", local, peer, mode, greeting_unused=unused))

    def bind(self, key: Hashable, binding: Binding, handler: Callable[[Action], None]) -> None:
        """Route the tracker's decision about ``binding`` to ``handler`` (called once)."""
        self.tracker.watch(key, binding)
        self._handlers[key] = handler
        self._bound[key] = binding
        # The SA may have gone between the greeting and now: decide at once.
        self._dispatch(self._reconcile(self.clock()))

    def release(self, key: Hashable) -> None:
        self.tracker.unwatch(key)
        self._handlers.pop(key, None)
        self._bound.pop(key, None)

    def on_event(self, event: XfrmEvent) -> None:
        now = self.clock()
        actions = self.tracker.on_event(event, now)
        if event.kind in (EventKind.FLUSH_SA, EventKind.OVERFLOW):
            actions += self._reconcile(now)
        self._dispatch(actions)

    def _reconcile(self, now: float) -> list[Action]:
        """Bound SAs that left the table without a DEL_SA of their own (a FLUSH_SA, or
        notifications lost and re-dumped after an overflow): RekeyTracker follows
        per-SA deletions only, so tell it as if each had been deleted."""
        gone = {sa.key_id: sa for b in self._bound.values() for sa in (b.c2s, b.s2c) if sa.key_id not in self.table}
        actions: list[Action] = []
        for kid, sa in gone.items():
            actions += self.tracker.on_event(XfrmEvent(EventKind.DEL_SA, sa=sa, sa_id=kid), now)
        return actions

    def tick(self) -> None:
        self._dispatch(self.tracker.tick(self.clock()))

    def _dispatch(self, actions: list[Action]) -> None:
        for a in actions:
            self._bound.pop(a.key, None)
            h = self._handlers.pop(a.key, None)  # the tracker no longer watches the key either
            if h is None:
                continue
            try:
                h(a)
            except Exception:
                log.exception("handler for %r failed", a)

    async def run_ticker(self, interval: float = 0.25) -> None:
        while True:
            await asyncio.sleep(interval)
            self.tick()

    def start(self, interval: float = 0.25) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self.run_ticker(interval))

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None


def _spis(b: Binding) -> str:
    return f"spi_c2s=0x{b.c2s.spi:08x} spi_s2c=0x{b.s2c.spi:08x} reqid={b.reqid}"


# ----------------------------------------------------------------------------- server


@dataclass
class ServerConnection:
    """What a bound server connection did (results; no key material)."""

    peer: str
    mode: int = 0
    spi_c2s: int | None = None
    spi_s2c: int | None = None
    reqid: int | None = None
    sessions: int = 0
    client_stop: int | None = None  # Accept of the client's Stop-Sessions (0 = normal, §5 rebind)
    end: str | None = None  # "closed", "rebind" (the client reconnects), "sa_deleted"
    detail: str = ""


class BoundReflector:
    """session.TwampHandler plus the binding's fate: on Stop the reflector sessions end.

    ``owner`` provides ``runtime`` (BinderRuntime), ``connections`` (a list or bounded
    deque the connection's :class:`ServerConnection` is appended to) and ``_ids``."""

    def __init__(self, srv: ControlServer, owner: "BoundTwampServer") -> None:
        self.inner = TwampHandler(srv)
        self.owner = owner
        self.key: Hashable | None = None
        self.stopped = False
        self.rec = ServerConnection(str(srv.peer[0]) if srv.peer else "?")
        owner.connections.append(self.rec)

    async def on_event(self, srv: ControlServer, e: ev.Event) -> None:
        if isinstance(e, ev.SetupComplete):
            self.rec.mode = e.mode
            if e.mode & bd.IPSEC_BITS:
                rt = self.owner.runtime
                try:  # made by the greeting's announcement; kept until the connection closes
                    b = rt.binding_for("server", srv.local, srv.peer, e.mode)
                except BinderRefusal as err:
                    self.stopped = True
                    self.rec.end, self.rec.detail = err.reason.value, err.detail
                    return
                self.rec.spi_c2s, self.rec.spi_s2c, self.rec.reqid = b.c2s.spi, b.s2c.spi, b.reqid
                self.key = ("server", next(self.owner._ids))
                rt.bind(self.key, b, self._on_action)
            return
        if isinstance(e, ev.SessionRequested):
            if self.stopped:  # the SA this connection is keyed from is gone
                srv.accept_session(m.ACCEPT_FAILURE)
                return
            self.rec.sessions += 1
        elif isinstance(e, ev.StopRequested):
            self.rec.client_stop = e.stop.accept
        await self.inner.on_event(srv, e)

    def _on_action(self, a: Action) -> None:
        self.key = None
        if isinstance(a, Rebind):
            # wire-format §5: the client re-establishes on the new pair; this connection
            # keeps reflecting until the client's Stop-Sessions and close.
            self.rec.end, self.rec.detail = "rebind", repr(a)
            return
        self.stopped = True
        self.rec.end, self.rec.detail = a.reason.value, f"{_spis(a.old)}"
        log.info("server: stopping sessions of %s: %s (%s)", self.rec.peer, a.reason.value, _spis(a.old))
        # Server Stop-Sessions (Accept=2) and close through the listener when the owner
        # can (RFC 5357 §3.8); else just end the test sessions: the client sees its own Stop.
        abort = getattr(self.owner, "abort", None)
        if abort is None or not abort(self, m.ACCEPT_INTERNAL_ERROR):
            self.inner.close()

    def close(self) -> None:
        if self.key is not None:
            self.owner.runtime.release(self.key)
            self.key = None
        if self.rec.end is None:
            self.rec.end = "closed"
        self.inner.close()


class BoundTwampServer:
    """A TWAMP server keyed by the binder; IPsec-bound connections follow their SA."""

    def __init__(self, runtime: BinderRuntime, host: str, port: int = 0, *, modes: int | None = None,
                 key_source: object | None = None, limits: ListenerLimits = ListenerLimits(),
                 count: int = 1024) -> None:
        self.runtime = runtime
        if modes is None:
            modes = 1 | 2 | 4 | int(bd.Modes.IPSEC_BOUND | bd.Modes.IPSEC_ALT1)
            if runtime.binder.config.allow_alt2:
                modes |= int(bd.Modes.IPSEC_ALT2)
        self.connections: list[ServerConnection] = []
        self._ids = itertools.count(1)
        self.listener = ControlListener(lambda srv: BoundReflector(srv, self), twamp=True, hosts=[host], port=port,
                                        config=ServerConfig(modes=modes, count=count),
                                        key_source=key_source if key_source is not None else runtime.key_source,
                                        limits=limits)

    async def start(self) -> None:
        await self.listener.start()

    @property
    def port(self) -> int:
        return int(self.listener.addresses[0][1])

    async def close(self) -> None:
        await self.listener.close()

    def abort(self, handler: object, accept: int = m.ACCEPT_INTERNAL_ERROR) -> bool:
        return self.listener.abort(handler, accept)  # type: ignore[arg-type]


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
                self.result.stop_detail = _spis(action.old)
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
                log.info("measurement bound: %s", _spis(binding))
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


# ----------------------------------------------------------------------------- namespaces

class NetnsLoop:
    """An asyncio event loop on a thread inside network namespace ``netns`` (a name under
    /run/netns or a path). setns(2) of CLONE_NEWNET changes only the calling thread, so
    the rest of the process stays where it was; every socket the loop's code creates
    belongs to ``netns``."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"netns-loop-{netns}", daemon=True)

    def start(self) -> "NetnsLoop":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        path = self.netns if self.netns.startswith("/") else os.path.join("/run/netns", self.netns)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd)
            finally:
                os.close(fd)
            self.loop = asyncio.new_event_loop()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the namespace's loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> "asyncio.Future[T]":
        """Start ``coro`` on the loop; returns a concurrent.futures.Future."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[return-value]

    def close(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "NetnsLoop":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
