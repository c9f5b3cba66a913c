"""The key binder at run time: TWAMP sessions that live and die with the IPsec SA they run in.

Glue between the netlink layer (a live :class:`netlink.table.SATable` kept current by
XFRM notifications), the key binder (:mod:`agent.binder.announce`) and the O/TWAMP planes
(:mod:`agent.control.aio`, :mod:`agent.sessions.session`), per docs/wire-format.md §5.

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
    a :class:`agent.binder.announce.Binder` that maps the connection's addresses through the
    PolicyMap before binding, so tunnel-mode SAs with distinct inner addresses bind.
:class:`BinderRuntime`
    one per namespace: table, binder, ``key_source`` (BinderKeySource chained before
    any passphrase sources), RekeyTracker; ``bind(key, binding, handler)`` routes the
    tracker's Rebind/Stop to whoever owns that binding.
In :mod:`agent.sessions.bound_server` and :mod:`agent.sessions.bound_measurement`:

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

Logs carry SPIs, reqids, protocols and at most Secret fingerprints; never keys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from agent.binder import announce as bd
from agent.binder.announce import (
    Binder,
    BinderConfig,
    BinderKeySource,
    Binding,
    Rebind,
    RekeyTracker,
    Stop,
)
from agent.binder.keysource import IKEKeySource
from agent.control.keyring import ChainedKeySource, HandshakeContext
from netlink.events import EventKind, XfrmEvent
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
        from netlink.monitor import (
            TableFollower,  # pyroute2 is imported by the live path only
        )

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


def spis(b: Binding) -> str:
    return f"spi_c2s=0x{b.c2s.spi:08x} spi_s2c=0x{b.s2c.spi:08x} reqid={b.reqid}"
