"""Host side of the hardware-stamp plan: the RX filter fallback (all, then ntp-all, then
software RX with hardware TX) and the PHC relation surviving a step. The real NIC is in
tests/kernel_hw/ (two emulated igb in the VM); here the driver's answers are scripted."""

from __future__ import annotations

import errno
import logging
import struct

import pytest

from agent.engine import ethtool
from agent.engine import timestamping as ts
from agent.engine.clock import STAMP_COUNTERS


class ScriptedDriver:
    """SIOCSHWTSTAMP as a driver answers it: ERANGE for filters it lacks, else a widened filter."""

    def __init__(self, grants: dict[int, int], phc_index: int = 0) -> None:
        self.grants = grants  # asked rx filter -> applied rx filter
        self.cfg = ethtool.HwTstampConfig(0, 0, 0)
        self.asked: list[int] = []
        self.info = ethtool.TsInfo(ts.SOF_HARDWARE | ts.SOF_SOFTWARE, phc_index, 0b11,
                                   sum(1 << f for f in (0, 4, 5, 12)))

    def set(self, iface: str, cfg: ethtool.HwTstampConfig) -> ethtool.HwTstampConfig:
        self.asked.append(cfg.rx_filter)
        if cfg.rx_filter != 0 and cfg.rx_filter not in self.grants:
            raise OSError(errno.ERANGE, "Numerical result out of range")
        self.cfg = ethtool.HwTstampConfig(0, cfg.tx_type, self.grants.get(cfg.rx_filter, 0))
        return self.cfg


@pytest.fixture
def driver(monkeypatch):
    def make(grants):
        d = ScriptedDriver(grants)
        monkeypatch.setattr(ethtool, "ts_info", lambda iface: d.info)
        monkeypatch.setattr(ethtool, "get_hwtstamp", lambda iface: d.cfg)
        monkeypatch.setattr(ethtool, "set_hwtstamp", d.set)
        monkeypatch.setattr(ts, "phc_clock", lambda index: None)
        monkeypatch.setattr(ts, "_NIC_CHANGED", {})
        monkeypatch.setattr(ts, "NIC_PLANS", {})
        return d
    return make


def test_ptp_only_driver_gets_software_rx_hardware_tx_and_says_so(driver, caplog):
    d = driver({})  # the igb of QEMU 10: all and ntp-all -> ERANGE
    before = STAMP_COUNTERS.hw_rx_refused
    with caplog.at_level(logging.WARNING, logger="agent.engine.timestamping"):
        plan = ts.configure_nic("eth0")
    assert d.asked == [ethtool.HWTSTAMP_FILTER_ALL, ethtool.HWTSTAMP_FILTER_NTP_ALL, ethtool.HWTSTAMP_FILTER_NONE]
    assert plan is not None and (plan.hardware_rx, plan.hardware_tx) == (False, True)
    assert plan.refused == ("all", "ntp-all") and plan.granted_rx_filter == "none" and plan.tx == "on"
    assert STAMP_COUNTERS.hw_rx_refused == before + 1
    assert "refused RX filters all and ntp-all" in caplog.text and "hardware TX" in caplog.text
    assert "ptpv1-l4-sync" in caplog.text  # what it does offer


def test_ntp_all_widened_to_all_is_hardware_rx(driver):
    d = driver({ethtool.HWTSTAMP_FILTER_NTP_ALL: ethtool.HWTSTAMP_FILTER_ALL})
    plan = ts.configure_nic("eth0")
    assert d.asked == [ethtool.HWTSTAMP_FILTER_ALL, ethtool.HWTSTAMP_FILTER_NTP_ALL]
    assert plan.hardware_rx and plan.refused == ("all",)


def test_never_over_someone_elses_config(driver):
    d = driver({})
    d.cfg = ethtool.HwTstampConfig(0, 1, 12)  # ptp4l's: TX on, ptpv2-event
    assert ts.configure_nic("eth0") is None and d.asked == []


# ---- the PHC relation: a fake PHC answering PTP_SYS_OFFSET_EXTENDED ------------------------


class SteppablePhc:
    """PHC = realtime + offset; PRECISE unsupported (as on igb), EXTENDED answers."""

    def __init__(self, offset_ns: int) -> None:
        self.offset_ns = offset_ns
        self.rt = 1_700_000_000 * 10**9

    def ioctl(self, fd, req, buf):
        if req != ts.PTP_SYS_OFFSET_EXTENDED:
            raise OSError(errno.EOPNOTSUPP, "no")
        n = struct.unpack_from("=I", buf)[0]
        for i in range(n):
            for j, t in enumerate((self.rt, self.rt + 500 + self.offset_ns, self.rt + 1000)):
                struct.pack_into("=qII", buf, 16 + i * 48 + j * 16, t // 10**9, t % 10**9, 0)
        return 0


def test_phc_step_resets_the_relation_instead_of_becoming_drift():
    f = SteppablePhc(0)
    phc = ts.PhcClock(0, fd=-1, ioctl=f.ioctl)
    assert phc.method == "extended" and phc.uncertainty_ns == 500
    f.rt += 2 * 10**9
    f.offset_ns = 1000 * 10**9  # phc_ctl set: +1000 s
    stamp = f.rt + 300 + f.offset_ns
    assert phc.to_realtime(stamp) == f.rt + 300  # refreshed: the stamp is far from the last sample
    assert phc.steps == 1 and phc._slope == 0.0
    f.rt += 2 * 10**9
    f.offset_ns = 0  # and back (an igb reset sets the PHC to CLOCK_REALTIME)
    assert phc.to_realtime(f.rt + 300) == f.rt + 300  # backwards too
    assert phc.steps == 2


# ---- doctor: the verdict and the phc2sys heuristic ------------------------------------------


def test_doctor_verdict_for_a_ptp_only_driver_and_an_all_driver():
    from agent.commands import doctor

    igb = ethtool.TsInfo(0x5F, 0, 0b11, sum(1 << f for f in (0, 4, 5, 12)))  # QEMU 10's 82576
    v = doctor.hardware_verdict(igb)
    assert v["tx"] == "hardware" and v["rx"] == "software"
    assert v["rx_reason"] == "driver grants only none ptpv1-l4-sync ptpv1-l4-delay-req ptpv2-event; neither all nor ntp-all"
    assert doctor.hardware_verdict(ethtool.TsInfo(0x5F, 1, 0b11, 0b11))["rx"] == "hardware"
    assert doctor.hardware_verdict(ethtool.TsInfo(0x5F, 1, 0b11, 1 | 1 << 15))["rx"].startswith("hardware if")
    assert doctor.hardware_verdict(ethtool.TsInfo(0x1A, -1, 0, 0)) == {
        "tx": "software", "rx": "software", "rx_reason": "no PTP hardware clock"}


def test_doctor_finds_phc2sys_following_this_phc(tmp_path):
    from agent.commands import doctor

    for pid, argv in ((10, ["/usr/sbin/phc2sys", "-s", "/dev/ptp1", "-c", "CLOCK_REALTIME", "-O", "0"]),
                      (11, ["phc2sys", "-a", "-r"]), (12, ["/usr/sbin/ptp4l", "-i", "eth0"])):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    found = doctor.phc2sys_processes(str(tmp_path))
    assert sorted(p["pid"] for p in found) == [10, 11]
    by_pid = {p["pid"]: p for p in found}
    assert doctor._phc2sys_targets(by_pid[10], 1, "eth1") and not doctor._phc2sys_targets(by_pid[10], 0, "eth0")
    assert doctor._phc2sys_targets(by_pid[11], 0, "eth0")  # -a follows ptp4l's ports


def test_restore_after_the_tx_only_fallback(driver, monkeypatch):
    d = driver({})
    monkeypatch.setattr(ts, "_NIC_APPLIED", {})
    ts.configure_nic("eth0")
    assert d.cfg == ethtool.HwTstampConfig(0, 1, 0)
    assert ts.restore_nic_configs() == ["eth0"] and d.cfg == ethtool.HwTstampConfig(0, 0, 0)
    ts.configure_nic("eth0")
    d.cfg = ethtool.HwTstampConfig(0, 1, 12)  # ptp4l took over after us
    assert ts.restore_nic_configs() == [] and d.cfg.rx_filter == 12
