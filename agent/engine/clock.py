"""The local clock's sync state and honest Error Estimate, and per-packet stamp-source counters.

The kernel's NTP state (adjtimex(2), struct timex) is what chrony/ntpd/ptp4l+phc2sys
publish: STA_UNSYNC says whether the clock is synchronised, ``esterror`` is the
daemon's estimate and ``maxerror`` the growing bound (the kernel adds 500 µs every
second until the daemon refreshes it). RFC 4656 §4.1.2 wants an estimate, so we
use ``esterror``; ``bound=True`` selects ``maxerror`` for a conservative figure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from dataclasses import dataclass, field

from agent.engine.timefmt import ErrorEstimate

# include/uapi/linux/timex.h
STA_PLL = 0x0001
STA_PPSFREQ = 0x0002
STA_PPSTIME = 0x0004
STA_FLL = 0x0008
STA_INS = 0x0010
STA_DEL = 0x0020
STA_UNSYNC = 0x0040
STA_FREQHOLD = 0x0080
STA_PPSSIGNAL = 0x0100
STA_PPSJITTER = 0x0200
STA_PPSWANDER = 0x0400
STA_PPSERROR = 0x0800
STA_CLOCKERR = 0x1000
STA_NANO = 0x2000
STA_MODE = 0x4000
STA_CLK = 0x8000

TIME_STATES = {0: "TIME_OK", 1: "TIME_INS", 2: "TIME_DEL", 3: "TIME_OOP", 4: "TIME_WAIT", 5: "TIME_ERROR"}
TIME_ERROR = 5
NTP_PHASE_LIMIT_US = 16_000_000  # kernel marks the clock unsynchronised past this maxerror

# When a daemon claims sync but publishes no error at all (esterror = maxerror = 0,
# e.g. some SNTP clients), we refuse to claim nanoseconds: assume SNTP-class accuracy.
UNKNOWN_SYNCED_ERROR_S = 0.010


class Timex(ctypes.Structure):
    """struct timex as glibc's adjtimex() takes it (native long; 11 trailing padding ints)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


@dataclass(frozen=True, slots=True)
class ClockState:
    """Decoded kernel clock state (adjtimex with modes = 0, read only)."""

    time_state: int  # adjtimex return value: TIME_OK .. TIME_ERROR
    status: int  # STA_* bits
    maxerror_us: int
    esterror_us: int
    offset_ns: int  # last PLL offset (STA_NANO decides the unit)
    freq_ppm: float
    tai_offset_s: int

    @property
    def synced(self) -> bool:
        return not (self.status & STA_UNSYNC) and self.time_state != TIME_ERROR

    @property
    def state_name(self) -> str:
        return TIME_STATES.get(self.time_state, f"state {self.time_state}")

    def error_seconds(self, bound: bool = False) -> float:
        est, mx = self.esterror_us * 1e-6, self.maxerror_us * 1e-6
        err = mx if bound else (est if est > 0 else mx)
        if err <= 0:
            err = UNKNOWN_SYNCED_ERROR_S
        return err

    def error_estimate(self, ptp: bool = False, bound: bool = False, extra_s: float = 0.0) -> ErrorEstimate:
        """S = 0 when unsynchronised (RFC 4656: the multiplier must still be non-zero)."""
        if not self.synced:
            # An unsynced clock has no meaningful error; send the largest bound we know.
            return ErrorEstimate.from_seconds(max(self.maxerror_us * 1e-6, 1.0) + extra_s, synced=False, ptp=ptp)
        return ErrorEstimate.from_seconds(self.error_seconds(bound) + extra_s, synced=True, ptp=ptp)


def decode_timex(tx: Timex | bytes, rc: int) -> ClockState:
    """Decode a filled struct timex (object or raw bytes) and adjtimex's return value."""
    if isinstance(tx, (bytes, bytearray, memoryview)):
        raw = bytes(tx)
        if len(raw) < ctypes.sizeof(Timex):
            raise ValueError(f"struct timex needs {ctypes.sizeof(Timex)} bytes, got {len(raw)}")
        tx = Timex.from_buffer_copy(raw[: ctypes.sizeof(Timex)])
    nano = bool(tx.status & STA_NANO)
    return ClockState(
        time_state=rc,
        status=tx.status,
        maxerror_us=max(0, tx.maxerror),
        esterror_us=max(0, tx.esterror),
        offset_ns=tx.offset if nano else tx.offset * 1000,
        freq_ppm=tx.freq / 65536.0,  # scaled ppm, 16-bit fraction
        tai_offset_s=tx.tai,
    )


_libc: ctypes.CDLL | None = None


def read_clock_state() -> ClockState:
    """One adjtimex(2) call with modes = 0: reads, never changes the clock; needs no privilege."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    tx = Timex()
    rc = _libc.adjtimex(ctypes.byref(tx))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"adjtimex: {os.strerror(err)}")
    return decode_timex(tx, rc)


# Hardware stamps are PHC readings converted to CLOCK_REALTIME (agent.engine.timestamping.PhcClock);
# the conversion adds its own error to every stamp taken that way. Each PHC in use publishes its
# current bound here (ns, by PHC index); the Error Estimate adds the largest (ClockErrorCache).
_CONVERSION_ERROR_NS: dict[int, int] = {}


def set_conversion_error(phc_index: int, ns: int | None) -> None:
    """Publish (or with None withdraw) the PHC → CLOCK_REALTIME conversion error bound of one PHC."""
    if ns is None:
        _CONVERSION_ERROR_NS.pop(phc_index, None)
    else:
        _CONVERSION_ERROR_NS[phc_index] = max(0, int(ns))


def conversion_error_s() -> float:
    """The largest conversion error bound of the PHCs this process converts stamps with (0 without)."""
    return max(_CONVERSION_ERROR_NS.values(), default=0) / 1e9


class ClockErrorCache:
    """The Error Estimate, refreshed at most every ``refresh_s`` (not a syscall per packet).

    The daemons update the kernel state every few seconds at best, so a 1 s cache
    loses nothing. Thread-safe enough: a racing refresh just reads twice.

    ``extra_error_s`` is added to the clock's own error: refreshed with the state from the
    PHC conversion error bounds (:func:`conversion_error_s`) when ``phc`` is true, plus
    ``fixed_extra_s``. RFC 4656 §4.1.2: the Error Estimate is that of the timestamp, and a
    timestamp taken on a PHC is only as good as its relation to CLOCK_REALTIME.
    """

    def __init__(self, refresh_s: float = 1.0, bound: bool = False, reader=None, *,
                 phc: bool = True, fixed_extra_s: float = 0.0) -> None:
        self.refresh_s = refresh_s
        self.bound = bound
        self._reader = reader if reader is not None else read_clock_state
        self._state: ClockState | None = None
        self._at = -1e18
        self.phc = phc
        self.fixed_extra_s = fixed_extra_s
        self.extra_error_s = fixed_extra_s  # + the PHC→CLOCK_REALTIME conversion error bound

    def state(self) -> ClockState:
        now = time.monotonic()
        if self._state is None or now - self._at >= self.refresh_s:
            self._state = self._reader()
            self._at = now
            self.extra_error_s = self.fixed_extra_s + (conversion_error_s() if self.phc else 0.0)
        return self._state

    def estimate(self, ptp: bool = False) -> ErrorEstimate:
        return self.state().error_estimate(ptp=ptp, bound=self.bound, extra_s=self.extra_error_s)

    def packed(self, ptp: bool = False) -> int:
        return self.estimate(ptp).pack()


@dataclass
class StampCounters:
    """Per-packet counts of where each timestamp came from.

    ``hw_fallback`` counts packets on a hardware-enabled socket that got only a
    software stamp (e.g. ESP/XFRM offload, a PTP-only RX filter, a missed TX stamp).
    ``*_user`` counts packets that got no kernel stamp and were stamped in user space.

    The per-packet path (agent.engine.timestamping) bumps the fields directly, without the
    lock, for speed: exact under the GIL from one thread (the engine's event loop);
    concurrent writers from several threads may lose the odd increment.
    """

    rx_hw: int = 0
    rx_sw: int = 0
    rx_user: int = 0
    tx_hw: int = 0
    tx_sw: int = 0
    tx_user: int = 0
    # T3 of our STAMP samples as the reflector's Follow-Up Telemetry reported it (RFC 8972 §4.7):
    # its hardware or kernel TX stamp of the reply (agent.sessions.stamp.FollowUpCorrector).
    t3_hw: int = 0
    t3_sw: int = 0
    hw_fallback: int = 0
    phc_unconverted: int = 0  # hardware stamps dropped: no PHC→REALTIME relation available
    hw_rx_refused: int = 0  # NICs whose driver refused RX filters all and ntp-all: software RX, hardware TX
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, direction: str, source: str, n: int = 1) -> None:
        name = f"{direction}_{source}"
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def add_fallback(self, n: int = 1) -> None:
        with self._lock:
            self.hw_fallback += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def reset(self) -> None:
        with self._lock:
            for k in list(vars(self)):
                if not k.startswith("_"):
                    setattr(self, k, 0)


# Process-wide counters: agent.engine.timestamping counts kernel stamps here; the engine
# counts user-space fallbacks (timestamping.user_stamp does it for you).
STAMP_COUNTERS = StampCounters()
