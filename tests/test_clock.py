"""adjtimex decoding, the Error Estimate, its cache, stamp counters, and PHC→REALTIME mapping."""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from agent.engine import clock
from agent.engine import timestamping as ts
from agent.engine.timefmt import ErrorEstimate

NS = 1_000_000_000


def timex_bytes(status: int, maxerror: int, esterror: int, **kw) -> bytes:
    tx = clock.Timex()
    tx.status, tx.maxerror, tx.esterror = status, maxerror, esterror
    for k, v in kw.items():
        setattr(tx, k, v)
    return bytes(tx)


def test_timex_layout_matches_the_kernel_on_64_bit():
    if ctypes.sizeof(ctypes.c_long) == 8:
        assert ctypes.sizeof(clock.Timex) == 208


def test_synced_clock_uses_esterror():
    st = clock.decode_timex(timex_bytes(clock.STA_PLL | clock.STA_NANO, 250_000, 1500, offset=-1234, tai=37), 0)
    assert st.synced and st.state_name == "TIME_OK"
    assert st.offset_ns == -1234 and st.tai_offset_s == 37
    ee = st.error_estimate()
    assert ee.synced and not ee.ptp
    assert 0.0015 <= ee.seconds < 0.0015 * 1.01
    assert st.error_estimate(bound=True).seconds >= 0.25


def test_unsynced_clock_clears_s():
    st = clock.decode_timex(timex_bytes(clock.STA_UNSYNC, 16_000_000, 16_000_000), clock.TIME_ERROR)
    assert not st.synced
    ee = st.error_estimate(ptp=True)
    assert not ee.synced and ee.ptp and ee.multiplier >= 1 and ee.seconds >= 16
    # TIME_ERROR alone (e.g. a leap second pending past its time) also means unsynced
    assert not clock.decode_timex(timex_bytes(0, 10, 10), clock.TIME_ERROR).synced


def test_synced_without_any_published_error_is_not_claimed_precise():
    st = clock.decode_timex(timex_bytes(0, 0, 0), 0)
    assert st.error_estimate().seconds >= clock.UNKNOWN_SYNCED_ERROR_S


def test_microsecond_offset_units_and_freq():
    st = clock.decode_timex(timex_bytes(0, 1, 1, offset=7, freq=65536 * 3), 0)
    assert st.offset_ns == 7000 and st.freq_ppm == 3.0


def test_short_timex_is_a_clean_error():
    with pytest.raises(ValueError):
        clock.decode_timex(b"\0" * 20, 0)


def test_live_adjtimex_reads():
    st = clock.read_clock_state()
    assert st.time_state in clock.TIME_STATES
    ee = st.error_estimate()
    assert isinstance(ee, ErrorEstimate) and ee.multiplier >= 1
    assert ErrorEstimate.unpack(ee.pack()) == ee


def test_cache_reads_once_per_refresh():
    calls = []

    def reader():
        calls.append(1)
        return clock.decode_timex(timex_bytes(0, 100, 20), 0)
    cache = clock.ClockErrorCache(refresh_s=3600, reader=reader)
    for _ in range(1000):
        cache.packed()
    assert len(calls) == 1
    assert cache.estimate(ptp=True).ptp
    cache.refresh_s = 0
    cache.estimate()
    assert len(calls) == 2


def test_counters():
    c = clock.StampCounters()
    c.add("rx", "hw")
    c.add("tx", "user", 3)
    c.add_fallback()
    snap = c.snapshot()
    assert snap["rx_hw"] == 1 and snap["tx_user"] == 3 and snap["hw_fallback"] == 1
    c.reset()
    assert not any(c.snapshot().values())
    before = clock.STAMP_COUNTERS.rx_user
    assert ts.user_stamp("rx").source is ts.StampSource.USER
    assert clock.STAMP_COUNTERS.rx_user == before + 1


class FakePtpDevice:
    """PHC = TAI (realtime + 37 s) running 50 ppm fast; answers the PTP_SYS_OFFSET* ioctls."""

    def __init__(self, supported: set[int]):
        self.rt = 1_700_000_000 * NS
        self.supported = supported

    def phc(self, rt: int) -> int:
        return rt + 37 * NS + (rt - 1_700_000_000 * NS) * 50 // 1_000_000

    def ioctl(self, fd, req, buf):
        if req not in self.supported:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        n = struct.unpack_from("=I", buf, 0)[0]
        if req == ts.PTP_SYS_OFFSET_EXTENDED:
            for i in range(n):
                pre, mid, post = self.rt, self.rt + 400 + 100 * i, self.rt + 800 + 200 * i
                for j, v in enumerate((pre, self.phc(mid), post)):
                    struct.pack_into("=qII", buf, 16 + i * 48 + j * 16, v // NS, v % NS, 0)
                self.rt += 5000
        elif req == ts.PTP_SYS_OFFSET:
            vals = []
            for i in range(n):
                vals += [self.rt, self.phc(self.rt + 500)]
                self.rt += 1000
            vals.append(self.rt)
            for k, v in enumerate(vals):
                struct.pack_into("=qII", buf, 16 + k * 16, v // NS, v % NS, 0)
        return 0


@pytest.mark.parametrize("req,method", [(ts.PTP_SYS_OFFSET_EXTENDED, "extended"), (ts.PTP_SYS_OFFSET, "sys_offset")])
def test_phc_to_realtime_tracks_offset_and_drift(req, method):
    dev = FakePtpDevice({req})
    phc = ts.PhcClock(0, fd=-1, ioctl=dev.ioctl)
    assert phc.method == method and phc.uncertainty_ns <= 500
    for step in range(1, 6):  # 1.5 s steps: each conversion past refresh_ns re-samples
        dev.rt += 1_500_000_000
        rt = dev.rt
        got = phc.to_realtime(dev.phc(rt))
        assert abs(got - rt) < 2_000, (step, got - rt)
    # between samples the drift is extrapolated: 0.9 s later, still within a few µs (50 ppm → 45 µs uncorrected)
    later = dev.rt + 900_000_000
    assert abs(phc.to_realtime(dev.phc(later)) - later) < 5_000
