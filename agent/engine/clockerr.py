"""The Error Estimate a test endpoint writes, cached per second (not computed per packet).

``agent.engine.clock.ClockErrorCache`` reads the kernel's sync state (adjtimex); turning it
into the packed 16-bit field costs a loop, so endpoints keep the packed value and
refresh it at most once a second, keyed on the packet's own receive time.
"""

from __future__ import annotations

from typing import Callable

from agent.engine.timefmt import ErrorEstimate

ErrSource = int | ErrorEstimate | Callable[[], int] | None

_REFRESH_NS = 1_000_000_000


class PackedErrorEstimate:
    """Packed Error Estimate with a 1 s cache. ``fixed`` (int/ErrorEstimate) pins it (tests, benchmarks)."""

    __slots__ = ("_fn", "_value", "_at", "ptp")

    def __init__(self, source: ErrSource = None, ptp: bool = False) -> None:
        self.ptp = ptp
        self._at = -(1 << 62)
        self._fn: Callable[[], int] | None
        if isinstance(source, ErrorEstimate):
            self._fn, self._value = None, self._z(source.pack())
        elif isinstance(source, int):
            self._fn, self._value = None, self._z(source)
        elif source is None:
            from agent.engine.clock import ClockErrorCache

            cache = ClockErrorCache()

            def _read() -> int:
                try:
                    return cache.packed(ptp)
                except OSError:  # adjtimex unavailable: say so honestly (S=0, 1 s)
                    return ErrorEstimate.from_seconds(1.0, synced=False, ptp=ptp).pack()

            self._fn, self._value = _read, 0
        else:
            self._fn, self._value = source, 0

    def _z(self, packed: int) -> int:
        # RFC 8186: Z must say which format the timestamp beside it is in, whatever the source claimed.
        return (packed & ~0x4000) | (0x4000 if self.ptp else 0)

    def get(self, now_ns: int) -> int:
        fn = self._fn
        # Read again after a second, or when time went back (a stepped clock; stamps from another
        # clock): "at least 1 s later" alone would keep a stale value until time caught up.
        if fn is not None and not 0 <= now_ns - self._at < _REFRESH_NS:
            self._value = self._z(fn())
            self._at = now_ns
        return self._value

    def read(self, now_ns: int) -> int:
        """The estimate read now, whatever the cache's age: for callers that keep it themselves
        (the reflector's fast paths hold one per second of receive time)."""
        fn = self._fn
        if fn is not None:
            self._value = self._z(fn())
            self._at = now_ns
        return self._value

    def synced(self, now_ns: int) -> bool:
        return bool(self.get(now_ns) & 0x8000)
