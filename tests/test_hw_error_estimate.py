"""The PHC -> CLOCK_REALTIME conversion error in the Error Estimate we send (RFC 4656 §4.1.2).

A fake PTP device (tests/test_clock.py: PHC = TAI running 50 ppm fast) knows the truth, so the
bound PhcClock publishes can be checked against the real conversion error, and the Error
Estimate against the clock's own error plus that bound."""

from __future__ import annotations

import pytest

from agent.engine import clock
from agent.engine import timestamping as ts
from agent.engine.timefmt import ErrorEstimate
from agent.engine.txlag import TxLag, widened_error

from tests.test_clock import NS, FakePtpDevice


@pytest.fixture(autouse=True)
def _no_published_errors():
    saved = dict(clock._CONVERSION_ERROR_NS)
    clock._CONVERSION_ERROR_NS.clear()
    yield
    clock._CONVERSION_ERROR_NS.clear()
    clock._CONVERSION_ERROR_NS.update(saved)


def _state(esterror_us: int, synced: bool = True) -> clock.ClockState:
    return clock.ClockState(time_state=0, status=0 if synced else clock.STA_UNSYNC, maxerror_us=esterror_us * 4,
                            esterror_us=esterror_us, offset_ns=0, freq_ppm=0.0, tai_offset_s=0)


def test_conversion_error_bounds_the_real_error():
    dev = FakePtpDevice({ts.PTP_SYS_OFFSET_EXTENDED})
    phc = ts.PhcClock(0, fd=-1, ioctl=dev.ioctl)
    u = phc.uncertainty_ns
    assert 0 < u <= 500
    # One sample, drift unknown: a free-running oscillator's 100 ppm over the refresh interval.
    assert phc.conversion_error_ns == u + 100_000
    for _ in range(3):
        dev.rt += 1_000_000_000
        phc.to_realtime(dev.phc(dev.rt))  # past refresh_ns: a new sample, the slope from two
    bound = phc.conversion_error_ns
    assert u < bound <= 4 * 500  # u + (u_last + u_prev) x refresh / span, span ~1 s
    # The real error of a stamp up to one refresh interval past the last sample (the fake PHC
    # runs 50 ppm fast: 50 µs in that second if the drift were not followed) stays within it.
    for frac in (0.0, 0.3, 0.99):
        t = dev.rt + int(frac * NS)
        err = abs(phc.to_realtime(dev.phc(t)) - t)
        assert err <= bound, (frac, err, bound)


def test_a_step_forgets_the_drift_and_widens_the_bound():
    dev = FakePtpDevice({ts.PTP_SYS_OFFSET_EXTENDED})
    phc = ts.PhcClock(0, fd=-1, ioctl=dev.ioctl)
    dev.rt += NS
    phc.refresh()
    narrow = phc.conversion_error_ns
    dev.rt += NS
    real_phc = dev.phc
    dev.phc = lambda rt: real_phc(rt) + 1000 * NS  # phc_ctl stepped it by 1000 s
    phc.refresh()
    assert phc.steps == 1
    assert phc.conversion_error_ns == phc.uncertainty_ns + 100_000 > narrow


def test_published_bound_reaches_the_error_estimate():
    dev = FakePtpDevice({ts.PTP_SYS_OFFSET_EXTENDED})
    phc = ts.PhcClock(7, fd=-1, ioctl=dev.ioctl)
    phc.publish = True  # as phc_clock() does for the PHCs stamps are converted with
    dev.rt += NS
    phc.refresh()
    conv = phc.conversion_error_ns
    assert clock.conversion_error_s() == conv / 1e9
    cache = clock.ClockErrorCache(reader=lambda: _state(10))
    est = cache.estimate()
    want = 10e-6 + conv / 1e9
    assert cache.extra_error_s == conv / 1e9
    assert est.synced and est.seconds >= want
    assert est == ErrorEstimate.from_seconds(want, synced=True)  # the sum, rounded up once
    # A cache that does not describe PHC stamps leaves it out; an unsynchronised clock keeps S=0.
    assert clock.ClockErrorCache(reader=lambda: _state(10), phc=False).estimate() == \
        ErrorEstimate.from_seconds(10e-6, synced=True)
    unsync = clock.ClockErrorCache(reader=lambda: _state(10, synced=False)).estimate()
    assert not unsync.synced and unsync.seconds >= 1.0 + conv / 1e9
    # The largest bound of the PHCs in use counts; withdrawn, it is gone.
    clock.set_conversion_error(8, conv * 3)
    assert clock.conversion_error_s() == conv * 3 / 1e9
    clock.set_conversion_error(8, None)
    clock.set_conversion_error(7, None)
    assert clock.conversion_error_s() == 0.0


def test_widened_error_adds_lag_and_conversion(monkeypatch):
    monkeypatch.setattr(clock, "read_clock_state", lambda: _state(20))
    clock.set_conversion_error(0, 3_000)  # 3 µs
    lag = TxLag()
    lag.observe("reflector", 1_000_000 + 40_000, 1_000_000)  # 40 µs
    got = ErrorEstimate.unpack(widened_error("reflector", lag=lag)())
    assert got.synced and got.seconds >= 20e-6 + 3e-6 + 40e-6
    assert got.seconds <= (20e-6 + 3e-6 + 40e-6) * 1.02  # two round-ups at most, each < 1/128



def test_doctor_reports_the_conversion_bound(monkeypatch):
    """``xwamp doctor`` takes a second PHC reading one refresh interval after the first, as the
    agent does, and reports the drift and the bound the Error Estimate would carry (its text
    line is checked on the emulated igb, tests/kernel_hw/test_hwstamp.py)."""
    from agent.commands import doctor

    dev = FakePtpDevice({ts.PTP_SYS_OFFSET_EXTENDED})
    real = ts.PhcClock

    def fake_phc(index: int) -> ts.PhcClock:
        phc = real(index, fd=-1, ioctl=dev.ioctl)
        phc.close = lambda: None  # type: ignore[method-assign]  # no fd to close
        return phc

    monkeypatch.setattr(ts, "PhcClock", fake_phc)
    monkeypatch.setattr(doctor.time, "sleep", lambda s: setattr(dev, "rt", dev.rt + int(s * NS)))
    monkeypatch.setattr(doctor, "phc2sys_processes", list)
    d = doctor._probe_phc(3, "eth0")
    assert d["readable"] and d["conversion_steps"] == 0 and d["conversion_span_s"] == 1.0
    assert abs(d["drift_ppm"] - 50) < 0.01  # the fake PHC runs 50 ppm fast
    u = d["uncertainty_ns"]
    assert u < d["conversion_error_ns"] <= 4 * u  # the read windows, not a free-running 100 µs
