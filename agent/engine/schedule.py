"""RFC 4656 §5 send schedules: the exponential generator both OWAMP ends can reproduce.

An OWAMP receiver checks each packet's send time against the schedule it computes
itself from the SID and the Request-Session slots, and discards packets more than
Timeout away (RFC 4656 §4.2), so a sender must follow the same deterministic
schedule, not merely *a* Poisson process:

* Uniform 32-bit strings: AES-128 (key = SID) in counter mode over a 128-bit
  big-endian counter starting at 0; the counter advances once per 32-bit string
  and the block E(counter) computed when ``counter % 4 == 0`` supplies the next four
  strings (the i-th quartet of octets for ``counter % 4 == i``).
* Exponential deviates: Knuth vol. 2, algorithm 3.4.1 S, in 32.32 fixed point, with
  the table Q[k] = sum_{i=1..k} (ln 2)^i / i!, scaled by 2^32 and rounded.
* Slots are used round-robin (packet i uses slot i mod n): type 0 draws an
  exponential delta with the slot's mean, type 1 is a literal delta. Packet i is
  sent at Start Time + delta_0 + ... + delta_i.

All times are 32.32 fixed-point seconds (the NTP format of the slot parameters).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SLOT_EXPONENTIAL = 0
SLOT_LITERAL = 1

# Q[k] * 2^32, rounded; Q[1] = ln 2.
_Q = (
    0,
    0xB17217F8,
    0xEEF193F7,
    0xFD271862,
    0xFF9D6DD0,
    0xFFF4CFD0,
    0xFFFEE819,
    0xFFFFE7FF,
    0xFFFFFE2B,
    0xFFFFFFE0,
    0xFFFFFFFE,
    0xFFFFFFFF,
)
LN2 = _Q[1]
_MASK32 = 0xFFFFFFFF


def fixed_from_seconds(s: float) -> int:
    """Seconds -> 32.32 fixed point."""
    return round(s * (1 << 32))


class Rfc4656Exponential:
    """The deterministic exponential generator of RFC 4656 §5, keyed by the 16-octet SID."""

    def __init__(self, sid: bytes) -> None:
        if len(sid) != 16:
            raise ValueError("the SID is 16 octets")
        self._enc = Cipher(algorithms.AES(bytes(sid)), modes.ECB()).encryptor()
        self._counter = 0
        self._block = b""

    def uniform32(self) -> int:
        i = self._counter & 3
        if i == 0:
            self._block = self._enc.update(self._counter.to_bytes(16, "big"))
        self._counter = (self._counter + 1) & ((1 << 128) - 1)
        return int.from_bytes(self._block[4 * i : 4 * i + 4], "big")

    def exponential(self) -> int:
        """One unit-mean exponential deviate, 32.32 fixed point (algorithm 3.4.1 S)."""
        u = self.uniform32()
        j = 0
        # S1: count and drop the leading one bits and the first zero bit.
        while u & 0x80000000 and j < 32:
            u = (u << 1) & _MASK32
            j += 1
        u = (u << 1) & _MASK32
        # S2: immediate acceptance (Q[1] = ln 2).
        if u < LN2:
            return j * LN2 + u
        # S3: least k >= 2 with U < Q[k]; V = min of k fresh uniforms.
        k = 2
        while k < len(_Q) and u >= _Q[k]:
            k += 1
        v = self.uniform32()
        for _ in range(2, k + 1):
            v = min(v, self.uniform32())
        # S4: (j + V) * ln 2.
        return (((j << 32) + v) * LN2) >> 32


class SlotSchedule:
    """Offsets of an OWAMP/TWAMP schedule given as Request-Session slots.

    ``slots``: (slot type, 32.32 parameter) pairs — type 0 exponential with that mean,
    type 1 literal delta. ``offset_fixed(n)`` is packet n's offset from Start Time.
    """

    def __init__(self, sid: bytes, slots: Sequence[tuple[int, int]]) -> None:
        if not slots:
            raise ValueError("a schedule needs at least one slot")
        for typ, _param in slots:
            if typ not in (SLOT_EXPONENTIAL, SLOT_LITERAL):
                raise ValueError(f"unknown slot type {typ}")
        self.slots = list(slots)
        self._gen = Rfc4656Exponential(sid)
        self._offsets: list[int] = []
        self._acc = 0

    def _delta(self, i: int) -> int:
        typ, param = self.slots[i % len(self.slots)]
        if typ == SLOT_LITERAL:
            return param
        return (self._gen.exponential() * param) >> 32

    def offset_fixed(self, n: int) -> int:
        offs = self._offsets
        while len(offs) <= n:
            self._acc += self._delta(len(offs))
            offs.append(self._acc)
        return offs[n]

    def offset_ns(self, n: int) -> int:
        return (self.offset_fixed(n) * 1_000_000_000) >> 32


def poisson_slots(mean_interval_s: float) -> list[tuple[int, int]]:
    """The usual single exponential slot (owping/twping default)."""
    return [(SLOT_EXPONENTIAL, fixed_from_seconds(mean_interval_s))]


def literal_slots(intervals_s: Iterable[float]) -> list[tuple[int, int]]:
    return [(SLOT_LITERAL, fixed_from_seconds(s)) for s in intervals_s]
