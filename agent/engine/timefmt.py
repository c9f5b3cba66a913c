"""Timestamp and Error Estimate formats shared by Control and Test.

RFC 4656 §4.1.2 (NTP 64-bit), RFC 8186 (PTPv2 truncated, Z bit), and the
16-bit Error Estimate of RFC 4656 §4.1.2: S(1) Z(1) Scale(6) Multiplier(8).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
_NS = 1_000_000_000
_TS = struct.Struct("!II")


# The seconds half of the last conversion, per second: a reflector converts T2 and T3
# (and a sender T1) within the same second, and the full divmod + epoch shift is most
# of the cost. One tuple, swapped whole: threads never see a half-updated pair.
_ntp_second: tuple[int, int] = (-_NS, 0)  # (Unix ns at the start of that second, NTP seconds << 32)


def ntp_from_unix_ns(ns: int) -> int:
    """Unix time in ns -> 64-bit NTP timestamp (32.32 fixed point), rounded down."""
    global _ntp_second
    start, hi = _ntp_second
    rem = ns - start
    if 0 <= rem < _NS:
        return hi | ((rem << 32) // _NS)
    sec, rem = divmod(ns, _NS)
    hi = ((sec + NTP_UNIX_OFFSET) & 0xFFFFFFFF) << 32
    _ntp_second = (ns - rem, hi)
    return hi | ((rem << 32) // _NS)


def unix_ns_from_ntp(ts: int) -> int:
    sec = (ts >> 32) - NTP_UNIX_OFFSET
    frac = ts & 0xFFFFFFFF
    return sec * _NS + ((frac * _NS + (1 << 31)) >> 32)


def ptp_from_unix_ns(ns: int) -> int:
    """Unix time in ns -> RFC 8186 truncated PTP: 32-bit seconds, 32-bit ns (PTP epoch = Unix epoch, TAI ignored)."""
    sec, rem = divmod(ns, _NS)
    return ((sec & 0xFFFFFFFF) << 32) | rem


def unix_ns_from_ptp(ts: int) -> int:
    return (ts >> 32) * _NS + (ts & 0xFFFFFFFF)


def pack_ts(ts: int) -> bytes:
    return _TS.pack(ts >> 32, ts & 0xFFFFFFFF)


def unpack_ts(b: bytes | memoryview, offset: int = 0) -> int:
    hi, lo = _TS.unpack_from(b, offset)
    return (hi << 32) | lo


@dataclass(frozen=True, slots=True)
class ErrorEstimate:
    """RFC 4656 §4.1.2: error = multiplier * 2**(scale - 32) seconds."""

    synced: bool  # S bit
    ptp: bool  # Z bit: 1 = the timestamp is PTP format (RFC 8186)
    scale: int
    multiplier: int

    def __post_init__(self) -> None:
        if not 0 <= self.scale < 64 or not 0 <= self.multiplier < 256:
            raise ValueError("error estimate scale/multiplier out of range")

    @property
    def seconds(self) -> float:
        return self.multiplier * 2.0 ** (self.scale - 32)

    def pack(self) -> int:
        return (self.synced << 15) | (self.ptp << 14) | (self.scale << 8) | self.multiplier

    @classmethod
    def unpack(cls, v: int) -> "ErrorEstimate":
        return cls(bool(v & 0x8000), bool(v & 0x4000), (v >> 8) & 0x3F, v & 0xFF)

    @classmethod
    def from_seconds(cls, err: float, synced: bool, ptp: bool = False) -> "ErrorEstimate":
        """Smallest representable estimate >= err (multiplier kept in 1..255; RFC: never 0)."""
        if err <= 0:
            return cls(synced, ptp, 0, 1)
        for scale in range(64):
            mult = err / 2.0 ** (scale - 32)
            if mult <= 255:
                m = int(mult) if mult == int(mult) else int(mult) + 1
                return cls(synced, ptp, scale, max(1, m))
        return cls(synced, ptp, 63, 255)
