"""STAMP keyed from the tunnel, over the live SA table and policies (docs/wire-format.md §9).

:class:`TunnelStampKeys` finds the SA pair a STAMP flow rides in and derives its key
(agent.binder.stamp): the sender takes the current pair; the reflector gets every candidate
pair of the sender's tunnel (current first) plus, for ``grace`` seconds after they vanish from
the table, the keys of pairs it verified with before (a rekey deletes the old SAs while packets
keyed with them may still be in flight). Keys are cached per pair (derived once).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
import time
from typing import Any, Callable

from agent.binder.keys import BinderRefusal, Reason
from agent.binder.stamp import candidate_pairs, pair_tag, stamp_key
from agent.engine.crypto import StampCrypto
from agent.sessions.bound import PolicyMap, _plain
from agent.sessions.stamp import StampOptions, StampResult, stamp_session
from netlink.records import SA, IPAddress
from netlink.secret import Secret
from netlink.table import SATable

log = logging.getLogger("xwamp.stamp")

GRACE = 10.0  # seconds a vanished pair's key is still accepted (packets in flight across a rekey)
CACHE_S = 1.0  # per-peer candidate lists are rebuilt this often
REFRESH_S = 0.05  # ... or sooner after a packet no candidate verified, at most this often per peer
MAX_PEERS = 4096  # bounded per-peer caches


def _ip(a: Any) -> IPAddress:
    return _plain(ipaddress.ip_address(str(a).split("%", 1)[0]))


class TunnelStampKeys:
    def __init__(self, table: SATable, policies: PolicyMap | None, *, local: str | None = None,
                 grace: float = GRACE, clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.policies = policies
        self.local = _ip(local) if local and local not in ("::", "0.0.0.0") else None
        self.grace = grace
        self.clock = clock
        self._keys: dict[tuple, tuple[StampCrypto, str]] = {}  # pair id -> (crypto, tag)
        self._seen: dict[IPAddress, dict[tuple, float]] = {}  # peer -> pair ids verified, last seen
        self._cands: dict[IPAddress, tuple[float, list[tuple]]] = {}
        self.refusals: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ the path

    def _outer(self, local: IPAddress | None, peer: IPAddress) -> tuple[IPAddress | None, IPAddress, int]:
        """(our outer address, the peer's outer address, reqid) of the tunnel carrying local -> peer:
        the outbound policy's template (RFC 4301 §4.4.1); transport mode: the addresses themselves."""
        pm = self.policies
        if pm is not None:
            if local is not None:
                o = pm.outer(local, peer)
                if o is not None:
                    return o.local, o.peer, o.reqid
            else:  # a wildcard listener: any outbound policy toward this peer
                for p in pm.out_policies():
                    o = pm.outer(p.selector.saddr, peer)
                    if o is not None:
                        return o.local, o.peer, o.reqid
        return local, peer, 0

    def pairs(self, peer: IPAddress, local: IPAddress | None, role: str) -> list[tuple[SA, SA]]:
        """Candidate (sender->reflector, reflector->sender) pairs, current first. ``role``: whether
        we are the ``sender`` (local is the sender side) or the ``reflector``."""
        lo, po, reqid = self._outer(local, peer)
        if lo is None:  # reflector on a wildcard with no policy: SAs from the peer to anyone
            rev_sas = [sa for sa in self.table if sa.saddr == po]
            locals_ = {sa.daddr for sa in rev_sas}
            if len(locals_) != 1:
                return []
            lo = locals_.pop()
        ours, theirs = self.table.between(lo, po), self.table.between(po, lo)
        if role == "sender":
            return candidate_pairs(ours, theirs, reqid)
        return candidate_pairs(theirs, ours, reqid)

    def _crypto(self, c2s: SA, s2c: SA) -> tuple[StampCrypto, str]:
        pid = (c2s.key_id, s2c.key_id)
        got = self._keys.get(pid)
        if got is None:
            got = (StampCrypto(stamp_key(c2s, s2c)), pair_tag(c2s, s2c))
            self._keys[pid] = got
        return got

    # ------------------------------------------------------------------ sender

    def sender_key(self, local: str, peer: str) -> tuple[Secret, str]:
        """The current pair's key toward ``peer`` from ``local`` (inner addresses), and its tag.
        BinderRefusal (counted) when there is no usable pair."""
        pairs = self.pairs(_ip(peer), _ip(local), "sender")
        if not pairs:
            self.refusals[Reason.NO_SA.value] += 1
            raise BinderRefusal(Reason.NO_SA, f"no SA pair carries {local} -> {peer}")
        c2s, s2c = pairs[0]
        try:
            return stamp_key(c2s, s2c), pair_tag(c2s, s2c)
        except BinderRefusal as e:
            self.refusals[e.reason.value] += 1
            raise

    # ------------------------------------------------------------------ reflector

    def keys_for(self, host: Any, fresh: bool = False) -> list[StampCrypto]:
        """Candidates for a packet from ``host``: live pairs (current first), then pairs that
        verified within ``grace`` seconds but have since gone from the table. ``fresh``: a packet
        matched none; look at the table again unless that was done in the last REFRESH_S."""
        try:
            peer = _ip(host)
        except ValueError:
            return []
        now = self.clock()
        hit = self._cands.get(peer)
        if hit is None or now - hit[0] > (REFRESH_S if fresh else CACHE_S):
            ids: list[tuple] = []
            for c2s, s2c in self.pairs(peer, self.local, "reflector"):
                try:
                    self._crypto(c2s, s2c)
                except BinderRefusal as e:
                    self.refusals[e.reason.value] += 1
                    continue
                ids.append((c2s.key_id, s2c.key_id))
            if len(self._cands) >= MAX_PEERS:
                self._cands.clear()
            hit = (now, ids)
            self._cands[peer] = hit
            self._expire(now)
        ids = list(hit[1])
        seen = self._seen.get(peer, {})
        ids += [pid for pid, t in seen.items() if pid not in ids and now - t <= self.grace and pid in self._keys]
        return [self._keys[pid][0] for pid in ids]

    def verified(self, host: Any, crypto: StampCrypto) -> None:
        """Remember which pair verified a packet from ``host`` (for the grace period)."""
        try:
            peer = _ip(host)
        except ValueError:
            return
        for pid, (cr, _tag) in self._keys.items():
            if cr is crypto:
                if peer not in self._seen and len(self._seen) >= MAX_PEERS:
                    self._seen.clear()
                self._seen.setdefault(peer, {})[pid] = self.clock()
                return

    def _expire(self, now: float) -> None:
        live = {sa.key_id for sa in self.table}
        for peer in list(self._seen):
            s = self._seen[peer]
            for pid, t in list(s.items()):
                if now - t > self.grace and not (pid[0] in live and pid[1] in live):
                    del s[pid]
            if not s:
                del self._seen[peer]
        keep = {pid for s in self._seen.values() for pid in s}
        for pid in list(self._keys):
            if pid not in keep and not (pid[0] in live and pid[1] in live):
                del self._keys[pid]

    def reflector(self, **kw: Any):
        """A TunnelKeyedReflector fed by these keys."""
        from agent.engine.keyed_reflector import TunnelKeyedReflector

        return TunnelKeyedReflector(self.keys_for, self.verified, **kw)


def route_source(peer: str) -> str:
    """The local address the kernel would send to ``peer`` from (a connected UDP socket; no packet)."""
    fam = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return str(_plain(ipaddress.ip_address(s.getsockname()[0])))


async def tunnel_stamp_session(opt: StampOptions, on_record: Any = None, stop: asyncio.Event | None = None,
                               keys: TunnelStampKeys | None = None) -> StampResult:
    """``xwamp stamp --key-from-tunnel``: key ``opt`` from the live SA pair toward ``opt.host``.
    Without ``keys``, this namespace's SA table and policies are read here (and let go after)."""
    from agent.sessions.bound import XfrmFollower

    fol = None
    if keys is None:
        fol = XfrmFollower(None)
        await fol.start()
        keys = TunnelStampKeys(fol.table, fol.policies)
    try:
        local = opt.local_addr or route_source(opt.host)
        opt.key, tag = keys.sender_key(local, opt.host)
        log.info("STAMP keyed from the tunnel: %s", tag)
        opt.local_addr = local
        res = await stamp_session(opt, on_record, stop)
        res.key_tag = tag
        return res
    finally:
        if fol is not None:
            await fol.close()


__all__ = ["TunnelStampKeys", "tunnel_stamp_session", "route_source", "GRACE"]
