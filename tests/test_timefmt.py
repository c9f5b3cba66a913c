"""NTP/PTP timestamps and the Error Estimate, checked against values computed by hand from RFC 4656 §4.1.2."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from agent.engine.timefmt import (
    ErrorEstimate,
    ntp_from_unix_ns,
    pack_ts,
    ptp_from_unix_ns,
    unix_ns_from_ntp,
    unix_ns_from_ptp,
    unpack_ts,
)


def test_ntp_epoch_and_half_second():
    # 1970-01-01 00:00:00.5 UTC is NTP second 2208988800 with fraction 2**31.
    assert ntp_from_unix_ns(500_000_000) == (2_208_988_800 << 32) | (1 << 31)
    assert pack_ts(ntp_from_unix_ns(0)) == struct.pack("!II", 2_208_988_800, 0)


@given(st.integers(min_value=0, max_value=(2**32 - 2_208_988_801) * 10**9))
def test_ntp_round_trip_within_a_nanosecond(ns):
    assert abs(unix_ns_from_ntp(ntp_from_unix_ns(ns)) - ns) <= 1


@given(st.integers(min_value=0, max_value=2**34 * 10**9), st.integers(min_value=-(10**10), max_value=10**10))
def test_ntp_per_second_cache_matches_the_formula(ns, step):
    """The per-second cache (a reflector's T2 and T3 share their second) changes nothing:
    RFC 4656 §4.1.2 straight from the definition, for a time and one near it."""
    for t in (ns, max(0, ns + step), ns):
        sec, rem = divmod(t, 10**9)
        assert ntp_from_unix_ns(t) == (((sec + 2_208_988_800) % 2**32) << 32) | (rem * 2**32 // 10**9)


@given(st.integers(min_value=0, max_value=2**32 * 10**9 - 1))
def test_ptp_round_trip_exact(ns):
    assert unix_ns_from_ptp(ptp_from_unix_ns(ns)) == ns
    assert unpack_ts(pack_ts(ptp_from_unix_ns(ns))) == ptp_from_unix_ns(ns)


def test_error_estimate_bits():
    # S=1 Z=0 scale=1 multiplier=1: 0x8101, error 2**-31 s.
    e = ErrorEstimate.unpack(0x8101)
    assert (e.synced, e.ptp, e.scale, e.multiplier) == (True, False, 1, 1)
    assert e.seconds == 2.0**-31
    assert ErrorEstimate(False, True, 63, 255).pack() == 0x7FFF


@given(st.floats(min_value=1e-9, max_value=1e9), st.booleans())
def test_error_estimate_never_understates(err, synced):
    e = ErrorEstimate.from_seconds(err, synced)
    assert e.multiplier >= 1
    assert e.seconds >= err * (1 - 1e-12)
    assert e.synced is synced
    assert ErrorEstimate.unpack(e.pack()) == e
