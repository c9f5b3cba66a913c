"""Interface timestamping capabilities and hardware-stamp configuration via ioctls.

* ETHTOOL_GET_TS_INFO over SIOCETHTOOL (struct ethtool_ts_info): what the driver
  can stamp, its PHC index, supported TX types and RX filters. Unprivileged.
* SIOCGHWTSTAMP / SIOCSHWTSTAMP (struct hwtstamp_config): the NIC's current
  hardware-stamp configuration. Setting it needs CAP_NET_ADMIN and is shared
  with ptp4l/chrony, so agent.engine.timestamping only sets it when it is off.

Facts from include/uapi/linux/ethtool.h, net_tstamp.h, sockios.h. The SIOC*
numbers are the same on every Linux architecture.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import socket
import struct
from dataclasses import dataclass

SIOCETHTOOL = 0x8946
SIOCSHWTSTAMP = 0x89B0
SIOCGHWTSTAMP = 0x89B1
ETHTOOL_GET_TS_INFO = 0x00000041
IFNAMSIZ = 16

# include/uapi/linux/net_tstamp.h: enum hwtstamp_tx_types
HWTSTAMP_TX_OFF = 0
HWTSTAMP_TX_ON = 1
HWTSTAMP_TX_ONESTEP_SYNC = 2
HWTSTAMP_TX_ONESTEP_P2P = 3
TX_TYPE_NAMES = {0: "off", 1: "on", 2: "onestep-sync", 3: "onestep-p2p"}

# enum hwtstamp_rx_filters
HWTSTAMP_FILTER_NONE = 0
HWTSTAMP_FILTER_ALL = 1
HWTSTAMP_FILTER_SOME = 2
HWTSTAMP_FILTER_NTP_ALL = 15
RX_FILTER_NAMES = {
    0: "none", 1: "all", 2: "some",
    3: "ptpv1-l4-event", 4: "ptpv1-l4-sync", 5: "ptpv1-l4-delay-req",
    6: "ptpv2-l4-event", 7: "ptpv2-l4-sync", 8: "ptpv2-l4-delay-req",
    9: "ptpv2-l2-event", 10: "ptpv2-l2-sync", 11: "ptpv2-l2-delay-req",
    12: "ptpv2-event", 13: "ptpv2-sync", 14: "ptpv2-delay-req", 15: "ntp-all",
}

# SOF_TIMESTAMPING_* bit names, bit i = 1 << i (net_tstamp.h)
SOF_NAMES = (
    "hardware-transmit", "software-transmit", "hardware-receive", "software-receive",
    "software-system-clock", "hardware-legacy-clock", "hardware-raw-clock", "option-id",
    "tx-scheduler", "tx-ack", "option-cmsg", "option-tsonly", "option-stats",
    "option-pktinfo", "option-tx-swhw", "bind-phc", "option-id-tcp", "option-rx-filter",
)

_TS_INFO = struct.Struct("=IIiI3II3I")  # 44 bytes
_HWTSTAMP = struct.Struct("=iii")  # flags, tx_type, rx_filter


def _bit_names(mask: int, names: dict[int, str] | tuple[str, ...]) -> list[str]:
    lookup = dict(enumerate(names)) if isinstance(names, tuple) else names
    return [lookup.get(i, f"bit{i}") for i in range(32) if mask & (1 << i)]


@dataclass(frozen=True, slots=True)
class TsInfo:
    """struct ethtool_ts_info."""

    so_timestamping: int  # SOF_TIMESTAMPING_* the driver supports
    phc_index: int  # -1: no PTP hardware clock
    tx_types: int  # bitmask of 1 << HWTSTAMP_TX_*
    rx_filters: int  # bitmask of 1 << HWTSTAMP_FILTER_*

    SIZE = _TS_INFO.size

    @classmethod
    def from_bytes(cls, b: bytes | bytearray | memoryview) -> "TsInfo":
        if len(b) < _TS_INFO.size:
            raise ValueError(f"ethtool_ts_info needs {_TS_INFO.size} bytes, got {len(b)}")
        cmd, sot, phc, txt, _r0, _r1, _r2, rxf, _r3, _r4, _r5 = _TS_INFO.unpack_from(b)
        if cmd != ETHTOOL_GET_TS_INFO:
            raise ValueError(f"not an ETHTOOL_GET_TS_INFO reply (cmd {cmd:#x})")
        return cls(sot, phc, txt, rxf)

    def to_bytes(self) -> bytes:
        return _TS_INFO.pack(ETHTOOL_GET_TS_INFO, self.so_timestamping, self.phc_index,
                             self.tx_types, 0, 0, 0, self.rx_filters, 0, 0, 0)

    @property
    def capabilities(self) -> list[str]:
        return _bit_names(self.so_timestamping, SOF_NAMES)

    @property
    def tx_type_names(self) -> list[str]:
        return _bit_names(self.tx_types, TX_TYPE_NAMES)

    @property
    def rx_filter_names(self) -> list[str]:
        return _bit_names(self.rx_filters, RX_FILTER_NAMES)

    def supports(self, sof_bits: int) -> bool:
        return self.so_timestamping & sof_bits == sof_bits

    def to_dict(self) -> dict:
        return {
            "capabilities": self.capabilities,
            "so_timestamping": self.so_timestamping,
            "phc_index": self.phc_index if self.phc_index >= 0 else None,
            "tx_types": self.tx_type_names,
            "rx_filters": self.rx_filter_names,
        }


@dataclass(frozen=True, slots=True)
class HwTstampConfig:
    """struct hwtstamp_config."""

    flags: int
    tx_type: int
    rx_filter: int

    @classmethod
    def from_bytes(cls, b: bytes | bytearray | memoryview) -> "HwTstampConfig":
        if len(b) < _HWTSTAMP.size:
            raise ValueError("hwtstamp_config needs 12 bytes")
        return cls(*_HWTSTAMP.unpack_from(b))

    def to_bytes(self) -> bytes:
        return _HWTSTAMP.pack(self.flags, self.tx_type, self.rx_filter)

    @property
    def is_off(self) -> bool:
        return self.tx_type == HWTSTAMP_TX_OFF and self.rx_filter == HWTSTAMP_FILTER_NONE

    def to_dict(self) -> dict:
        return {
            "flags": self.flags,
            "tx_type": TX_TYPE_NAMES.get(self.tx_type, str(self.tx_type)),
            "rx_filter": RX_FILTER_NAMES.get(self.rx_filter, str(self.rx_filter)),
        }


def _ifreq_ioctl(iface: str, request: int, payload: bytes) -> bytes:
    """ioctl with a struct ifreq whose ifr_data points at ``payload``; returns the payload after the call."""
    name = iface.encode()
    if not name or len(name) >= IFNAMSIZ or b"\0" in name or b"/" in name:
        raise ValueError(f"invalid interface name {iface!r}")
    buf = ctypes.create_string_buffer(payload, len(payload))
    # struct ifreq: 16-byte name, then a union whose first pointer-sized member is ifr_data.
    ifr = struct.pack(f"{IFNAMSIZ}sP", name, ctypes.addressof(buf)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), request, ifr)
    return buf.raw


def ts_info(iface: str) -> TsInfo:
    req = TsInfo(0, 0, 0, 0).to_bytes()
    return TsInfo.from_bytes(_ifreq_ioctl(iface, SIOCETHTOOL, req))


def get_hwtstamp(iface: str) -> HwTstampConfig | None:
    """The NIC's current config; None when the driver has no hardware stamping (EOPNOTSUPP/EINVAL)."""
    try:
        return HwTstampConfig.from_bytes(_ifreq_ioctl(iface, SIOCGHWTSTAMP, bytes(_HWTSTAMP.size)))
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
            return None
        raise


def set_hwtstamp(iface: str, cfg: HwTstampConfig) -> HwTstampConfig:
    """SIOCSHWTSTAMP; returns what the driver actually applied (it may widen the RX filter)."""
    return HwTstampConfig.from_bytes(_ifreq_ioctl(iface, SIOCSHWTSTAMP, cfg.to_bytes()))
