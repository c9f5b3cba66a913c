"""Decoding of SO_TIMESTAMPING ancillary data (crafted bytes) and a loopback smoke test."""

from __future__ import annotations

import errno
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine import timestamping as ts
from agent.engine.clock import StampCounters
from agent.engine.timestamping import Stamp, StampSource

NS = 1_000_000_000


def scm(sw: tuple[int, int] = (0, 0), legacy: tuple[int, int] = (0, 0), hw: tuple[int, int] = (0, 0)) -> bytes:
    return struct.pack("=qqqqqq", *sw, *legacy, *hw)


def ext_err(key: int, origin: int = ts.SO_EE_ORIGIN_TIMESTAMPING, ee_errno: int = errno.ENOMSG,
            info: int = ts.SCM_TSTAMP_SND) -> bytes:
    return struct.pack("=IBBBBII", ee_errno, origin, 0, 0, 0, info, key) + bytes(16)


class FakePhc:
    """Stands in for a PhcClock: PHC runs 37 s ahead (TAI) of CLOCK_REALTIME."""

    def to_realtime(self, phc_ns: int) -> int:
        return phc_ns - 37 * NS


HW_CFG = ts.TimestampingConfig(True, True, True, True, 0, 0)


@pytest.fixture
def fake_phc(monkeypatch):
    monkeypatch.setitem(ts._PHCS, 0, FakePhc())


def test_software_rx_stamp_decodes_as_sw():
    c = StampCounters()
    anc = [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, scm(sw=(1_700_000_000, 123)))]
    assert ts.rx_stamp(anc, counters=c) == Stamp(1_700_000_000 * NS + 123, StampSource.SW)
    assert c.rx_sw == 1 and c.hw_fallback == 0


def test_raw_hardware_stamp_decodes_as_hw(fake_phc):
    c = StampCounters()
    anc = [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, scm(sw=(5, 5), hw=(1_700_000_037, 999_999_999)))]
    got = ts.rx_stamp(anc, config=HW_CFG, counters=c)
    assert got == Stamp(1_700_000_000 * NS + 999_999_999, StampSource.HW)
    assert c.rx_hw == 1 and c.rx_sw == 0


def test_hardware_socket_without_hw_stamp_falls_back_and_counts(fake_phc):
    c = StampCounters()
    anc = [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, scm(sw=(1_700_000_000, 1)))]
    assert ts.rx_stamp(anc, config=HW_CFG, counters=c).source is StampSource.SW
    assert c.hw_fallback == 1 and c.rx_sw == 1


def test_hardware_stamp_without_phc_relation_is_not_passed_off_as_realtime():
    c = StampCounters()
    cfg = ts.TimestampingConfig(True, True, True, True, 99, 0)  # no PhcClock registered for 99
    anc = [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, scm(sw=(10, 0), hw=(47, 0)))]
    assert ts.rx_stamp(anc, config=cfg, counters=c) == Stamp(10 * NS, StampSource.SW)
    assert c.phc_unconverted == 1


def test_timestamping_new_cmsg_and_empty():
    anc = [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING_NEW, scm(sw=(2, 3)))]
    assert ts.rx_stamp(anc, counters=StampCounters()) == Stamp(2 * NS + 3, StampSource.SW)
    assert ts.rx_stamp([(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, scm())], counters=StampCounters()) is None
    assert ts.rx_stamp([], counters=StampCounters()) is None


def test_error_queue_message_decodes_to_key_and_stamp():
    c = StampCounters()
    anc = [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, scm(sw=(1_700_000_001, 42))),
           (ts.SOL_IP, ts.IP_RECVERR, ext_err(7))]
    assert ts.decode_tx_message(anc, counters=c) == (7, Stamp(1_700_000_001 * NS + 42, StampSource.SW))
    assert c.tx_sw == 1


def test_error_queue_ipv6_hw(fake_phc):
    anc = [(ts.SOL_IPV6, ts.IPV6_RECVERR, ext_err(0xFFFFFFFF)),
           (socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, scm(hw=(100, 0)))]
    assert ts.decode_tx_message(anc, config=HW_CFG, counters=StampCounters()) == (
        0xFFFFFFFF, Stamp(63 * NS, StampSource.HW))


def test_error_queue_non_timestamp_errors_are_skipped():
    anc = [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, scm(sw=(1, 0)))]
    for bad in (ext_err(1, origin=ts.SO_EE_ORIGIN_ICMP, ee_errno=errno.ECONNREFUSED),
                ext_err(1, info=ts.SCM_TSTAMP_SCHED)):
        assert ts.decode_tx_message(anc + [(ts.SOL_IP, ts.IP_RECVERR, bad)], counters=StampCounters()) is None


def test_ttl_decoding():
    assert ts.rx_ttl([(ts.SOL_IP, ts.IP_TTL, struct.pack("=i", 63))]) == 63
    assert ts.rx_ttl([(ts.SOL_IPV6, ts.IPV6_HOPLIMIT, struct.pack("=i", 255))]) == 255
    assert ts.rx_ttl([(ts.SOL_IP, ts.IP_TTL, struct.pack("=i", -5))]) is None
    assert ts.rx_ttl([]) is None


def test_ancillary_bufsize_holds_everything():
    need = socket.CMSG_SPACE(48) + socket.CMSG_SPACE(16 + 28) + socket.CMSG_SPACE(4) + socket.CMSG_SPACE(20)
    assert ts.ANCILLARY_BUFSIZE >= need


def test_architecture_gate():
    assert ts._so_values_ok("x86_64") and ts._so_values_ok("aarch64") and ts._so_values_ok("armv7l")
    for m in ("parisc64", "parisc", "sparc64", "sparc"):
        assert not ts._so_values_ok(m)
    for m in ("ppc64le", "mips64", "alpha"):  # same SO_TIMESTAMPING numbers, other ioctl encoding
        assert ts._so_values_ok(m) and not ts._ioc_ok(m)


def test_ptp_ioctl_numbers():
    # _IOW('=', 5, 832), _IOWR('=', 8, 64), _IOWR('=', 9, 1216) in the generic encoding
    assert ts.PTP_SYS_OFFSET == 0x43403D05
    assert ts.PTP_SYS_OFFSET_PRECISE == 0xC0403D08
    assert ts.PTP_SYS_OFFSET_EXTENDED == 0xC4C03D09


cmsg_item = st.tuples(
    st.sampled_from([socket.SOL_SOCKET, ts.SOL_IP, ts.SOL_IPV6, 0, 1, 41, 255]),
    st.sampled_from([ts.SCM_TIMESTAMPING, ts.SCM_TIMESTAMPING_NEW, ts.SCM_TIMESTAMPNS, ts.IP_RECVERR,
                     ts.IPV6_RECVERR, ts.IP_TTL, ts.IPV6_HOPLIMIT, 0, 1000]),
    st.binary(max_size=80),
)
junk = st.one_of(cmsg_item, st.none(), st.integers(), st.tuples(st.integers()), st.text(max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(cmsg_item, junk), max_size=6))
def test_decoders_never_raise_on_garbage(anc):
    c = StampCounters()
    r = ts.rx_stamp(anc, counters=c)
    assert r is None or (isinstance(r, Stamp) and r.ns > 0)
    t = ts.decode_tx_message(anc, counters=c)
    assert t is None or (0 <= t[0] < 2**32 and t[1].ns > 0)
    ttl = ts.rx_ttl(anc)
    assert ttl is None or 0 <= ttl <= 255


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**40), st.integers(0, NS - 1))
def test_scm_roundtrip(sec, nsec):
    sw, hw = ts.decode_scm_timestamping(scm(sw=(sec, nsec), hw=(sec, nsec)))
    expect = sec * NS + nsec if (sec or nsec) else None
    assert sw == expect and hw == expect


@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_loopback_rx_tx_kernel_stamps(family, addr):
    with socket.socket(family, socket.SOCK_DGRAM) as a, socket.socket(family, socket.SOCK_DGRAM) as b:
        a.bind((addr, 0))
        b.bind((addr, 0))
        cfg = ts.enable_timestamping(a, "lo")
        ts.enable_timestamping(b, "lo")
        ts.enable_recv_ttl(b)
        assert cfg.software_rx and cfg.software_tx and not cfg.hardware_rx
        c = StampCounters()
        sent: dict[int, int] = {}
        for key in range(5):
            sent[key] = time.time_ns()
            a.sendto(b"p" * 48, b.getsockname()[:2])
            _d, anc, flags, _ = b.recvmsg(256, ts.ANCILLARY_BUFSIZE)
            assert not flags & socket.MSG_CTRUNC
            rx = ts.rx_stamp(anc, counters=c)
            assert rx is not None and rx.source is StampSource.SW
            assert ts.rx_ttl(anc) == 64
        deadline = time.monotonic() + 2
        got: dict[int, Stamp] = {}
        while len(got) < 5 and time.monotonic() < deadline:
            got.update(ts.drain_tx_stamps(a, counters=c))
            time.sleep(0.005)
        assert sorted(got) == list(range(5))
        for key, st_ in got.items():
            assert st_.ns >= sent[key]
        assert c.tx_sw == 5 and c.rx_sw == 5


@pytest.mark.parametrize("timeout", [None, 0.0, 2.0])
def test_drains_never_block_whatever_the_socket_mode(timeout):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
        a.bind(("127.0.0.1", 0))
        ts.enable_timestamping(a)
        a.settimeout(timeout)
        t0 = time.monotonic()
        assert ts.drain_tx_stamps(a, counters=StampCounters()) == []
        a.sendto(b"self", a.getsockname())
        time.sleep(0.01)
        packets, tx = ts.drain_socket(a, counters=StampCounters())
        assert time.monotonic() - t0 < 1.0
        assert a.gettimeout() == timeout
        assert len(packets) == 1 and packets[0][0] == b"self"
        assert ts.rx_stamp(packets[0][1], counters=StampCounters()) is not None
        assert [k for k, _ in tx] == [0]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([socket.SOL_SOCKET, ts.SOL_IP]),
                          st.sampled_from([ts.SCM_TIMESTAMPING, ts.SCM_TIMESTAMPING_NEW, ts.IP_TTL]),
                          st.tuples(*[st.integers(-2, 2**40) | st.sampled_from([NS - 1, NS, 0])] * 6)
                          .map(lambda v: struct.pack("=qqqqqq", *v))), max_size=3))
def test_fast_path_agrees_with_careful_path(anc):
    try:
        fast = ts._rx_fast(anc)
    except (TypeError, ValueError):
        return  # the careful path takes over; covered by the garbage test
    assert fast == ts._rx_careful(anc)


def test_asyncio_reader_with_drain_socket_gets_everything_without_spinning():
    import asyncio

    async def main() -> tuple[int, list, list]:
        loop = asyncio.get_running_loop()
        calls, pkts, tx = 0, [], []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", 0))
            a.setblocking(False)
            cfg = ts.enable_timestamping(a)

            def on_ready() -> None:  # EPOLLERR (TX stamps waiting) also lands here
                nonlocal calls
                calls += 1
                p, t = ts.drain_socket(a, config=cfg, counters=StampCounters())
                pkts.extend(p)
                tx.extend(t)

            loop.add_reader(a.fileno(), on_ready)
            try:
                for _ in range(20):
                    a.sendto(b"q", a.getsockname())
                    await asyncio.sleep(0.002)
                await asyncio.sleep(0.05)
            finally:
                loop.remove_reader(a.fileno())
        return calls, pkts, tx

    calls, pkts, tx = asyncio.run(main())
    assert len(pkts) == 20 and sorted(k for k, _ in tx) == list(range(20))
    assert calls <= 60, "the reader spun: the error queue was not drained"


def test_32_bit_abi_old_timespec(monkeypatch):
    monkeypatch.setattr(ts, "_LP64", False)
    data = struct.pack("=iiiiii", 1_700_000_000, 5, 0, 0, 0, 0)
    anc = [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING, data)]
    assert ts.rx_stamp(anc, counters=StampCounters()) == Stamp(1_700_000_000 * NS + 5, StampSource.SW)
    # the y2038-safe _NEW cmsg is always 64-bit
    anc = [(socket.SOL_SOCKET, ts.SCM_TIMESTAMPING_NEW, scm(sw=(3_000_000_000, 7)))]
    assert ts.rx_stamp(anc, counters=StampCounters()) == Stamp(3_000_000_000 * NS + 7, StampSource.SW)
