"""The reflector's fast paths read the Error Estimate (RFC 4656 §4.1.2, reused by RFC 5357 §4.2.1
and RFC 8762 §4.3.1) once per second of receive time, with their T2/T3 second cache: a change of
the clock's error shows in the first reply received in the next second, never later.

Requests are built with ``struct`` (and raw ``cryptography`` for the authenticated one, in
tests/test_reflector_batch.py); the Error Estimate is read from the replies at its RFC offset."""

from __future__ import annotations

import struct

import pytest

from agent.engine.keys import TestKeys
from agent.engine.packets import Proto, Security
from agent.engine.reflector import ReflectorSession
from netlink.secret import Secret
from tests.test_reflector_batch import AES_KEY, HMAC_KEY, _stamp, _twamp, _twamp_auth

NS = 10**9
S0 = 1_780_000_000 * NS  # not the second the session was made in


def _session(kind: str, source) -> ReflectorSession:
    if kind == "auth":
        return ReflectorSession(Proto.TWAMP, Security.AUTH, keys=TestKeys(Secret(AES_KEY), Secret(HMAC_KEY)),
                                error_estimate=source)
    return ReflectorSession(Proto.STAMP if kind == "stamp" else Proto.TWAMP, error_estimate=source)


@pytest.mark.parametrize("kind,build,at", [("unauth", _twamp, 12), ("stamp", _stamp, 12), ("auth", _twamp_auth, 24)])
def test_error_estimate_read_once_per_second_of_receive_time(kind, build, at) -> None:
    value = [0x8101]
    reads: list[int] = []

    def source() -> int:
        reads.append(value[0])
        return value[0]

    sess = _session(kind, source)
    got = []
    for i, rx in enumerate((S0 + 100, S0 + NS // 2, S0 + NS - 1, S0 + NS, S0 + NS + 7)):
        if i == 1:
            value[0] = 0x8202  # the clock's error changes mid-second
        out = sess.reflect(build(i), rx, 64, lambda rx=rx: rx + 1000)
        assert out is not None
        got.append(struct.unpack_from("!H", out, at)[0])
    # (S bit set, Z clear: NTP format) the old value for the rest of that second, the new from the next
    assert got == [0x8101, 0x8101, 0x8101, 0x8202, 0x8202]
    assert len(reads) <= 4  # at construction (twice at most), then at each new second


def test_packed_error_estimate_reads_again_when_time_goes_back() -> None:
    """Senders and receivers keep a 1 s cache too (agent.engine.clockerr): a clock stepped back
    must not freeze the estimate until time catches up with the last read."""
    from agent.engine.clockerr import PackedErrorEstimate

    value = [0x8101]
    pe = PackedErrorEstimate(lambda: value[0])
    assert pe.get(S0) == 0x8101
    value[0] = 0x8202
    assert pe.get(S0 + NS // 2) == 0x8101  # cached within the second
    assert pe.get(S0 - 3600 * NS) == 0x8202  # stepped back an hour: read again
    value[0] = 0x8303
    assert pe.get(S0 - 3600 * NS + NS) == 0x8303
