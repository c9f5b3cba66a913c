"""The test engine's four timestamps, their sources and the Error Estimate it writes, on loopback.

Real UDP through agent.engine.udp, checked against the issue's rules: T1 in the packet
is a user stamp taken just before the send and the kernel TX stamp replaces it for
computation (both kept); T2 is the reflector's kernel RX stamp; T4 ours; every packet's
Error Estimate is the clock's (adjtimex), with Z = 1 when PTP format was negotiated.
"""

from __future__ import annotations

import asyncio

from agent.engine import udp as udp_mod
from agent.engine.clock import STAMP_COUNTERS, ClockErrorCache
from agent.engine.clockerr import PackedErrorEstimate
from agent.engine.packets import MODE_PTP_TIMESTAMPS, MODE_UNAUTHENTICATED
from agent.engine.sender import TestSender
from agent.engine.timefmt import ErrorEstimate
from agent.engine.timestamping import Stamp, StampSource
from agent.engine.udp import TwampReflectorEndpoint, run_twamp_sender
from agent.sessions.results import summarize

N = 8


def _session(mode: int, **kw) -> tuple[list, dict[str, int]]:
    async def main() -> list:
        async with TwampReflectorEndpoint(("127.0.0.1", 0)) as ep:
            ep.add_session(b"e" * 16, ("127.0.0.1", 0), mode, **kw)
            return await run_twamp_sender(("127.0.0.1", 0), ("127.0.0.1", ep.port), mode,
                                          count=N, interval=0.002, timeout=2.0, hardware=False)

    before = STAMP_COUNTERS.snapshot()
    recs = asyncio.run(asyncio.wait_for(main(), 20))
    after = STAMP_COUNTERS.snapshot()
    return recs, {k: after[k] - before[k] for k in after}


def test_four_timestamps_sources_and_counts() -> None:
    recs, delta = _session(MODE_UNAUTHENTICATED)
    assert len(recs) == N and not any(r.lost for r in recs)
    for r in recs:
        assert r.t1_kernel_ns is not None and r.t1_source == "sw"  # kernel TX stamp replaces T1 ...
        assert r.t1_ns <= r.t1_kernel_ns  # ... and the user T1 written in the packet is kept
        assert r.t1_kernel_ns <= r.t2_ns < r.t3_ns <= r.t4_ns  # one clock on loopback
        assert r.t4_source == "sw"
        assert r.rtt_ns == (r.t4_ns - r.t1_kernel_ns) - (r.t3_ns - r.t2_ns)
    assert summarize(recs).stamp_sources == {"tx_sw": N, "rx_sw": N}
    # Process-wide (exporter) counters: T1 kernel TX, T2 at the reflector and T4 here, none in user space.
    assert delta["tx_sw"] == N and delta["rx_sw"] == 2 * N
    assert delta["rx_user"] == delta["tx_user"] == 0


def test_packets_carry_the_clocks_error_estimate() -> None:
    recs, _ = _session(MODE_UNAUTHENTICATED)
    cache = ClockErrorCache(refresh_s=0)
    now = {cache.packed(), cache.packed()}  # the kernel state is what both ends read
    clock = [ErrorEstimate.unpack(v) for v in now]
    lo, hi = min(c.seconds for c in clock), max(c.seconds for c in clock)
    step = max(2.0 ** (c.scale - 32) for c in clock)  # the sum is rounded up to what the field can say
    for r in recs:
        assert r.t4_error in now  # T4: a kernel RX stamp, the clock's estimate as it is
        # T1 and T3 are written before the send: widened by the recent TX lag (docs/timestamping.md)
        for v in (r.t1_error, r.reflector_error):
            e = ErrorEstimate.unpack(v)
            assert e.synced == clock[0].synced and lo <= e.seconds <= hi + 0.01 + step, (e, clock)
        assert not r.t1_error & 0x4000 and not r.reflector_error & 0x4000  # NTP format: Z = 0


def test_negotiated_ptp_mode_means_ptp_timestamps_and_z_bit() -> None:
    recs, _ = _session(MODE_UNAUTHENTICATED | MODE_PTP_TIMESTAMPS)
    for r in recs:
        assert r.t1_error & 0x4000 and r.reflector_error & 0x4000  # RFC 8186 Z bit, both ends
        assert r.t1_kernel_ns <= r.t2_ns < r.t3_ns <= r.t4_ns  # PTP-format T2/T3 decoded right
        assert 0 < r.rtt_ns < 50_000_000


def test_fixed_error_estimate_gets_the_z_bit_of_the_format_written() -> None:
    ee = ErrorEstimate.from_seconds(1e-6, synced=True)  # Z = 0 as given
    assert PackedErrorEstimate(ee, ptp=True).get(0) == ee.pack() | 0x4000
    assert PackedErrorEstimate(ee.pack() | 0x4000, ptp=False).get(0) == ee.pack()
    assert PackedErrorEstimate(lambda: ee.pack(), ptp=True).get(0) & 0x4000


def test_tx_stamp_before_the_user_t1_is_refused() -> None:
    snd = TestSender(error_estimate=1)
    snd.build(0, 1_000)
    assert not snd.on_tx_stamp(0, 999, "sw")  # a stamp of some earlier packet
    assert snd.records()[0].t1_kernel_ns is None and snd.counters.tx_stamp_rejected == 1
    assert snd.on_tx_stamp(0, 1_500, "sw") and snd.records()[0].t1_best_ns == 1_500


def test_tx_stamps_stay_with_their_packets_after_a_send_used_up_a_key(monkeypatch) -> None:
    # Packet 1's first send failed with EAGAIN on a kernel that still took an OPT_ID key
    # for it (before 6.8): our keys 0, 1, 2 are the kernel's 0, 2, 3.
    snd = TestSender(error_estimate=1)
    for n, t in enumerate((1_000, 2_000, 3_000)):
        snd.build(n, t)
    stamps = [(0, 1_100), (2, 2_100), (3, 3_100)]
    monkeypatch.setattr(udp_mod.ts, "drain_tx_stamps", lambda sock, config=None: [
        (k, Stamp(ns, StampSource.SW)) for k, ns in stamps])
    reader = udp_mod._SenderSocket(None, snd, None, {0: 0, 1: 1, 2: 2}, None, True)  # type: ignore[arg-type]
    reader.key_slack = 1
    reader.drain_tx()
    assert [r.t1_kernel_ns for r in snd.records()] == [1_100, 2_100, 3_100]
    assert snd.counters.tx_stamp_rejected == 0
