"""RFC 4656 §5 schedule generator: AES counter-mode uniforms, Knuth 3.4.1 S, slots."""

from __future__ import annotations

import math
import statistics

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.engine.schedule import (
    LN2,
    SLOT_EXPONENTIAL,
    SLOT_LITERAL,
    Rfc4656Exponential,
    SlotSchedule,
    fixed_from_seconds,
    literal_slots,
    poisson_slots,
)
from agent.engine.sender import Schedule

SID = bytes(range(16))


def test_uniforms_are_aes_counter_quartets() -> None:
    enc = Cipher(algorithms.AES(SID), modes.ECB()).encryptor()
    b0 = enc.update((0).to_bytes(16, "big"))
    b4 = enc.update((4).to_bytes(16, "big"))  # the counter advances per 32-bit string
    want = [int.from_bytes(b[i : i + 4], "big") for b in (b0, b4) for i in (0, 4, 8, 12)]
    g = Rfc4656Exponential(SID)
    assert [g.uniform32() for _ in range(8)] == want


def _stub(values: list[int]) -> Rfc4656Exponential:
    g = Rfc4656Exponential(SID)
    it = iter(values)
    g.uniform32 = lambda: next(it)  # type: ignore[method-assign]
    return g


def test_algorithm_s_steps() -> None:
    assert _stub([0x40000000]).exponential() == 0x80000000  # j=0, U=.1 < ln2 -> 0.5
    assert _stub([0x80000000]).exponential() == LN2  # j=1, U=0 -> ln2
    assert _stub([0xC0000000]).exponential() == 2 * LN2  # j=2
    assert _stub([0xFFFFFFFF]).exponential() == 32 * LN2  # no zero bit: 32 ln2
    # j=0, U=0xFFFFFFFE needs k=11 fresh uniforms; V = their minimum
    vals = [0x7FFFFFFF] + [0x90000000 - i for i in range(11)]
    assert _stub(vals).exponential() == ((0x90000000 - 10) * LN2) >> 32
    # j=0, U just above ln2 -> k=2: two uniforms
    u = ((LN2 + 1) >> 1)  # before the shift
    assert _stub([u, 0x20000000, 0x10000000]).exponential() == (0x10000000 * LN2) >> 32


def test_exponential_statistics() -> None:
    g = Rfc4656Exponential(b"\x42" * 16)
    xs = [g.exponential() / 2**32 for _ in range(20000)]
    assert statistics.mean(xs) == pytest.approx(1.0, rel=0.03)
    assert statistics.pstdev(xs) == pytest.approx(1.0, rel=0.05)
    assert max(xs) <= 32 * math.log(2) + 1e-6


def test_slot_schedule_round_robin_and_offsets() -> None:
    s = SlotSchedule(SID, [(SLOT_LITERAL, fixed_from_seconds(0.5)), (SLOT_LITERAL, fixed_from_seconds(0.25))])
    assert [s.offset_ns(i) for i in range(4)] == [500_000_000, 750_000_000, 1_250_000_000, 1_500_000_000]
    sch = Schedule.from_slots(SID, poisson_slots(0.01))
    again = Schedule.from_slots(SID, poisson_slots(0.01))
    offs = [sch.offset_ns(i) for i in range(3000)]
    assert offs == [again.offset_ns(i) for i in range(3000)]  # both ends compute the same times
    assert offs[0] > 0 and offs == sorted(offs)
    assert offs[-1] / 3000 == pytest.approx(10_000_000, rel=0.06)
    assert literal_slots([1.0]) == [(SLOT_LITERAL, 1 << 32)]
    assert poisson_slots(1.0)[0][0] == SLOT_EXPONENTIAL
