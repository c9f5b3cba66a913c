"""Failed control authentications: counted, rate-limited per source address, logged sparingly.

A Set-Up-Response costs the server one PBKDF2 (RFC 4656 §3.1: Count iterations), known
KeyID or not (server.py derives against a dummy key for unknown ones, so timing does not
tell which identities exist). Without a limit one address can keep a core busy guessing
passphrases. Each address gets a small budget of failures that refills slowly; once it is
spent, its set-ups are answered Server-Start Accept=5 (temporary resource limitation,
RFC 4656 §3.3) without any derivation until the budget refills.

Sans-IO: the clock is injected; no sockets, no tasks. One guard may serve several
listeners (the agent shares one between its OWAMP and TWAMP ports).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    failures: int = 0  # since the last log line for this address
    limited: int = 0
    logged: float | None = None


def source_key(addr: object) -> str:
    """Per-address, with IPv6 grouped by /64 (one host owns a /64: it must not get 2^64 budgets)."""
    try:
        a = ipaddress.ip_address(str(addr).split("%", 1)[0])
    except ValueError:
        return str(addr)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((a, 64), strict=False))
    return str(a.ipv4_mapped or a) if isinstance(a, ipaddress.IPv6Address) else str(a)


class AuthGuard:
    """``allow(addr)`` before spending a derivation; ``failed(addr, reason)`` after a refusal."""

    def __init__(self, burst: int = 5, refill_per_s: float = 0.2, log_interval: float = 60.0,
                 max_tracked: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.refill_per_s = refill_per_s
        self.log_interval = log_interval
        self.max_tracked = max_tracked
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.failures_total = 0  # exported as xwamp_control_auth_failures_total
        self.limited_total = 0  # set-ups refused without a derivation (budget spent)
        self.by_reason: dict[str, int] = {}

    def _bucket(self, key: str) -> _Bucket:
        now = self._clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.max_tracked:  # bounded: forget the stalest
                self._buckets.popitem(last=False)
        else:
            b.tokens = min(float(self.burst), b.tokens + (now - b.stamp) * self.refill_per_s)
            b.stamp = now
            self._buckets.move_to_end(key)
        return b

    def allow(self, addr: object) -> bool:
        """False if ``addr`` spent its failure budget: refuse its set-up without deriving."""
        key = source_key(addr)
        if key not in self._buckets:
            return True
        b = self._bucket(key)
        if b.tokens >= 1.0:
            return True
        b.limited += 1
        self.limited_total += 1
        self._maybe_log(key, b)
        return False

    def failed(self, addr: object, reason: str) -> None:
        """One failed authentication from ``addr`` (reason: a short word, never key material)."""
        key = source_key(addr)
        b = self._bucket(key)
        b.tokens = max(0.0, b.tokens - 1.0)
        b.failures += 1
        self.failures_total += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self._maybe_log(key, b)

    def _maybe_log(self, key: str, b: _Bucket) -> None:
        now = self._clock()
        if b.logged is not None and now - b.logged < self.log_interval:
            return  # at most one line per address per interval
        log.warning("control authentication failures from %s: %d failed, %d refused (rate limit) "
                    "since the last report", key, b.failures, b.limited)
        b.logged, b.failures, b.limited = now, 0, 0


# The process-wide guard the CLI server and the agent share between their listeners.
AUTH_GUARD = AuthGuard()
