"""TX stamp lag: how long after the timestamp written *in* a packet the kernel (or NIC) really
sent it. RFC 4656 §4.1.2: the Error Estimate describes the error of the timestamp in the
packet; a timestamp read in user space before the send is late by the rest of the send path,
so the lag is part of that error.

* :data:`TX_LAG` — process-wide, per ``role`` ("reflector": T3 of TWAMP/STAMP replies;
  "sender": T1 of TWAMP/STAMP/OWAMP test packets): a histogram (exported as
  ``xwamp_tx_stamp_lag_seconds{role=…}``) and the *recent bound*, the largest lag among the
  last :data:`RECENT` packets of that role.
* :func:`widened_error` — an Error Estimate source: the clock's estimate (adjtimex) plus the
  role's recent lag bound, so the peer's error figure covers the lag (docs/timestamping.md).
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from typing import Callable

from agent.engine.timefmt import ErrorEstimate

# 1 µs .. 100 ms, 1-2.5-5 per decade: loopback sends take a few µs, a woken CPU tens to hundreds.
LAG_BUCKETS: tuple[float, ...] = tuple(float(f"{m}e{e}") for e in range(-6, -1) for m in ("1", "2.5", "5")) + (0.1,)
RECENT = 256
ROLES = ("reflector", "sender")
MAX_LAG_S = 1.0  # a "lag" past this is a misattributed stamp, not a send path: not counted


class _Role:
    __slots__ = ("counts", "sum", "recent", "negative")

    def __init__(self) -> None:
        self.counts = [0] * (len(LAG_BUCKETS) + 1)
        self.sum = 0.0
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.negative = 0  # kernel stamp before the user stamp: clock stepped, or a wrong match


class TxLag:
    def __init__(self) -> None:
        self._roles = {r: _Role() for r in ROLES}
        self._lock = threading.Lock()  # the exporter thread reads while the loop writes

    def observe(self, role: str, kernel_ns: int, written_ns: int) -> None:
        r = self._roles.get(role)
        if r is None:
            return
        lag = (kernel_ns - written_ns) / 1e9
        with self._lock:
            if lag < 0 or lag > MAX_LAG_S:
                r.negative += 1
                return
            r.counts[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
            r.sum += lag
            r.recent.append(lag)

    def recent_bound(self, role: str) -> float:
        """Largest lag among the role's last RECENT packets (0 before any)."""
        r = self._roles.get(role)
        if r is None or not r.recent:
            return 0.0
        with self._lock:
            return max(r.recent)

    def snapshot(self) -> dict[str, tuple[tuple[float, ...], list[int], float]]:
        """role -> (bucket bounds, per-bucket counts incl. +Inf, sum) for roles with samples."""
        with self._lock:
            return {name: (LAG_BUCKETS, list(r.counts), r.sum) for name, r in self._roles.items() if any(r.counts)}

    def reset(self) -> None:
        with self._lock:
            self._roles = {r: _Role() for r in ROLES}


TX_LAG = TxLag()


def widened_error(role: str, ptp: bool = False, lag: TxLag = TX_LAG) -> Callable[[], int]:
    """Packed Error Estimate = the clock's (agent.engine.clock.ClockErrorCache) + the role's recent
    TX lag bound; S as the clock says. For agent.engine.clockerr.PackedErrorEstimate (cached 1 s)."""
    from agent.engine.clock import ClockErrorCache

    cache = ClockErrorCache()

    def read() -> int:
        try:
            base = ErrorEstimate.unpack(cache.packed(ptp))
        except OSError:
            base = ErrorEstimate.from_seconds(1.0, synced=False, ptp=ptp)
        extra = lag.recent_bound(role)
        if not extra:
            return base.pack()
        return ErrorEstimate.from_seconds(base.seconds + extra, synced=base.synced, ptp=ptp).pack()

    return read


__all__ = ["TX_LAG", "TxLag", "LAG_BUCKETS", "widened_error"]
