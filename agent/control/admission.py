"""Who gets a control-connection slot, and how fast an address's tests may run (issue 11).

Sans-IO: the listener (agent.control.aio.ControlListener) asks :meth:`Admission.admit`
for each new connection and tells it when one becomes trusted or ends; admit answers
"refuse", or "admit" with the connections to evict first.

* Per address, per /24 (IPv4) and /64 (IPv6) prefix: at most ``max_per_client`` /
  ``max_per_prefix`` connections. A prefix cap keeps one host with many addresses (or a
  small network) from taking the table one address at a time.
* Weak connections (pre-auth: set-up not complete, or plain unauthenticated mode) are a
  bounded share of the table (``max_weak``). When that share or the whole table is full,
  the newcomer evicts the oldest weak connection of the prefix that holds the most weak
  ones, provided that prefix holds more than the newcomer's would: an attacker's
  connections cannot displace each other (no churn), but a client from a fresh prefix
  always gets a slot. Keyed connections (auth, enc, mixed, IPsec-bound) are never evicted.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def prefix_of(addr: IPAddress | None) -> str:
    """The /24 (IPv4) or /64 (IPv6) an address belongs to, as a string key."""
    if addr is None:
        return "?"
    plen = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{plen}", strict=False))


@dataclass
class _Entry:
    key: str
    prefix: str
    since: float
    weak: bool = True


@dataclass
class Admission:
    max_connections: int = 64
    max_per_client: int = 8
    max_per_prefix: int = 32
    max_weak: int = 48  # pre-auth and plain-unauth connections, at most
    clock: Callable[[], float] = time.monotonic
    _live: dict[Hashable, _Entry] = field(default_factory=dict)
    _per_key: dict[str, int] = field(default_factory=dict)
    _per_prefix: dict[str, int] = field(default_factory=dict)
    _weak_per_prefix: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"refused_address": 0, "refused_prefix": 0,
                                                            "refused_full": 0, "evicted": 0})

    def __len__(self) -> int:
        return len(self._live)

    @property
    def weak(self) -> int:
        return sum(self._weak_per_prefix.values())

    def admit(self, conn: Hashable, addr: IPAddress | None) -> tuple[bool, list[Hashable], str]:
        """(admitted, connections to evict, reason if refused). An admitted ``conn`` is
        counted at once; the evicted ones are forgotten at once (their slots are free)."""
        key, prefix = (str(addr) if addr is not None else "?"), prefix_of(addr)
        if self._per_key.get(key, 0) >= self.max_per_client:
            self.stats["refused_address"] += 1
            return False, [], "too many connections from this address"
        if self._per_prefix.get(prefix, 0) >= self.max_per_prefix:
            self.stats["refused_prefix"] += 1
            return False, [], "too many connections from this prefix"
        evict: list[Hashable] = []
        if len(self._live) >= self.max_connections or self.weak >= self.max_weak:
            victim = self._victim(prefix)
            if victim is None:
                self.stats["refused_full"] += 1
                return False, [], "connection table full"
            self.forget(victim)
            self.stats["evicted"] += 1
            evict.append(victim)
        e = _Entry(key, prefix, self.clock())
        self._live[conn] = e
        self._per_key[key] = self._per_key.get(key, 0) + 1
        self._per_prefix[prefix] = self._per_prefix.get(prefix, 0) + 1
        self._weak_per_prefix[prefix] = self._weak_per_prefix.get(prefix, 0) + 1
        return True, evict, ""

    def _victim(self, newcomer_prefix: str) -> Hashable | None:
        if not self._weak_per_prefix:
            return None
        heavy = max(self._weak_per_prefix, key=self._weak_per_prefix.__getitem__)
        if heavy == newcomer_prefix or self._weak_per_prefix[heavy] <= self._weak_per_prefix.get(newcomer_prefix, 0) + 1:
            return None  # the newcomer's prefix would be as heavy: refusing it is the fair answer
        # dicts keep insertion order: the first weak entry of that prefix is the oldest
        return next(c for c, e in self._live.items() if e.weak and e.prefix == heavy)

    def trusted(self, conn: Hashable) -> None:
        """The connection completed set-up in a keyed mode: no longer weak, never evicted."""
        e = self._live.get(conn)
        if e is not None and e.weak:
            e.weak = False
            self._dec(self._weak_per_prefix, e.prefix)

    def forget(self, conn: Hashable) -> None:
        e = self._live.pop(conn, None)
        if e is None:
            return
        self._dec(self._per_key, e.key)
        self._dec(self._per_prefix, e.prefix)
        if e.weak:
            self._dec(self._weak_per_prefix, e.prefix)

    @staticmethod
    def _dec(d: dict[str, int], k: str) -> None:
        d[k] -= 1
        if not d[k]:
            del d[k]


@dataclass
class TokenBucket:
    """Packets per second shared by all of one address's reflector sessions (item 2:
    per-address caps). One second deep, at least ``burst`` packets."""

    rate: float
    burst: float = 16.0
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    last: float = field(init=False)
    policed: int = 0

    def __post_init__(self) -> None:
        self.depth = max(self.burst, self.rate)
        self.tokens, self.last = self.depth, self.clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.depth, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            self.policed += 1
            return False
        self.tokens -= 1.0
        return True
