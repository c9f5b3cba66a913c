"""An in-memory copy of the kernel's SA database, indexed the ways xwamp asks.

No I/O: fill it from a dump (:meth:`SATable.from_sas`) and keep it current
with :meth:`SATable.apply` (see :class:`netlink.monitor.TableFollower`).

Indexes (all O(1) to reach):
  * (spi, proto, daddr) -> SA — the kernel's own SA identity (xfrm_usersa_id);
  * reqid -> SAs — both directions of one IKE CHILD_SA share a reqid;
  * (saddr, daddr) -> SAs — for :meth:`pair` and :meth:`pairs`.

The kernel also keys lookups by mark/if_id, so two SAs may in principle share
(spi, proto, daddr) under different marks; such a pair collapses to the
last-seen one here (IKE daemons allocate inbound SPIs uniquely per host).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator

from netlink.events import EventKind, XfrmEvent
from netlink.constants import IPSEC_PROTO_ANY
from netlink.records import SA, IPAddress, Proto

Key = tuple[int, int, IPAddress]  # (spi, proto, daddr)


class SATable:
    __slots__ = ("_by_id", "_order", "_by_reqid", "_by_addrs", "_counter", "_pairs_of")

    def __init__(self) -> None:
        self._by_id: dict[Key, SA] = {}
        self._order: dict[Key, int] = {}  # insertion ordinal, the last tie-breaker
        # Inner dicts are used as ordered sets keyed by SA identity.
        self._by_reqid: dict[int, dict[Key, SA]] = {}
        self._by_addrs: dict[tuple[IPAddress, IPAddress], dict[Key, SA]] = {}
        # address -> the (saddr, daddr) pairs it is in: one entry per address pair,
        # not per SA, so :meth:`touching` costs what it returns.
        self._pairs_of: dict[IPAddress, set[tuple[IPAddress, IPAddress]]] = {}
        self._counter = itertools.count()

    @classmethod
    def from_sas(cls, sas: Iterable[SA]) -> "SATable":
        table = cls()
        for sa in sas:
            table.put(sa)
        return table

    # --- mutation -----------------------------------------------------------

    def put(self, sa: SA) -> None:
        """Insert ``sa`` or replace the SA with the same (spi, proto, daddr).

        A replacement (UPDSA, soft expire) keeps its insertion ordinal: it is
        the same SA, not a newer one.
        """
        key = sa.key_id
        old = self._by_id.get(key)
        if old is not None:
            self._unindex(key, old)
        else:
            self._order[key] = next(self._counter)
        self._by_id[key] = sa
        self._by_reqid.setdefault(sa.reqid, {})[key] = sa
        pair = (sa.saddr, sa.daddr)
        bucket = self._by_addrs.get(pair)
        if bucket is None:
            bucket = self._by_addrs[pair] = {}
            self._pairs_of.setdefault(sa.saddr, set()).add(pair)
            self._pairs_of.setdefault(sa.daddr, set()).add(pair)
        bucket[key] = sa

    def remove(self, key: Key) -> SA | None:
        """Drop the SA with this (spi, proto, daddr); returns it, or None if absent."""
        key = (key[0], int(key[1]), key[2])
        sa = self._by_id.pop(key, None)
        if sa is not None:
            self._order.pop(key, None)
            self._unindex(key, sa)
        return sa

    def _unindex(self, key: Key, sa: SA) -> None:
        for index, ikey in ((self._by_reqid, sa.reqid), (self._by_addrs, (sa.saddr, sa.daddr))):
            bucket = index.get(ikey)  # type: ignore[attr-defined]
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del index[ikey]  # type: ignore[attr-defined]
                    if index is self._by_addrs:
                        for a in ikey:  # type: ignore[union-attr]
                            pairs = self._pairs_of.get(a)
                            if pairs is not None:
                                pairs.discard(ikey)  # type: ignore[arg-type]
                                if not pairs:
                                    del self._pairs_of[a]

    def replace_all(self, sas: Iterable[SA]) -> None:
        """Become a table of exactly ``sas`` (after a re-dump), keeping identity:
        holders of this object see the new contents, never a half-built table."""
        fresh = SATable.from_sas(sas)
        self._by_id, self._order, self._by_reqid, self._by_addrs, self._counter, self._pairs_of = (
            fresh._by_id, fresh._order, fresh._by_reqid, fresh._by_addrs, fresh._counter, fresh._pairs_of,
        )

    def clear(self) -> None:
        self._by_id.clear()
        self._order.clear()
        self._by_reqid.clear()
        self._by_addrs.clear()
        self._pairs_of.clear()

    def apply(self, event: XfrmEvent) -> None:
        """Fold one kernel notification into the table.

        NEW_SA/UPD_SA insert or replace; DEL_SA and hard EXPIRE remove; a soft
        EXPIRE refreshes the counters of an SA already present but never
        resurrects one we no longer hold; FLUSH_SA removes every SA of its
        protocol. Policy and OVERFLOW events do not touch SAs (on OVERFLOW
        the owner must rebuild the table from a fresh dump).
        """
        kind = event.kind
        if kind in (EventKind.NEW_SA, EventKind.UPD_SA):
            if event.sa is not None:
                self.put(event.sa)
        elif kind is EventKind.DEL_SA or (kind is EventKind.EXPIRE and event.hard):
            key = event.key_id
            if key is not None:
                self.remove(key)
        elif kind is EventKind.EXPIRE:
            # The expire message carries counters but no algorithms (xfrm.h
            # struct xfrm_user_expire + marks only): refresh, keep our keys.
            if event.sa is not None:
                held = self._by_id.get(event.sa.key_id)
                if held is not None:
                    self.put(dataclasses.replace(held, current=event.sa.current, stats=event.sa.stats))
        elif kind is EventKind.FLUSH_SA:
            proto = event.proto
            if proto is None or proto in (0, IPSEC_PROTO_ANY):
                self.clear()
            else:
                for key in [k for k in self._by_id if k[1] == proto]:
                    self.remove(key)

    # --- queries ------------------------------------------------------------

    def get(self, spi: int, proto: int, daddr: IPAddress) -> SA | None:
        return self._by_id.get((spi, int(proto), daddr))

    def by_reqid(self, reqid: int) -> list[SA]:
        """Every SA with this reqid, in insertion order."""
        bucket = self._by_reqid.get(reqid)
        return list(bucket.values()) if bucket else []

    def between(self, saddr: IPAddress, daddr: IPAddress) -> list[SA]:
        """Every SA from ``saddr`` to ``daddr``, in insertion order."""
        bucket = self._by_addrs.get((saddr, daddr))
        return list(bucket.values()) if bucket else []

    def touching(self, addr: IPAddress) -> list[SA]:
        """Every SA from or to ``addr`` (index lookups: the cost follows the result)."""
        out: list[SA] = []
        for pair in self._pairs_of.get(addr, ()):
            out.extend(self._by_addrs[pair].values())
        return out

    def _newest(self, candidates: Iterable[SA], proto: int | None) -> SA | None:
        """The SA a sender would use now: during a rekey overlap both old and
        new SAs exist; the newest by add_time wins, then the later inserted."""
        best: SA | None = None
        best_rank: tuple[int, int, int] | None = None
        for sa in candidates:
            p = int(sa.proto)
            if proto is None:
                if p == Proto.COMP:  # IPcomp is never a measurement SA
                    continue
            elif p != proto:
                continue
            # ESP before AH when both protect the same flow (an AH+ESP bundle):
            # ESP carries the confidentiality key O/TWAMP keys derive from.
            rank = (1 if p == Proto.ESP else 0, sa.current.add_time, self._order[sa.key_id])
            if best_rank is None or rank > best_rank:
                best, best_rank = sa, rank
        return best

    def pair(
        self, local: IPAddress, remote: IPAddress, proto: int | None = None
    ) -> tuple[SA | None, SA | None]:
        """(outbound local->remote, inbound remote->local), newest of each.

        ``proto`` restricts to ESP or AH; by default ESP is preferred, IPcomp ignored.
        """
        out = self._newest(self._by_addrs.get((local, remote), {}).values(), proto)
        inb = self._newest(self._by_addrs.get((remote, local), {}).values(), proto)
        return out, inb

    def pairs(self, local: Iterable[IPAddress] | None = None) -> list[tuple[SA, SA]]:
        """Every tunnel with SAs in both directions, as (outbound, inbound).

        Directions are matched by peer pair and reqid (an IKE CHILD_SA installs
        both directions with one reqid); peers whose SAs carry different reqids
        in each direction (hand-made SAs) are paired by addresses alone.
        Orientation: if ``local`` (this host's addresses) is given, the SA whose
        source is local comes first; otherwise the SA with the lower source
        address (IPv4 before IPv6) comes first, which is stable but arbitrary.
        """
        local_set = set(local) if local is not None else None
        groups: dict[tuple[IPAddress, IPAddress, int], list[SA]] = {}
        for (saddr, daddr), bucket in self._by_addrs.items():
            for sa in bucket.values():
                groups.setdefault((saddr, daddr, sa.reqid), []).append(sa)

        def orient(a: SA, b: SA) -> tuple[SA, SA]:
            if local_set is not None:
                if a.saddr in local_set and a.daddr not in local_set:
                    return a, b
                if b.saddr in local_set and b.daddr not in local_set:
                    return b, a
            return (a, b) if _addr_key(a.saddr) <= _addr_key(b.saddr) else (b, a)

        result: list[tuple[SA, SA]] = []
        done: set[tuple[IPAddress, IPAddress]] = set()
        leftover: dict[tuple[IPAddress, IPAddress], list[SA]] = {}
        seen: set[tuple[IPAddress, IPAddress, int]] = set()
        for (saddr, daddr, reqid), sas in sorted(groups.items(), key=_group_key):
            if (saddr, daddr, reqid) in seen:
                continue
            seen.add((saddr, daddr, reqid))
            back = groups.get((daddr, saddr, reqid))
            a = self._newest(sas, None)
            b = self._newest(back, None) if back is not None and saddr != daddr else None
            if a is not None and b is not None:
                seen.add((daddr, saddr, reqid))
                result.append(orient(a, b))
                done.add((saddr, daddr))
                done.add((daddr, saddr))
            elif a is not None:
                leftover.setdefault((saddr, daddr), []).extend(sas)
        for (saddr, daddr), sas in sorted(leftover.items(), key=lambda kv: (_addr_key(kv[0][0]), _addr_key(kv[0][1]))):
            if (saddr, daddr) in done or (daddr, saddr) in done or (daddr, saddr) not in leftover:
                continue
            a = self._newest(sas, None)
            b = self._newest(leftover[(daddr, saddr)], None)
            if a is not None and b is not None:
                result.append(orient(a, b))
                done.add((saddr, daddr))
                done.add((daddr, saddr))
        return result

    # --- container protocol -------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[SA]:
        return iter(list(self._by_id.values()))

    def __contains__(self, item: object) -> bool:
        """``sa in table`` (same identity) or ``(spi, proto, daddr) in table``."""
        if isinstance(item, SA):
            return item.key_id in self._by_id
        if isinstance(item, tuple) and len(item) == 3:
            try:
                return (item[0], int(item[1]), item[2]) in self._by_id
            except (TypeError, ValueError):
                return False
        return False

    def __repr__(self) -> str:
        return f"<SATable {len(self)} SAs>"


def _addr_key(addr: IPAddress) -> tuple[int, int]:
    return (addr.version, int(addr))


def _group_key(item: tuple[tuple[IPAddress, IPAddress, int], list[SA]]) -> tuple[tuple[int, int], tuple[int, int], int]:
    (saddr, daddr, reqid), _ = item
    return (_addr_key(saddr), _addr_key(daddr), reqid)
