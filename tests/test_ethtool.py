"""ethtool ts-info / hwtstamp_config decoding on crafted struct bytes, and the live ioctl on lo."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.engine import ethtool
from agent.engine import timestamping as ts


def crafted_ts_info(sot: int, phc: int, tx: int, rx: int) -> bytes:
    # struct ethtool_ts_info: cmd, so_timestamping, phc_index, tx_types, tx_reserved[3], rx_filters, rx_reserved[3]
    return struct.pack("=IIiI3II3I", 0x41, sot, phc, tx, 0, 0, 0, rx, 0, 0, 0)


def test_ts_info_of_a_ptp_nic():
    sot = ts.SOF_HARDWARE | ts.SOF_SOFTWARE
    info = ethtool.TsInfo.from_bytes(crafted_ts_info(sot, 2, 0b11, (1 << 0) | (1 << 1) | (1 << 12)))
    assert info.phc_index == 2
    assert info.supports(ts.SOF_TIMESTAMPING_RAW_HARDWARE | ts.SOF_TIMESTAMPING_RX_HARDWARE)
    assert info.capabilities == ["hardware-transmit", "software-transmit", "hardware-receive", "software-receive",
                                 "software-system-clock", "hardware-raw-clock"]
    assert info.tx_type_names == ["off", "on"]
    assert info.rx_filter_names == ["none", "all", "ptpv2-event"]
    d = info.to_dict()
    assert d["phc_index"] == 2 and d["rx_filters"][1] == "all"
    assert ethtool.TsInfo.from_bytes(info.to_bytes()) == info


def test_ts_info_without_phc_and_errors():
    info = ethtool.TsInfo.from_bytes(crafted_ts_info(ts.SOF_SOFTWARE, -1, 0, 0))
    assert info.to_dict()["phc_index"] is None and info.tx_type_names == []
    with pytest.raises(ValueError):
        ethtool.TsInfo.from_bytes(b"\x41\0\0\0")
    with pytest.raises(ValueError):
        ethtool.TsInfo.from_bytes(struct.pack("=I", 0x42) + bytes(40))


@given(st.binary(max_size=64))
def test_ts_info_garbage_is_a_clean_error(b):
    try:
        info = ethtool.TsInfo.from_bytes(b)
    except ValueError:
        return
    info.to_dict()


def test_hwtstamp_config_roundtrip():
    cfg = ethtool.HwTstampConfig.from_bytes(struct.pack("=iii", 0, 1, 12))
    assert cfg.to_dict() == {"flags": 0, "tx_type": "on", "rx_filter": "ptpv2-event"}
    assert not cfg.is_off and ethtool.HwTstampConfig(0, 0, 0).is_off
    assert ethtool.HwTstampConfig.from_bytes(cfg.to_bytes()) == cfg


def test_live_ioctls_on_loopback():
    info = ethtool.ts_info("lo")
    assert info.phc_index == -1
    assert info.supports(ts.SOF_TIMESTAMPING_RX_SOFTWARE | ts.SOF_TIMESTAMPING_SOFTWARE)
    assert ethtool.get_hwtstamp("lo") is None  # no hardware stamping at all
    with pytest.raises(ValueError):
        ethtool.ts_info("x" * 16)
    with pytest.raises(OSError):
        ethtool.ts_info("nonexistent0")


class FakeEthtool:
    def __init__(self, cur, rx_filters=0b11, tx_types=0b11):
        self.cur, self.set_calls = cur, []
        self.info = ethtool.TsInfo(ts.SOF_HARDWARE | ts.SOF_SOFTWARE, 0, tx_types, rx_filters)

    def install(self, monkeypatch):
        monkeypatch.setattr(ethtool, "ts_info", lambda iface: self.info)
        monkeypatch.setattr(ethtool, "get_hwtstamp", lambda iface: self.cur)

        def set_(iface, cfg):
            self.set_calls.append(cfg)
            self.cur = cfg
            return cfg
        monkeypatch.setattr(ethtool, "set_hwtstamp", set_)
        monkeypatch.setattr(ts, "phc_clock", lambda index: object())


def test_never_clobbers_a_ptp4l_config(monkeypatch):
    fake = FakeEthtool(ethtool.HwTstampConfig(0, ethtool.HWTSTAMP_TX_ON, 12))  # ptp4l: PTPv2 events only
    fake.install(monkeypatch)
    hw_rx, hw_tx, phc = ts._hardware_plan("eth9", configure_nic=True)
    assert fake.set_calls == []
    assert (hw_rx, hw_tx, phc) == (False, True, 0)  # PTP-only RX filter: our packets get software RX stamps


def test_configures_the_nic_only_on_opt_in_and_only_when_off(monkeypatch):
    fake = FakeEthtool(ethtool.HwTstampConfig(0, 0, 0))
    fake.install(monkeypatch)
    assert ts._hardware_plan("eth9", configure_nic=False) == (False, False, None)
    assert fake.set_calls == []
    assert ts._hardware_plan("eth9", configure_nic=True) == (True, True, 0)
    assert fake.set_calls == [ethtool.HwTstampConfig(0, ethtool.HWTSTAMP_TX_ON, ethtool.HWTSTAMP_FILTER_ALL)]


def test_no_hardware_when_the_phc_is_unreadable(monkeypatch):
    fake = FakeEthtool(ethtool.HwTstampConfig(0, 1, 1))
    fake.install(monkeypatch)

    def denied(index):
        raise PermissionError(13, "denied")
    monkeypatch.setattr(ts, "phc_clock", denied)
    assert ts._hardware_plan("eth9", configure_nic=False) == (False, False, None)


def test_restore_puts_back_only_what_we_changed(monkeypatch):
    fake = FakeEthtool(ethtool.HwTstampConfig(0, 0, 0))
    fake.install(monkeypatch)
    monkeypatch.setattr(ts, "_NIC_CHANGED", {})
    ts._hardware_plan("eth9", configure_nic=True)
    assert ts.restore_nic_configs() == ["eth9"]
    assert fake.cur == ethtool.HwTstampConfig(0, 0, 0)
    # ptp4l took over after us: leave its config alone
    ts._hardware_plan("eth9", configure_nic=True)
    fake.cur = ethtool.HwTstampConfig(0, ethtool.HWTSTAMP_TX_ON, 12)
    assert ts.restore_nic_configs() == []
    assert fake.cur.rx_filter == 12
