"""Hardware timestamps on a real PHC: two emulated Intel 82576 (igb) in the VM.

As shipped, QEMU 10's igb stamps TX of any packet but RX only of PTP frames, and its
driver grants RX filters PTP-only (all and ntp-all -> ERANGE). So:

* ``xwamp doctor`` and ``xwamp ping --iface``: hardware TX (T1), software RX, and says so;
* with the test-only RX workaround (igb_rx_workaround.py: NIC registers poked from the
  test, never by the product), T2 and T4 are hardware stamps too;
* a PHC stepped by a known amount: hardware and software stamps in one exchange still
  land on one timescale.

Each test prints its per-source stamp counts. Rates are low and exchanges lockstep: the
82576 holds one TX stamp in flight and QEMU latches one RX stamp.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.engine import ethtool
from agent.engine import timestamping as ts
from agent.engine.clock import StampCounters

from .conftest import IgbPair, Nic, netns
from .igb_rx_workaround import PROBE_TOS
from .igbpair import rx_workaround

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# Bounds for "lies within": generous against a loaded TCG host, far below any unit or
# time-base error (microseconds vs. the 1000 s step and 37 s TAI offsets a bug would show).
TOL_NS = 200_000


def xwamp(ns: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "agent", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_doctor_reports_phc_filters_and_discipline(igb: IgbPair) -> None:
    r = xwamp(igb.a.ns, "doctor", igb.a.ifname, "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["timestamping"]
    print(f"\ndoctor {igb.a.ifname}: ts_info {t['ts_info']} hardware {t['hardware']} phc {t['phc']}")
    assert t["ts_info"]["phc_index"] == igb.a.phc
    assert "on" in t["ts_info"]["tx_types"] and "hardware-raw-clock" in t["ts_info"]["capabilities"]
    assert "all" not in t["ts_info"]["rx_filters"] and "ptpv2-event" in t["ts_info"]["rx_filters"]
    assert t["hardware"]["tx"] == "hardware" and t["hardware"]["rx"] == "software"
    assert "neither all nor ntp-all" in t["hardware"]["rx_reason"]
    phc = t["phc"]
    assert phc["readable"] and phc["method"] in ("extended", "sys_offset")  # igb: no PRECISE
    # No phc2sys here and nothing synchronises the guest: not disciplined, and the Error
    # Estimate says unsynchronised (S=0) whatever the PHC offset looks like.
    assert phc["phc2sys"] == [] and phc["disciplined"] is False
    # Two readings 1 s apart give the drift: the conversion bound is the windows' (well under the
    # 100 µs a free-running oscillator's 100 ppm would give over the refresh interval).
    assert phc["conversion_steps"] == 0 and phc["uncertainty_ns"] <= phc["conversion_error_ns"] < 100_000, phc
    text = xwamp(igb.a.ns, "doctor", igb.a.ifname).stdout
    assert "hardware RX:    software (driver grants only" in text and "disciplined:    no" in text
    assert "conversion:     ±" in text and "added to the Error Estimate" in text, text
    clock = json.loads(r.stdout)["clock"]
    if not clock["synced"]:
        assert clock["error_estimate"]["S"] == 0


def test_ping_t1_hardware_as_shipped(igb: IgbPair) -> None:
    srv = subprocess.Popen(["ip", "netns", "exec", igb.b.ns, sys.executable, "-m", "agent", "server", "--listen",
                            igb.b.addr, "--protocol", "twamp", "--twamp-port", "0", "--duration", "150",
                            "--iface", igb.b.ifname],
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        assert "port" in line, srv.stderr.read() if srv.stderr else ""
        port = line.split(" port ")[1].split(",")[0]
        r = xwamp(igb.a.ns, "ping", igb.b.addr, "--port", port, "--iface", igb.a.ifname, "-c", "20", "-i", "0.1",
                  "--wait", "2", "--timeout", "30", "--json")
        with netns(igb.b.ns):
            b_cfg = ethtool.get_hwtstamp(igb.b.ifname)
    finally:
        srv.terminate()
        srv_err = srv.communicate(timeout=60)[1]
    assert r.returncode == 0, r.stderr
    # xwamp server --iface: B switched on for the reflector sessions (TX on; RX none, refused),
    # put back at exit.
    assert b_cfg is not None and b_cfg.tx_type == ethtool.HWTSTAMP_TX_ON, b_cfg
    assert "refused RX filters all and ntp-all" in srv_err and "Traceback" not in srv_err, srv_err
    with netns(igb.b.ns):
        assert ethtool.get_hwtstamp(igb.b.ifname).is_off
    doc = json.loads(r.stdout)
    sources = doc["summary"]["stamp_sources"]
    print(f"\nxwamp ping --iface {igb.a.ifname}: stamp sources {sources}")
    assert sources.get("tx_hw", 0) >= 1, sources  # T1 from the PHC
    assert sources.get("rx_sw", 0) >= 1  # T4: as shipped the NIC does not stamp our UDP
    assert "refused RX filters all and ntp-all" in r.stderr and "hardware TX" in r.stderr
    for rec in doc["records"]:
        if rec["t1_source"] == "hw":
            # The PHC stamp, in CLOCK_REALTIME, after the user-space stamp taken before the send.
            assert 0 <= rec["t1_kernel_ns"] - rec["t1_ns"] < 10**9, rec
            if rec["t4_ns"] is not None:
                assert rec["t1_kernel_ns"] < rec["t4_ns"], rec


def _stamping_socket(nic: Nic, tos: int = 0) -> tuple[socket.socket, ts.TimestampingConfig]:
    with netns(nic.ns):
        ts.configure_nic(nic.ifname)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((nic.addr, 0))
        cfg = ts.enable_timestamping(s, nic.ifname)
    assert cfg.hardware_tx and cfg.phc_index == nic.phc
    # OPT_TX_SWHW: the software TX stamp too (its own error-queue message), to compare.
    s.setsockopt(socket.SOL_SOCKET, ts.SO_TIMESTAMPING, cfg.flags | ts.SOF_TIMESTAMPING_OPT_TX_SWHW)
    if tos:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    return s, cfg


def _recv(s: socket.socket) -> tuple[bytes, tuple, int | None, int | None, list]:
    r, _, _ = select.select([s], [], [], 10)
    assert r, "no packet within 10 s"
    data, anc, _f, addr = s.recvmsg(2048, ts.ANCILLARY_BUFSIZE)
    sw = hw = None
    for level, ctype, raw in anc:
        if level == socket.SOL_SOCKET and ctype in (ts.SCM_TIMESTAMPING, ts.SCM_TIMESTAMPING_NEW):
            sw, hw = ts.decode_scm_timestamping(raw, ctype)
    return data, addr, sw, hw, anc


def _tx_stamps(s: socket.socket, cfg: ts.TimestampingConfig, key: int, c: StampCounters) -> dict[str, int]:
    """Both TX stamps of OPT_ID ``key`` (sw and hw arrive as two messages); waits up to 2 s."""
    got: dict[str, int] = {}
    deadline = time.monotonic() + 2
    while len(got) < 2 and time.monotonic() < deadline:
        for k, stamp in ts.drain_tx_stamps(s, config=cfg, counters=c):
            if k == key:
                got[stamp.source.value] = stamp.ns
        time.sleep(0.002)
    return got


def test_all_four_stamps_hardware_with_rx_workaround(igb: IgbPair) -> None:
    """T1..T4 from the PHCs, lockstep, with the RX workaround; each brackets with software."""
    a, acfg = _stamping_socket(igb.a, PROBE_TOS)
    b, bcfg = _stamping_socket(igb.b, PROBE_TOS)
    ra, rb = rx_workaround(igb.a), rx_workaround(igb.b)
    ca, cb = StampCounters(), StampCounters()
    phc_a, phc_b = ts.phc_clock(igb.a.phc), ts.phc_clock(igb.b.phc)
    rows = []
    try:
        for i in range(20):
            a.sendto(i.to_bytes(4, "big") * 8, (igb.b.addr, b.getsockname()[1]))
            data, peer, t2sw, t2hw, anc_b = _recv(b)
            rb.clear_latch()
            t2 = ts.rx_stamp(anc_b, config=bcfg, counters=cb)
            b.sendto(data, peer)
            _d, _p, t4sw, t4hw, anc_a = _recv(a)
            ra.clear_latch()
            t4 = ts.rx_stamp(anc_a, config=acfg, counters=ca)
            tx_a, tx_b = _tx_stamps(a, acfg, i, ca), _tx_stamps(b, bcfg, i, cb)
            rows.append({"t1": tx_a, "t3": tx_b, "t2": {"sw": t2sw, "hw": t2hw and phc_b.to_realtime(t2hw)},
                         "t4": {"sw": t4sw, "hw": t4hw and phc_a.to_realtime(t4hw)},
                         "t2_source": t2.source.value if t2 else None, "t4_source": t4.source.value if t4 else None})
    finally:
        ra.undo()
        rb.undo()
        ra.close()
        rb.close()
        a.close()
        b.close()
    count = {k: sum(1 for r in rows if r[k].get("hw")) for k in ("t1", "t2", "t3", "t4")}
    print(f"\nlockstep x{len(rows)} with RX workaround: hardware stamps per T {count}; "
          f"A {ca.snapshot()} B {cb.snapshot()}; PHC via {phc_a.method} ±{phc_a.uncertainty_ns} ns")
    assert all(count[k] >= 1 for k in count), count
    assert ca.rx_hw >= 1 and cb.rx_hw >= 1 and ca.tx_hw >= 1 and cb.tx_hw >= 1
    rtts = []
    for r in rows:
        t1, t2, t3, t4 = r["t1"], r["t2"], r["t3"], r["t4"]
        # Each hardware stamp, in CLOCK_REALTIME, lies where its software twin says it must:
        # the NIC sends after the driver's TX stamp and receives before the stack's RX stamp.
        for tx in (t1, t3):
            if "hw" in tx and "sw" in tx:
                assert tx["sw"] - TOL_NS <= tx["hw"] < tx["sw"] + 10**9, r
        for rx in (t2, t4):
            if rx["hw"] and rx["sw"]:
                assert rx["sw"] - 10**9 < rx["hw"] <= rx["sw"] + TOL_NS, r
        if all(x.get("hw") for x in (t1, t2, t3, t4)) and all(x.get("sw") for x in (t1, t2, t3, t4)):
            hw = (t4["hw"] - t1["hw"]) - (t3["hw"] - t2["hw"])
            sw = (t4["sw"] - t1["sw"]) - (t3["sw"] - t2["sw"])
            assert -TOL_NS <= hw <= sw + TOL_NS, r  # hardware RTT: the wire without the stacks
            assert t2["hw"] - t1["hw"] >= -TOL_NS and t4["hw"] - t3["hw"] >= -TOL_NS, r
            rtts.append((hw, sw))
    assert rtts, "no exchange got all four stamps from both sources"
    hw_s, sw_s = sorted(x[0] for x in rtts), sorted(x[1] for x in rtts)
    print(f"RTT median: hardware {hw_s[len(hw_s) // 2] / 1e3:.1f} µs, software {sw_s[len(sw_s) // 2] / 1e3:.1f} µs "
          f"({len(rtts)} exchanges)")


def _step_phc(index: int, delta_ns: int) -> None:
    fd = os.open(f"/dev/ptp{index}", os.O_RDWR)
    try:
        clk = ((~fd) << 3) | 3  # FD_TO_CLOCKID (include/linux/posix-timers.h)
        time.clock_settime_ns(clk, time.clock_gettime_ns(clk) + delta_ns)
    finally:
        os.close(fd)


def test_mixed_hw_sw_stamps_on_one_timescale_against_a_stepped_phc(igb: IgbPair) -> None:
    """PHC A stepped +1000 s: T1 (hardware, PHC) and T4 (software) still make a sane RTT.
    Stepping works on QEMU's igb; steering its frequency does not (never adjfine here)."""
    step = 1000 * 10**9
    a, acfg = _stamping_socket(igb.a)  # TOS 0: RX falls to software, as shipped
    with netns(igb.b.ns):
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b.bind((igb.b.addr, 0))
    c = StampCounters()
    phc = ts.phc_clock(igb.a.phc)
    steps_before = phc.steps
    _step_phc(igb.a.phc, step)
    rows = []
    try:
        for i in range(10):
            t_user = time.time_ns()
            a.sendto(b"mixed%02d" % i, b.getsockname())
            r, _, _ = select.select([b], [], [], 10)
            assert r
            data, peer = b.recvfrom(64)
            b.sendto(data, peer)
            _d, _p, t4sw, _t4hw, anc = _recv(a)
            t4 = ts.rx_stamp(anc, config=acfg, counters=c)
            got = {}
            deadline = time.monotonic() + 2
            raw_hw = None
            while "hw" not in got and time.monotonic() < deadline:
                for _data, anc_e, _f, _a in _errqueue(a):
                    for level, ctype, raw in anc_e:
                        if level == socket.SOL_SOCKET and ctype in (ts.SCM_TIMESTAMPING, ts.SCM_TIMESTAMPING_NEW):
                            _s, h = ts.decode_scm_timestamping(raw, ctype)
                            raw_hw = h if h is not None else raw_hw
                    dec = ts.decode_tx_message(anc_e, config=acfg, counters=c)
                    if dec is not None and dec[0] == i:
                        got[dec[1].source.value] = dec[1].ns
                time.sleep(0.002)
            rows.append((t_user, raw_hw, got.get("hw"), t4))
    finally:
        _step_phc(igb.a.phc, -step)
        a.close()
        b.close()
    print(f"\nstepped PHC +1000 s, 10 exchanges: {c.snapshot()}; PHC steps seen {phc.steps - steps_before}")
    assert phc.steps > steps_before  # the relation restarted instead of reading 1000 s as drift
    mixed = [(u, raw, hw, t4) for u, raw, hw, t4 in rows if hw is not None and t4 is not None and t4.source.value == "sw"]
    assert mixed, rows
    for t_user, raw, hw, t4 in mixed:
        assert abs(raw - t_user - step) < 10**9  # the raw stamp really is on the stepped PHC
        assert t_user - TOL_NS <= hw < t4.ns  # converted: between the user stamp and the software T4
        assert 0 < t4.ns - hw < 10**9


def _errqueue(s: socket.socket):
    out = []
    while True:
        try:
            out.append(s.recvmsg(64, ts.ANCILLARY_BUFSIZE, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


def _phc2sys() -> str:
    tools = os.environ.get("XWAMP_GUEST_TOOLS")
    path = Path(tools or "/nonexistent") / "usr" / "sbin" / "phc2sys"
    assert path.exists(), ("phc2sys not available: tools/vm/run --nics igb fetches linuxptp into the VM cache "
                           f"(XWAMP_GUEST_TOOLS={tools!r})")
    return str(path)


def test_error_estimate_synchronised_only_once_phc2sys_locks(igb: IgbPair) -> None:
    """Last in this module: phc2sys marks the guest's clock synchronised for good."""
    from agent.engine import clock

    before = json.loads(xwamp(igb.a.ns, "doctor", igb.a.ifname, "--json").stdout)
    assert before["timestamping"]["phc"]["disciplined"] is False
    if before["clock"]["synced"]:
        pytest.fail("the guest clock is already marked synchronised: nothing to show")
    assert before["clock"]["error_estimate"]["S"] == 0
    # -O 0: the PHC holds UTC here (igb reset sets it to CLOCK_REALTIME); no ptp4l, so no -w.
    # phc2sys steers CLOCK_REALTIME only; the PHC (whose frequency QEMU cannot steer) is the source.
    proc = subprocess.Popen([_phc2sys(), "-s", f"/dev/ptp{igb.a.phc}", "-c", "CLOCK_REALTIME", "-O", "0",
                             "-R", "4", "-m", "-q"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not clock.read_clock_state().synced:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "phc2sys did not lock within 120 s"
            time.sleep(0.25)
        during = json.loads(xwamp(igb.a.ns, "doctor", igb.a.ifname, "--json").stdout)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    phc = during["timestamping"]["phc"]
    print(f"\nphc2sys locked: doctor says disciplined={phc['disciplined']} residual {phc['residual_offset_ns']} ns, "
          f"error estimate {during['clock']['error_estimate']}; phc2sys: {out.strip().splitlines()[-1:]}")
    assert [p["pid"] for p in phc["phc2sys"]] == [proc.pid]
    assert phc["disciplined"] is True and during["clock"]["synced"] is True
    assert during["clock"]["error_estimate"]["S"] == 1
