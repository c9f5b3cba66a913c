"""Kernel and hardware packet timestamps for the test engine (SO_TIMESTAMPING).

Usage on a UDP socket::

    cfg = enable_timestamping(sock, iface="eth0")      # once
    enable_recv_ttl(sock)                               # optional: TTL/hop limit, same recvmsg
    data, anc, flags, addr = sock.recvmsg(2048, ANCILLARY_BUFSIZE)
    t = rx_stamp(anc, config=cfg) or user_stamp("rx")   # RX stamp, CLOCK_REALTIME ns
    sock.sendmsg([pkt]); key = next_key; next_key += 1  # OPT_ID: the n-th send gets key n
    for key, stamp in drain_tx_stamps(sock, config=cfg): ...

TX stamps are keyed by SOF_TIMESTAMPING_OPT_ID: on a UDP socket the kernel numbers
datagrams 0, 1, 2, ... from the moment the option is first enabled (re-enabling while
set does not reset it; see Documentation/networking/timestamping.rst).

asyncio note: Python's EpollSelector reports EPOLLERR as readable (and writable), and
the kernel raises EPOLLERR while the error queue holds TX stamps. A reader callback
that only drains the normal queue therefore spins; use :func:`drain_socket`, which
empties both queues.

Hardware stamps are in the NIC's PTP hardware clock (PHC) time base, often TAI. We
relate them to CLOCK_REALTIME ourselves with PTP_SYS_OFFSET_{PRECISE,EXTENDED,} on
/dev/ptpN (offset and drift, refreshed every second), so phc2sys is not required;
without a readable /dev/ptpN we stay on software stamps and say so.

Constants: the socket module lacks them, so they live here, with the asm-generic
values (include/uapi/asm-generic/socket.h, linux/net_tstamp.h, linux/errqueue.h,
linux/ptp_clock.h). Checked against arch/*/include/uapi/asm/socket.h: parisc
(SO_TIMESTAMPING 0x4020) and sparc (0x23) number these options differently, so we
refuse them rather than send wrong numbers. alpha, mips and powerpc have their own
SO_* tables too, but the values used here (35, 37, 65, 58) are the same there; only
SOL_SOCKET differs (0xffff on alpha/mips), and Python's socket module has that right.
alpha, mips, powerpc, parisc and sparc also encode ioctl numbers differently, so the
PTP ioctls (hardware stamps) are refused there.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import platform
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterable

from agent.engine.clock import STAMP_COUNTERS, StampCounters, set_conversion_error

log = logging.getLogger(__name__)

# ---- constants ---------------------------------------------------------------------------

# asm-generic/socket.h; the same numbers on every architecture but parisc and sparc
SO_TIMESTAMP_OLD = 29
SO_TIMESTAMPNS_OLD = 35
SO_TIMESTAMPING_OLD = 37
SO_TIMESTAMP_NEW = 63
SO_TIMESTAMPNS_NEW = 64
SO_TIMESTAMPING_NEW = 65
SO_TIMESTAMPNS = SO_TIMESTAMPNS_OLD  # native timespec; 64-bit time on 64-bit ABIs
SO_TIMESTAMPING = SO_TIMESTAMPING_OLD
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
SCM_TIMESTAMPING = SO_TIMESTAMPING
SCM_TIMESTAMPING_NEW = SO_TIMESTAMPING_NEW  # always struct __kernel_timespec (64-bit)
SCM_TIMESTAMPING_PKTINFO = 58  # struct scm_ts_pktinfo, with SOF_TIMESTAMPING_OPT_PKTINFO

# linux/net_tstamp.h: SOF_TIMESTAMPING_*
SOF_TIMESTAMPING_TX_HARDWARE = 1 << 0
SOF_TIMESTAMPING_TX_SOFTWARE = 1 << 1
SOF_TIMESTAMPING_RX_HARDWARE = 1 << 2
SOF_TIMESTAMPING_RX_SOFTWARE = 1 << 3
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
SOF_TIMESTAMPING_SYS_HARDWARE = 1 << 5  # deprecated, ignored by the kernel
SOF_TIMESTAMPING_RAW_HARDWARE = 1 << 6
SOF_TIMESTAMPING_OPT_ID = 1 << 7
SOF_TIMESTAMPING_TX_SCHED = 1 << 8
SOF_TIMESTAMPING_TX_ACK = 1 << 9
SOF_TIMESTAMPING_OPT_CMSG = 1 << 10
SOF_TIMESTAMPING_OPT_TSONLY = 1 << 11
SOF_TIMESTAMPING_OPT_STATS = 1 << 12
SOF_TIMESTAMPING_OPT_PKTINFO = 1 << 13
SOF_TIMESTAMPING_OPT_TX_SWHW = 1 << 14
SOF_TIMESTAMPING_BIND_PHC = 1 << 15
SOF_TIMESTAMPING_OPT_ID_TCP = 1 << 16
SOF_TIMESTAMPING_OPT_RX_FILTER = 1 << 17

SOF_SOFTWARE = SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_TX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE
SOF_HARDWARE = SOF_TIMESTAMPING_RX_HARDWARE | SOF_TIMESTAMPING_TX_HARDWARE | SOF_TIMESTAMPING_RAW_HARDWARE
# OPT_TSONLY: the error queue carries only the stamp, not a copy of the packet.
# OPT_CMSG: IPv4 error-queue messages get the usual cmsgs too (IPv6 always does).
SOF_OPTIONS = SOF_TIMESTAMPING_OPT_ID | SOF_TIMESTAMPING_OPT_TSONLY | SOF_TIMESTAMPING_OPT_CMSG

# linux/errqueue.h
SO_EE_ORIGIN_NONE = 0
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
SO_EE_ORIGIN_TXSTATUS = 4
SO_EE_ORIGIN_TIMESTAMPING = SO_EE_ORIGIN_TXSTATUS
SCM_TSTAMP_SND = 0  # driver passed the packet to the NIC (or NIC stamped it)
SCM_TSTAMP_SCHED = 1
SCM_TSTAMP_ACK = 2

# linux/in.h, linux/in6.h (same on every architecture)
SOL_IP = 0
SOL_IPV6 = 41
IP_TTL = 2
IP_RECVERR = 11
IP_RECVTTL = 12
IPV6_RECVERR = 25
IPV6_RECVHOPLIMIT = 51
IPV6_HOPLIMIT = 52

_GENERIC_IOC = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "aarch64", "arm64",
                "riscv64", "riscv32", "s390x", "loongarch64")
_GENERIC_SO = _GENERIC_IOC + ("ppc64", "ppc64le", "ppc", "mips", "mips64", "mipsel", "mips64el", "alpha")


def _machine() -> str:
    return platform.machine().lower()


def _so_values_ok(machine: str | None = None) -> bool:
    m = machine or _machine()
    return m in _GENERIC_SO or m.startswith("arm")


def _ioc_ok(machine: str | None = None) -> bool:
    m = machine or _machine()
    return m in _GENERIC_IOC or m.startswith("arm")


class UnsupportedArchitecture(RuntimeError):
    pass


def _require_supported_arch() -> None:
    if not _so_values_ok():
        raise UnsupportedArchitecture(
            f"SO_TIMESTAMPING constants here are the asm-generic values; {_machine()} "
            "(parisc/sparc) numbers them differently and is not supported")


# ---- records -------------------------------------------------------------------------------


class StampSource(enum.Enum):
    HW = "hw"
    SW = "sw"
    USER = "user"


@dataclass(slots=True)
class Stamp:
    ns: int  # ns since the Unix epoch, CLOCK_REALTIME domain
    source: StampSource


@dataclass(frozen=True)
class TimestampingConfig:
    hardware_rx: bool
    hardware_tx: bool
    software_rx: bool
    software_tx: bool
    phc_index: int | None
    flags: int  # the SOF_TIMESTAMPING_* value set on the socket

    @property
    def raw_hardware(self) -> bool:
        """The socket reports raw hardware stamps (hardware RX or TX was planned). A hardware RX
        stamp that arrives is then used even when the granted filter does not promise one (a
        driver stamping more than it says, or ptp4l's filter matching our packets)."""
        return bool(self.flags & SOF_TIMESTAMPING_RAW_HARDWARE) and self.phc_index is not None


# ---- ancillary buffer ----------------------------------------------------------------------

_SCM_TS64 = struct.Struct("=qqqqqq")  # 3 x struct timespec, 64-bit
_SCM_TS32 = struct.Struct("=iiiiii")  # 3 x struct old_timespec32 (32-bit ABIs, SO_TIMESTAMPING_OLD)
_EXT_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err, 16 bytes
_INT = struct.Struct("=i")
_LP64 = struct.calcsize("l") == 8  # 64-bit ABI: SO_TIMESTAMPING_OLD carries 64-bit timespecs

ANCILLARY_BUFSIZE: int = (
    socket.CMSG_SPACE(_SCM_TS64.size)      # SCM_TIMESTAMPING
    + socket.CMSG_SPACE(8)                 # SCM_TIMESTAMPING_PKTINFO
    + socket.CMSG_SPACE(16)                # SCM_TIMESTAMPNS, if someone also set SO_TIMESTAMPNS
    + socket.CMSG_SPACE(_EXT_ERR.size + 28)  # sock_extended_err + offender sockaddr_in6
    + socket.CMSG_SPACE(20)                # IP_PKTINFO / IPV6_PKTINFO (OPT_CMSG)
    + socket.CMSG_SPACE(_INT.size)         # IP_TTL / IPV6_HOPLIMIT
    + 64                                   # slack for a cmsg we did not ask for
)

_NS = 1_000_000_000


def _timespec_ns(sec: int, nsec: int) -> int | None:
    if sec <= 0 and nsec <= 0:
        return None  # an unset slot
    if sec < 0 or not 0 <= nsec < _NS:
        return None  # not a timestamp: garbage or a truncated cmsg
    return sec * _NS + nsec


def decode_scm_timestamping(data: bytes, cmsg_type: int = SCM_TIMESTAMPING) -> tuple[int | None, int | None]:
    """struct scm_timestamping -> (software ns, raw hardware ns); ts[1] (legacy) is ignored."""
    if cmsg_type == SCM_TIMESTAMPING_NEW or len(data) >= _SCM_TS64.size:
        if len(data) < _SCM_TS64.size:
            return None, None
        s0, n0, _s1, _n1, s2, n2 = _SCM_TS64.unpack_from(data)
    elif len(data) >= _SCM_TS32.size and not _LP64:
        s0, n0, _s1, _n1, s2, n2 = _SCM_TS32.unpack_from(data)
    else:
        return None, None
    return _timespec_ns(s0, n0), _timespec_ns(s2, n2)


def _bytes(data: object) -> bytes | None:
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else None


# ---- PHC -> CLOCK_REALTIME -----------------------------------------------------------------

# linux/ptp_clock.h ioctls, generic _IOC encoding: dir << 30 | size << 16 | type << 8 | nr
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("=") << 8) | nr


PTP_MAX_SAMPLES = 25
_PTP_TIME = struct.Struct("=qII")  # struct ptp_clock_time: s64 sec, u32 nsec, u32 reserved
PTP_SYS_OFFSET = _ioc(_IOC_WRITE, 5, 16 + (2 * PTP_MAX_SAMPLES + 1) * 16)
PTP_SYS_OFFSET_PRECISE = _ioc(_IOC_READ | _IOC_WRITE, 8, 3 * 16 + 16)
PTP_SYS_OFFSET_EXTENDED = _ioc(_IOC_READ | _IOC_WRITE, 9, 16 + PTP_MAX_SAMPLES * 3 * 16)


# A free-running oscillator is within ±100 ppm of nominal; two samples further apart than
# this in rate saw a step, not drift.
MAX_PHC_DRIFT = 500e-6
# ... and within this of CLOCK_REALTIME's rate: the drift assumed before it is measured.
FREE_RUN_DRIFT = 100e-6


def _ptp_ns(buf: bytes | bytearray, off: int) -> int:
    sec, nsec, _ = _PTP_TIME.unpack_from(buf, off)
    return sec * _NS + nsec


class PhcClock:
    """Maps a PHC's time to CLOCK_REALTIME: offset + drift from two recent samples.

    Samples are taken lazily when a stamp is more than ``refresh_ns`` past the last one,
    so there is no syscall per packet. ``uncertainty_ns`` is half the narrowest
    read window (or 0 for a precise cross-timestamp).
    """

    def __init__(self, index: int, refresh_ns: int = _NS, samples: int = 5, *,
                 fd: int | None = None, ioctl=fcntl.ioctl) -> None:
        if not _ioc_ok():
            raise UnsupportedArchitecture(f"PTP ioctl encoding differs on {_machine()}")
        self.index = index
        self.refresh_ns = refresh_ns
        self.samples = max(1, min(samples, PTP_MAX_SAMPLES))
        self.method = ""
        self.uncertainty_ns = 0
        self._ioctl = ioctl  # injectable for tests: no PHC on a CI host
        self._fd = os.open(f"/dev/ptp{index}", os.O_RDONLY | os.O_CLOEXEC) if fd is None else fd
        self._lock = threading.Lock()
        self._prev: tuple[int, int] | None = None  # (phc ns, offset ns)
        self._last: tuple[int, int] = self._measure()
        self._measured_at = time.monotonic_ns()
        self._slope = 0.0
        self._prev_uncertainty_ns: int | None = None  # of the sample the slope was taken from
        self.steps = 0  # clock steps seen (not drift): each restarts the drift estimate
        self.publish = False  # phc_clock(): put conversion_error_ns into the Error Estimate (clock.py)

    def close(self) -> None:
        os.close(self._fd)

    def _measure(self) -> tuple[int, int]:
        """-> (phc ns, offset = phc - realtime ns)."""
        try:
            buf = bytearray(PTP_SYS_OFFSET_PRECISE >> 16 & 0x3FFF)
            self._ioctl(self._fd, PTP_SYS_OFFSET_PRECISE, buf)
            dev, rt = _ptp_ns(buf, 0), _ptp_ns(buf, 16)
            self.method, self.uncertainty_ns = "precise", 0
            return dev, dev - rt
        except OSError:
            pass
        try:
            buf = bytearray(PTP_SYS_OFFSET_EXTENDED >> 16 & 0x3FFF)
            struct.pack_into("=I", buf, 0, self.samples)  # clockid 0 = CLOCK_REALTIME
            self._ioctl(self._fd, PTP_SYS_OFFSET_EXTENDED, buf)
            triples = [(_ptp_ns(buf, 16 + i * 48), _ptp_ns(buf, 32 + i * 48), _ptp_ns(buf, 48 + i * 48))
                       for i in range(self.samples)]
            self.method = "extended"
        except OSError:
            buf = bytearray(PTP_SYS_OFFSET >> 16 & 0x3FFF)
            struct.pack_into("=I", buf, 0, self.samples)
            self._ioctl(self._fd, PTP_SYS_OFFSET, buf)
            ts = [_ptp_ns(buf, 16 + i * 16) for i in range(2 * self.samples + 1)]
            triples = [(ts[2 * i], ts[2 * i + 1], ts[2 * i + 2]) for i in range(self.samples)]
            self.method = "sys_offset"
        pre, phc, post = min(triples, key=lambda t: t[2] - t[0])  # narrowest window wins
        self.uncertainty_ns = (post - pre) // 2
        return phc, phc - (pre + post) // 2

    def refresh(self) -> None:
        with self._lock:
            prev_u = self.uncertainty_ns
            phc, off = self._measure()
            self._measured_at = time.monotonic_ns()
            lphc, loff = self._last
            if abs(off - loff) > MAX_PHC_DRIFT * max(phc - lphc, self.refresh_ns) + 2 * self.uncertainty_ns:
                # Not drift: someone stepped one of the clocks, either way (an igb reset sets
                # the PHC to CLOCK_REALTIME; phc_ctl/ptp4l step it). Start over from this sample.
                self.steps += 1
                log.info("PHC %d: step of %.6f s against CLOCK_REALTIME; drift estimate reset",
                         self.index, (off - loff) / 1e9)
                self._slope, self._prev, self._last = 0.0, None, (phc, off)
                self._prev_uncertainty_ns = None
            elif phc - lphc > self.refresh_ns // 10:
                self._slope = (off - loff) / (phc - lphc)
                self._prev, self._last = self._last, (phc, off)
                self._prev_uncertainty_ns = prev_u
            else:
                self._last = (phc, off)
            if self.publish:
                set_conversion_error(self.index, self.conversion_error_ns)

    @property
    def conversion_error_ns(self) -> int:
        """A bound on the error of :meth:`to_realtime` until the next refresh, for the Error Estimate.

        The offset sample is off by at most its half window (``uncertainty_ns``; 0 for a
        precise cross-timestamp). The drift is the slope between two samples Δ apart, each off
        by its half window, extrapolated at most ``refresh_ns`` past the last one: its error
        adds (u_last + u_prev) × refresh / Δ. Before two samples (start, after a step) the drift
        is unknown: a free-running oscillator's ±FREE_RUN_DRIFT over ``refresh_ns`` instead."""
        u = self.uncertainty_ns
        if self._prev is None or self._prev_uncertainty_ns is None:
            return u + round(FREE_RUN_DRIFT * self.refresh_ns)
        span = max(self._last[0] - self._prev[0], 1)
        return u + -(-(u + self._prev_uncertainty_ns) * self.refresh_ns // span)

    @property
    def offset_ns(self) -> int:
        """PHC minus CLOCK_REALTIME at the last sample (37 s on a TAI PHC, ~0 under phc2sys)."""
        return self._last[1]

    def to_realtime(self, phc_ns: int) -> int:
        lphc, _ = self._last
        # Refresh when the stamp is far from the last sample either way (a PHC stepped
        # backwards must not freeze the relation) or the sample is old.
        if abs(phc_ns - lphc) > self.refresh_ns or time.monotonic_ns() - self._measured_at > self.refresh_ns:
            try:
                self.refresh()
            except OSError as e:  # keep extrapolating; the error estimate should grow, not the agent die
                log.warning("PHC %d read failed: %s", self.index, e)
        lphc, loff = self._last
        return phc_ns - (loff + round(self._slope * (phc_ns - lphc)))


_PHCS: dict[int, PhcClock] = {}
_PHC_LOCK = threading.Lock()


def phc_clock(index: int) -> PhcClock:
    """The PHC this process converts hardware stamps with; its conversion error bound goes
    into the Error Estimate we send (agent.engine.clock.conversion_error_s)."""
    with _PHC_LOCK:
        if index not in _PHCS:
            phc = PhcClock(index)
            phc.publish = True
            set_conversion_error(index, phc.conversion_error_ns)
            _PHCS[index] = phc
        return _PHCS[index]


def _phc_for(config: TimestampingConfig | None) -> PhcClock | None:
    if config is not None:
        return _PHCS.get(config.phc_index) if config.phc_index is not None else None
    if len(_PHCS) == 1:  # the usual agent: one measurement interface
        return next(iter(_PHCS.values()))
    return None


# ---- enabling ------------------------------------------------------------------------------


def _hardware_plan(iface: str, configure_nic: bool) -> tuple[bool, bool, int | None]:
    """Decide hardware RX/TX without clobbering a configuration someone else set."""
    from agent.engine import ethtool

    info = ethtool.ts_info(iface)
    if info.phc_index < 0 or not info.supports(SOF_TIMESTAMPING_RAW_HARDWARE):
        return False, False, None
    cur = ethtool.get_hwtstamp(iface)
    if cur is None:
        log.info("%s: driver does not report its hwtstamp config; not touching it, software stamps", iface)
        return False, False, None
    if cur.is_off and configure_nic:
        before = cur
        cur = _configure_nic(iface, info)
        if not cur.is_off:
            _NIC_CHANGED.setdefault(iface, before)
            _NIC_APPLIED[iface] = cur
    elif not cur.is_off and _NIC_APPLIED.get(iface) != cur and iface not in _KEPT_LOGGED:
        _KEPT_LOGGED.add(iface)  # once per NIC: the agent opens a socket per cycle
        log.info("%s: keeping the existing hwtstamp config %s (ptp4l/chrony?)", iface, cur.to_dict())
    # PTP/NTP-only filters do not stamp our UDP packets: those get software stamps.
    hw_rx = cur.rx_filter in (ethtool.HWTSTAMP_FILTER_ALL, ethtool.HWTSTAMP_FILTER_SOME)
    hw_tx = cur.tx_type != ethtool.HWTSTAMP_TX_OFF
    if not (hw_rx or hw_tx):
        return False, False, None
    try:
        phc_clock(info.phc_index)
    except OSError as e:
        log.warning("%s: cannot read /dev/ptp%d (%s): hardware stamps cannot be related to "
                    "CLOCK_REALTIME; using software stamps", iface, info.phc_index, e)
        return False, False, None
    return hw_rx, hw_tx, info.phc_index


_NIC_CHANGED: dict[str, object] = {}  # iface -> the hwtstamp_config we found (always "off")
_NIC_APPLIED: dict[str, object] = {}  # iface -> the hwtstamp_config the driver applied for us
_KEPT_LOGGED: set[str] = set()  # NICs whose foreign config we said we keep


@dataclass(frozen=True)
class NicStampPlan:
    """What SIOCSHWTSTAMP gave us on one NIC (for doctor, logs and metrics)."""

    iface: str
    asked: tuple[str, ...]  # RX filters tried, in order
    refused: tuple[str, ...]  # ... and those the driver refused (ERANGE/EINVAL)
    granted_rx_filter: str  # what the driver applied
    tx: str
    hardware_rx: bool  # the granted filter stamps our UDP packets (all, or a driver's widening)
    hardware_tx: bool


NIC_PLANS: dict[str, NicStampPlan] = {}  # iface -> the last plan _configure_nic made

# The RX filters we ask for, best first. ALL stamps every packet. NTP_ALL (Linux 4.13)
# exists for NTP's UDP; some drivers implement it by stamping everything and answer
# ALL, so it is worth asking. PTP-only filters never stamp our UDP: not asked.
_RX_FILTER_ORDER = ("all", "ntp-all")


def _configure_nic(iface: str, info: object) -> object:
    """Ask for TX on + RX ALL, else NTP_ALL, else TX only (software RX, hardware TX).

    Never called over a config someone else set (see _hardware_plan)."""
    from agent.engine import ethtool

    want_tx = ethtool.HWTSTAMP_TX_ON if info.tx_types & (1 << ethtool.HWTSTAMP_TX_ON) else 0  # type: ignore[attr-defined]
    by_name = {v: k for k, v in ethtool.RX_FILTER_NAMES.items()}
    refused: list[str] = []
    cur = None
    for name in _RX_FILTER_ORDER:
        try:
            cur = ethtool.set_hwtstamp(iface, ethtool.HwTstampConfig(0, want_tx, by_name[name]))
            break
        except OSError as e:
            if e.errno not in (errno.ERANGE, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            refused.append(name)
    if cur is None:
        cur = ethtool.set_hwtstamp(iface, ethtool.HwTstampConfig(0, want_tx, ethtool.HWTSTAMP_FILTER_NONE)) \
            if want_tx else ethtool.HwTstampConfig(0, 0, 0)
    hw_rx = cur.rx_filter in (ethtool.HWTSTAMP_FILTER_ALL, ethtool.HWTSTAMP_FILTER_SOME)
    hw_tx = cur.tx_type != ethtool.HWTSTAMP_TX_OFF
    plan = NicStampPlan(iface, _RX_FILTER_ORDER, tuple(refused),
                        ethtool.RX_FILTER_NAMES.get(cur.rx_filter, str(cur.rx_filter)),
                        ethtool.TX_TYPE_NAMES.get(cur.tx_type, str(cur.tx_type)), hw_rx, hw_tx)
    NIC_PLANS[iface] = plan
    if not hw_rx:
        STAMP_COUNTERS.hw_rx_refused += 1
        log.warning("%s: the driver refused RX filter%s %s (it offers: %s): software RX stamps%s",
                    iface, "s" if len(refused) > 1 else "", " and ".join(refused) or "-",
                    " ".join(info.rx_filter_names) or "none",  # type: ignore[attr-defined]
                    ", hardware TX stamps" if hw_tx else "")
    else:
        log.info("%s: hardware stamping enabled: %s", iface, cur.to_dict())
    return cur


def configure_nic(iface: str) -> NicStampPlan | None:
    """Switch ``iface``'s hardware stamping on (TX on; RX all, else ntp-all, else none) if it
    is entirely off; the explicit opt-in of ``xwamp ping --iface`` and the agent. Returns
    the plan, or None when the NIC has no PHC or someone else's config is in place."""
    _hardware_plan(iface, configure_nic=True)
    return NIC_PLANS.get(iface)


def hardware_opt_in(iface: str | None) -> bool:
    """The explicit opt-in of ``--iface`` and the agent's ``iface`` keys: switch the NIC's
    stamping on (:func:`configure_nic`) once per process, keeping someone else's config. Never
    raises: a NIC that cannot be configured leaves software stamps, said in the log. Returns
    whether the caller should ask for hardware stamps on its sockets (``iface`` given)."""
    if not iface:
        return False
    if iface in _OPTED_IN:
        return True  # decided already (another session of this process opted in)
    _OPTED_IN.add(iface)
    try:
        configure_nic(iface)
    except (OSError, ValueError, UnsupportedArchitecture) as e:
        log.warning("%s: cannot configure hardware stamping (%s): software stamps", iface, e)
    return True


_OPTED_IN: set[str] = set()


def restore_nic_configs(keep: Iterable[str] = ()) -> list[str]:
    """Put back the hwtstamp configs enable_timestamping(configure_nic=True) changed, unless
    someone (ptp4l) has changed them since; call at shutdown, or with ``keep`` (the ifaces the
    configuration still names) after an agent reload. Returns the ifaces restored."""
    from agent.engine import ethtool

    kept = set(keep)
    done = []
    for iface, before in list(_NIC_CHANGED.items()):
        if iface in kept:
            continue
        try:
            cur = ethtool.get_hwtstamp(iface)
            applied = _NIC_APPLIED.pop(iface, None)
            ours = (cur == applied) if applied is not None else (
                cur is not None and cur.rx_filter in (ethtool.HWTSTAMP_FILTER_ALL, ethtool.HWTSTAMP_FILTER_SOME))
            # Still ours (e.g. TX on, RX none after a refused filter): put it back; else ptp4l took over.
            if cur is not None and ours and cur.tx_type in (ethtool.HWTSTAMP_TX_OFF, ethtool.HWTSTAMP_TX_ON):
                ethtool.set_hwtstamp(iface, before)  # type: ignore[arg-type]
                done.append(iface)
        except (OSError, ValueError) as e:
            log.warning("%s: could not restore hwtstamp config: %s", iface, e)
        del _NIC_CHANGED[iface]
    _OPTED_IN.intersection_update(kept)  # named again later: opted in (and configured) afresh
    return done


def enable_timestamping(sock: socket.socket, iface: str | None = None, hardware: bool = True,
                        *, configure_nic: bool = False) -> TimestampingConfig:
    """Enable RX and TX timestamps on ``sock``; hardware where ``iface`` stamps our packets.

    ``configure_nic=True`` is the explicit opt-in to set the NIC to TX on / RX filter ALL,
    and only when its current config is entirely off (never over ptp4l/chrony).
    Software RX/TX are always requested too: they are the per-packet fallback.
    """
    _require_supported_arch()
    hw_rx = hw_tx = False
    phc_index: int | None = None
    if hardware and iface:
        try:
            hw_rx, hw_tx, phc_index = _hardware_plan(iface, configure_nic)
        except OSError as e:
            log.info("%s: no hardware timestamping (%s)", iface, e)
    flags = SOF_SOFTWARE | SOF_OPTIONS
    if hw_rx or hw_tx:
        flags |= SOF_TIMESTAMPING_RAW_HARDWARE | SOF_TIMESTAMPING_OPT_PKTINFO
        flags |= SOF_TIMESTAMPING_RX_HARDWARE if hw_rx else 0
        flags |= SOF_TIMESTAMPING_TX_HARDWARE if hw_tx else 0
    # 32-bit ABIs: the _NEW option gets 64-bit timespecs (y2038-safe); decoders take both.
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING if _LP64 else SO_TIMESTAMPING_NEW, flags)
    return TimestampingConfig(hw_rx, hw_tx, True, True, phc_index, flags)


def enable_recv_ttl(sock: socket.socket) -> None:
    """Ask for the received TTL (IPv4) / hop limit (IPv6) as a cmsg on every recvmsg."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVHOPLIMIT, 1)
        try:  # v4-mapped peers on a dual-stack socket report IP_TTL
            sock.setsockopt(SOL_IP, IP_RECVTTL, 1)
        except OSError:
            pass
    else:
        sock.setsockopt(SOL_IP, IP_RECVTTL, 1)


def rx_ttl(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The received TTL / hop limit from a recvmsg's ancillary data (after enable_recv_ttl)."""
    try:
        items = list(ancdata)
    except TypeError:
        return None
    for item in items:
        try:
            level, ctype, data = item
        except (TypeError, ValueError):
            continue
        if (level, ctype) in ((SOL_IP, IP_TTL), (SOL_IPV6, IPV6_HOPLIMIT)):
            raw = _bytes(data)
            if raw is not None and len(raw) >= _INT.size:
                v = _INT.unpack_from(raw)[0]
                if 0 <= v <= 255:
                    return v
            elif raw is not None and len(raw) == 1:  # some stacks send a single byte
                return raw[0]
    return None


# ---- decoding ------------------------------------------------------------------------------


def _hw_wanted(direction: str, config: TimestampingConfig | None) -> bool:
    if config is None:
        return bool(_PHCS)
    return config.hardware_rx if direction == "rx" else config.hardware_tx


def _choose(sw: int | None, hw: int | None, direction: str, config: TimestampingConfig | None,
            counters: StampCounters) -> Stamp | None:
    # Counters are bumped directly (no lock, no getattr): this runs per packet.
    rx = direction == "rx"
    if hw is not None:
        phc = _phc_for(config)
        if phc is not None:
            if rx:
                counters.rx_hw += 1
            else:
                counters.tx_hw += 1
            return Stamp(phc.to_realtime(hw), _HW)
        counters.phc_unconverted += 1
    if sw is not None:
        if (config is not None or _PHCS) and _hw_wanted(direction, config):
            counters.hw_fallback += 1
        if rx:
            counters.rx_sw += 1
        else:
            counters.tx_sw += 1
        return Stamp(sw, _SW)
    return None


_SOL_SOCKET = socket.SOL_SOCKET
_HW, _SW = StampSource.HW, StampSource.SW  # enum attribute lookups cost ~0.5 µs each
_TS_TYPES = (SCM_TIMESTAMPING, SCM_TIMESTAMPING_NEW)
_RECVERR = ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR))
_unpack_ts64 = _SCM_TS64.unpack_from
_unpack_ext_err = _EXT_ERR.unpack_from


def _rx_fast(ancdata: list) -> tuple[int | None, int | None]:
    """The common case: a list of (int, int, bytes) straight from recvmsg on a 64-bit ABI.
    Anything unexpected raises, and the caller redoes the work carefully."""
    sw = hw = None
    for level, ctype, data in ancdata:
        if level == _SOL_SOCKET and (ctype == SCM_TIMESTAMPING or ctype == SCM_TIMESTAMPING_NEW):
            if type(data) is not bytes or len(data) < 48:
                raise ValueError
            s0, n0, _s1, _n1, s2, n2 = _unpack_ts64(data)
            # inlined _timespec_ns: a set slot has sec > 0 and a valid nsec
            if s0 > 0 and 0 <= n0 < _NS:
                sw = s0 * _NS + n0
            elif s0 or n0:
                raise ValueError  # odd values: the careful path decides
            if s2 > 0 and 0 <= n2 < _NS:
                hw = s2 * _NS + n2
            elif s2 or n2:
                raise ValueError
        elif level == _SOL_SOCKET and ctype == SCM_TIMESTAMPNS:
            raise ValueError  # rare: let the careful path handle it
    return sw, hw


def _rx_careful(ancdata: object) -> tuple[int | None, int | None]:
    sw = hw = None
    try:
        items = list(ancdata)  # type: ignore[call-overload]
    except TypeError:
        return None, None
    for item in items:
        try:
            level, ctype, data = item
        except (TypeError, ValueError):
            continue
        if level != _SOL_SOCKET:
            continue
        raw = _bytes(data)
        if raw is None:
            continue
        if ctype in _TS_TYPES:
            s, h = decode_scm_timestamping(raw, ctype)
            sw, hw = s if s is not None else sw, h if h is not None else hw
        elif ctype == SCM_TIMESTAMPNS and sw is None and len(raw) >= 16:
            sw = _timespec_ns(*struct.unpack_from("=qq", raw))
    return sw, hw


def rx_stamp(ancdata: list[tuple[int, int, bytes]], *, config: TimestampingConfig | None = None,
             counters: StampCounters = STAMP_COUNTERS) -> Stamp | None:
    """The kernel RX stamp of one recvmsg: hardware (PHC→REALTIME) if present, else software.

    None when there is none (the caller stamps in user space: :func:`user_stamp`).
    Never raises on malformed ancillary data.
    """
    if _LP64:
        try:
            sw, hw = _rx_fast(ancdata)
        except (TypeError, ValueError):
            sw, hw = _rx_careful(ancdata)
    else:
        sw, hw = _rx_careful(ancdata)
    return _choose(sw, hw, "rx", config, counters)


def decode_tx_message(ancdata: list[tuple[int, int, bytes]], *, config: TimestampingConfig | None = None,
                      counters: StampCounters = STAMP_COUNTERS) -> tuple[int, Stamp] | None:
    """One MSG_ERRQUEUE message -> (OPT_ID key, stamp); None if it is not a TX send stamp."""
    key: int | None = None
    sw = hw = None
    try:
        items = list(ancdata)
    except TypeError:
        return None
    for item in items:
        try:
            level, ctype, data = item
        except (TypeError, ValueError):
            continue
        raw = data if type(data) is bytes else _bytes(data)
        if raw is None:
            continue
        try:
            is_err = (level, ctype) in _RECVERR
        except TypeError:
            continue
        if is_err:
            if len(raw) >= _EXT_ERR.size:
                ee_errno, origin, _type, _code, _pad, info, data_ = _unpack_ext_err(raw)
                if ee_errno == errno.ENOMSG and origin == SO_EE_ORIGIN_TIMESTAMPING and info == SCM_TSTAMP_SND:
                    key = data_
        elif level == _SOL_SOCKET and ctype in _TS_TYPES:
            sw, hw = decode_scm_timestamping(raw, ctype)
    if key is None:
        return None
    stamp = _choose(sw, hw, "tx", config, counters)
    return None if stamp is None else (key, stamp)


_ERRQ_FLAGS = socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT


def drain_tx_stamps(sock: socket.socket, *, config: TimestampingConfig | None = None,
                    counters: StampCounters = STAMP_COUNTERS, limit: int = 4096) -> list[tuple[int, Stamp]]:
    """Read MSG_ERRQUEUE until EAGAIN (non-blocking); returns [(OPT_ID key, stamp)].

    Works on blocking, non-blocking and timeout sockets alike: CPython polls *before*
    recvmsg on a socket with a timeout, so MSG_DONTWAIT alone would wait out the
    timeout on an empty queue; such sockets are switched to timeout 0 meanwhile.
    Not for a socket another thread is using at the same moment.
    """
    out: list[tuple[int, Stamp]] = []
    t = sock.gettimeout()
    if t:
        sock.settimeout(0)
    try:
        recvmsg = sock.recvmsg
        for _ in range(limit):
            try:
                _data, anc, _flags, _addr = recvmsg(64, ANCILLARY_BUFSIZE, _ERRQ_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            got = decode_tx_message(anc, config=config, counters=counters)
            if got is not None:
                out.append(got)
    finally:
        if t:
            sock.settimeout(t)
    return out


def user_stamp(direction: str = "rx", ns: int | None = None, counters: StampCounters = STAMP_COUNTERS) -> Stamp:
    """A user-space CLOCK_REALTIME stamp, counted as a fallback for ``direction`` ('rx'/'tx').

    For TX, pass the time recorded just before sendmsg as ``ns`` when a packet's
    OPT_ID key never shows up on the error queue (a driver may drop a hardware TX stamp).
    """
    counters.add(direction, "user")
    return Stamp(time.time_ns() if ns is None else ns, StampSource.USER)


def drain_socket(sock: socket.socket, bufsize: int = 2048, max_packets: int = 256, *,
                 config: TimestampingConfig | None = None, counters: StampCounters = STAMP_COUNTERS,
                 ) -> tuple[list[tuple[bytes, list[tuple[int, int, bytes]], int, object]], list[tuple[int, Stamp]]]:
    """For an asyncio add_reader callback: empty the normal queue (up to ``max_packets``)
    and the error queue, so an EPOLLERR-readable socket never spins the loop.

    Returns (recvmsg results, TX stamps). Decode RX stamps with :func:`rx_stamp`.
    """
    packets = []
    t = sock.gettimeout()
    if t:
        sock.settimeout(0)  # see drain_tx_stamps
    try:
        for _ in range(max_packets):
            try:
                packets.append(sock.recvmsg(bufsize, ANCILLARY_BUFSIZE, socket.MSG_DONTWAIT))
            except (BlockingIOError, InterruptedError):
                break
    finally:
        if t:
            sock.settimeout(t)
    return packets, drain_tx_stamps(sock, config=config, counters=counters)
