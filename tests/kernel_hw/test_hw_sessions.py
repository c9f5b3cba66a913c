"""Hardware stamps in the product's sessions: ``xwamp stamp --iface`` against ``xwamp reflect
--iface``, and two agents (a STAMP peer with ``iface``, a ``[reflector]`` with ``iface``), across
the two emulated 82576 NICs.

Each test runs twice over the same processes where it can (VM boots and TCG Python are dear):

1. as shipped: the driver refuses RX filters all/ntp-all, so T1 (our TX) and T3 (the reflector's
   TX, reported by RFC 8972 Follow-Up Telemetry) are hardware stamps, T2/T4 software;
2. with the test-only RX workaround (igb_rx_workaround.py; RX filter ptpv2-event set by the
   test, as ptp4l would, the product keeps it) plus IP TOS 0x02 on every UDP packet (tc pedit in
   each netns) and a thread re-arming QEMU's RX latch: T2 and T4 become hardware stamps too.

T2's source comes from the wire: the reflector's Timestamp Information TLV (RFC 8972 §4.3,
method "hw"/"sw" per packet). Every hardware stamp, converted to CLOCK_REALTIME, is checked
against the other stamps of its exchange on the guest's one CLOCK_REALTIME, and against the
timestamp written in the packet within the Error Estimate sent beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from agent.engine import ethtool
from agent.engine.timefmt import ErrorEstimate

from .conftest import IgbPair, Nic, netns
from .igb_rx_workaround import TSYNCRXCTL
from .igbpair import rx_workaround

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
TOL_NS = 200_000  # conversion and ordering slack on a loaded TCG guest (µs, not the 37 s / 1000 s a bug shows)


def _xwamp(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "agent", *args]


def _run(ns: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_xwamp(ns, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _err_ns(packed: int | None) -> float:
    return ErrorEstimate.unpack(packed).seconds * 1e9 if packed else float("inf")


# ---- the RX workaround, driven from the test ---------------------------------------------------

class LatchClearer(threading.Thread):
    """Re-arms QEMU's RX stamp latch (one stamp, cleared only by an RXSATRH read) on both NICs:
    a latch seen valid for ``hold`` (the driver has read RXSTMPL/H long since: it does so before
    the packet reaches the stack) is cleared. Probes come 250 ms apart; the hold is 20 ms."""

    def __init__(self, regs: list, hold: float = 0.02, period: float = 0.004) -> None:
        super().__init__(daemon=True)
        self.regs, self.hold, self.period = regs, hold, period
        self.stop = threading.Event()
        self.cleared = 0

    def run(self) -> None:
        since: dict[int, float] = {}
        while not self.stop.wait(self.period):
            now = time.monotonic()
            for i, r in enumerate(self.regs):
                if r.read(TSYNCRXCTL) & 1:
                    if now - since.setdefault(i, now) >= self.hold:
                        r.clear_latch()
                        since.pop(i, None)
                        self.cleared += 1
                else:
                    since.pop(i, None)


def _tos2(nic: Nic) -> None:
    """IP TOS 0x02 on every UDP packet leaving ``nic`` (what the RX workaround matches), set
    below the sockets so the product runs unchanged: tc pedit, else iptables' TOS target."""
    ns = ["ip", "netns", "exec", nic.ns]
    subprocess.run(["modprobe", "-a", "sch_ingress", "cls_u32", "act_pedit", "act_csum"], capture_output=True)
    subprocess.run([*ns, "tc", "qdisc", "add", "dev", nic.ifname, "clsact"], capture_output=True)
    tc = subprocess.run([*ns, "tc", "filter", "add", "dev", nic.ifname, "egress", "protocol", "ip", "prio", "1", "u32",
                         "match", "ip", "protocol", "17", "0xff", "action", "pedit", "munge", "ip", "tos", "set",
                         "0x02", "pipe", "action", "csum", "ip"], capture_output=True, text=True)
    if tc.returncode == 0:
        return
    ipt = subprocess.run([*ns, "iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "-j", "TOS", "--set-tos",
                          "0x02/0xff"], capture_output=True, text=True)
    assert ipt.returncode == 0, f"cannot set TOS 0x02: tc: {tc.stderr.strip()}; iptables: {ipt.stderr.strip()}"


def _untos(nic: Nic) -> None:
    ns = ["ip", "netns", "exec", nic.ns]
    subprocess.run([*ns, "tc", "qdisc", "del", "dev", nic.ifname, "clsact"], capture_output=True)
    subprocess.run([*ns, "iptables", "-t", "mangle", "-F", "OUTPUT"], capture_output=True)


@contextlib.contextmanager
def rx_workaround_on(igb: IgbPair):
    """Both NICs stamp our UDP on RX (test-only), as long as the body runs."""
    regs = [rx_workaround(igb.a), rx_workaround(igb.b)]  # SIOCSHWTSTAMP (tx on, ptpv2-event), then the registers
    for n in (igb.a, igb.b):
        _tos2(n)
    clearer = LatchClearer(regs)
    clearer.start()
    try:
        yield clearer
    finally:
        clearer.stop.set()
        clearer.join(5)
        for n, r in zip((igb.a, igb.b), regs):
            _untos(n)
            r.undo()
            r.close()
            with netns(n.ns):  # stamping off again: the next test starts from the NIC as shipped
                ethtool.set_hwtstamp(n.ifname, ethtool.HwTstampConfig(0, ethtool.HWTSTAMP_TX_OFF, 0))


# ---- the PHC conversion error in the Error Estimate ------------------------------------------------

def _read_phc(index: int) -> tuple[int, int, int]:
    """(CLOCK_REALTIME before, PHC, CLOCK_REALTIME after): a PHC reading bracketed by the system clock."""
    fd = os.open(f"/dev/ptp{index}", os.O_RDONLY)
    try:
        clk = ((~fd) << 3) | 3  # FD_TO_CLOCKID (include/linux/posix-timers.h)
        t0 = time.clock_gettime_ns(time.CLOCK_REALTIME)
        p = time.clock_gettime_ns(clk)
        t1 = time.clock_gettime_ns(time.CLOCK_REALTIME)
        return t0, p, t1
    finally:
        os.close(fd)


def test_phc_conversion_error_bounds_real_readings_and_enters_the_error_estimate(igb: IgbPair) -> None:
    """On the real PHCs: the bound PhcClock publishes covers the error of converting PHC readings
    bracketed by CLOCK_REALTIME, and ClockErrorCache adds it to the Error Estimate (RFC 4656 §4.1.2)."""
    from agent.engine import clock
    from agent.engine import timestamping as ts

    rows = []
    for nic in (igb.a, igb.b):
        phc = ts.phc_clock(nic.phc)
        worst = 0
        for _ in range(12):  # ~2.4 s: past two refreshes, so the drift is measured, not assumed
            t0, p, t1 = _read_phc(nic.phc)
            rt = phc.to_realtime(p)
            bound = phc.conversion_error_ns
            # The reading happened within [t0, t1]: its conversion lies there, give or take the bound.
            assert t0 - bound <= rt <= t1 + bound, (nic.ifname, t0, rt, t1, bound)
            worst = max(worst, max(t0 - rt, rt - t1, 0))
            time.sleep(0.2)
        rows.append((nic.ifname, phc.method, phc.uncertainty_ns, phc.conversion_error_ns, worst))
        assert phc._prev is not None, "no drift measured in 2.4 s"
    published = clock.conversion_error_s()
    assert published * 1e9 == max(r[3] for r in rows)
    cache = clock.ClockErrorCache()
    est, st = cache.estimate(), cache.state()
    assert cache.extra_error_s == published
    base = st.error_seconds() if st.synced else max(st.maxerror_us * 1e-6, 1.0)
    assert est == ErrorEstimate.from_seconds(base + published, synced=st.synced)
    print("\nPHC -> CLOCK_REALTIME: " + "; ".join(
        f"{i} via {m}: window/2 {u} ns, published bound {b} ns, worst reading outside its bracket {w} ns"
        for i, m, u, b, w in rows) + f"; Error Estimate {est.seconds:.9f} s (clock {base:.6f} s + {published * 1e9:.0f} ns)")


# ---- xwamp stamp -> xwamp reflect ---------------------------------------------------------------

def _start_reflect(nic: Nic, duration: int) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(_xwamp(nic.ns, "reflect", "--listen", nic.addr, "--port", "0", "--iface", nic.ifname,
                                "--duration", str(duration)),
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    m = re.search(r"listening on [^ ]*:(\d+)", line)
    if not m:
        p.kill()
        raise AssertionError(f"reflect did not start: {line!r} {p.stderr.read() if p.stderr else ''}")
    return p, int(m.group(1))


def _stamp(igb: IgbPair, port: int) -> dict:
    r = _run(igb.a.ns, "stamp", igb.b.addr, "--port", str(port), "--iface", igb.a.ifname, "-c", "16", "-i", "0.25",
             "--wait", "2", "--tlv", "timestamp-info", "--json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    doc["stderr"] = r.stderr
    return doc


def _t2_methods(doc: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in doc["records"]:
        for ans in rec.get("tlv_answers", []):
            if "method_in" in ans:
                out[ans["method_in"]] = out.get(ans["method_in"], 0) + 1
    return out


def _check_one_timescale(doc: dict) -> int:
    """Every hardware stamp against its exchange; returns how many records were checked."""
    n = 0
    for rec in doc["records"]:
        if rec["t4_ns"] is None:
            continue
        t1 = rec["t1_kernel_ns"] if rec["t1_source"] == "hw" else None
        if t1 is not None:
            # The PHC's TX stamp, in CLOCK_REALTIME: after the timestamp written in the packet (read
            # before the send), by less than the Error Estimate sent beside it (clock + TX lag +
            # PHC conversion), and before the reflector received the packet.
            lag = t1 - rec["t1_ns"]
            assert -TOL_NS <= lag <= _err_ns(rec["t1_error"]), rec
            assert t1 <= rec["t2_ns"] + TOL_NS and t1 < rec["t4_ns"], rec
        if rec["follow_up"] == "corrected" and rec["t3_source"] == "hw":
            t3 = rec["t3_ns"]
            lag = t3 - rec["t3_user_ns"]  # the reflector's hardware TX stamp vs the T3 it wrote
            assert -TOL_NS <= lag <= _err_ns(rec["reflector_error"]), rec
            assert rec["t2_ns"] - TOL_NS <= t3 <= rec["t4_ns"] + TOL_NS, rec
        if rec["t4_source"] == "hw":
            assert rec["t4_ns"] >= (t1 or rec["t1_ns"]) - TOL_NS, rec
        n += 1
    return n


def _rtt_medians(doc: dict) -> str:
    rtts = sorted(r["rtt_ns"] for r in doc["records"] if r.get("rtt_ns") is not None)
    return f"median RTT {rtts[len(rtts) // 2] / 1e3:.1f} µs over {len(rtts)}" if rtts else "no RTT"


def test_stamp_cli_hardware_t1_t3_then_t2_t4_with_rx_workaround(igb: IgbPair) -> None:
    refl, port = _start_reflect(igb.b, 900)
    try:
        shipped = _stamp(igb, port)
        src1, t2m1 = shipped["summary"]["stamp_sources"], _t2_methods(shipped)
        print(f"\nxwamp stamp --iface {igb.a.ifname} -> reflect --iface {igb.b.ifname}, as shipped: "
              f"sources {src1}, T2 methods {t2m1}; {_rtt_medians(shipped)}")
        assert src1.get("tx_hw", 0) >= 8, src1  # T1: the PHC of A
        assert src1.get("t3_hw", 0) >= 8, src1  # T3: B's hardware TX stamps through Follow-Up
        assert src1.get("rx_sw", 0) >= 8 and not src1.get("rx_hw"), src1  # T4: A stamps no UDP on RX
        assert t2m1.get("sw", 0) >= 8 and not t2m1.get("hw"), t2m1  # T2: neither does B
        assert "refused RX filters all and ntp-all" in shipped["stderr"], shipped["stderr"]
        assert _check_one_timescale(shipped) >= 8
        with netns(igb.a.ns):
            a_cfg = ethtool.get_hwtstamp(igb.a.ifname)
        with netns(igb.b.ns):
            b_cfg = ethtool.get_hwtstamp(igb.b.ifname)
        assert a_cfg is not None and a_cfg.is_off, a_cfg  # stamp put A back as it found it
        # reflect switched B on while it runs: TX on, RX none (all and ntp-all refused)
        assert b_cfg is not None and b_cfg.tx_type == ethtool.HWTSTAMP_TX_ON, b_cfg
        assert b_cfg.rx_filter == ethtool.HWTSTAMP_FILTER_NONE, b_cfg
        with rx_workaround_on(igb) as clearer:
            fixed = _stamp(igb, port)
        src2, t2m2 = fixed["summary"]["stamp_sources"], _t2_methods(fixed)
        print(f"with the RX workaround: sources {src2}, T2 methods {t2m2}; {_rtt_medians(fixed)}; "
              f"latches re-armed {clearer.cleared}")
        assert src2.get("tx_hw", 0) >= 8 and src2.get("t3_hw", 0) >= 8, src2
        assert src2.get("rx_hw", 0) >= 4, src2  # T4 from A's PHC (a latch race may cost a few)
        assert t2m2.get("hw", 0) >= 4, t2m2  # T2 from B's PHC, as the reflector says on the wire
        assert _check_one_timescale(fixed) >= 8
        # All four from PHCs: the RTT is the wire's, far below the software one (10 µs vs 0.5 ms
        # in the bench; no timed bound here, only the order).
        hw4 = [r for r in fixed["records"] if r["t1_source"] == "hw" and r["t4_source"] == "hw"
               and r.get("t3_source") == "hw" and r.get("rtt_ns") is not None]
        sw = [r["rtt_ns"] for r in shipped["records"] if r.get("rtt_ns") is not None]
        if hw4 and sw:
            assert min(r["rtt_ns"] for r in hw4) >= -TOL_NS
    finally:
        refl.send_signal(signal.SIGINT)
        try:
            out, err = refl.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            refl.kill()
            out, err = refl.communicate()
    assert "Traceback" not in err, err
    # reflect put B's stamping back as it found it (off) -- or left the workaround's config alone
    with netns(igb.b.ns):
        cur = ethtool.get_hwtstamp(igb.b.ifname)
    assert cur is not None and cur.is_off, cur


# ---- two agents ------------------------------------------------------------------------------

STAMP_PORT = 18620


def _agent_conf(tmp: Path, name: str, body: str) -> Path:
    p = tmp / f"{name}.toml"
    p.write_text(body)
    return p


def _scrape(ns: str, port: int) -> dict[tuple[str, str], float]:
    with netns(ns):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20).read().decode()
    out = {}
    for m in re.finditer(r'^xwamp_timestamps_total\{direction="(\w+)",source="(\w+)"\} ([0-9.e+]+)$', text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def _wait_for(what: str, fn, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            last = fn()
            if last[0]:
                return last[1]
        time.sleep(1.0)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last})")


def test_agent_stamp_peer_and_reflector_hardware(igb: IgbPair, tmp_path: Path) -> None:
    conf_b = _agent_conf(tmp_path, "b", f"""
[server]
enabled = false
[exporter]
port = 19863
[reflector]
enabled = true
listen = ["{igb.b.addr}"]
port = {STAMP_PORT}
iface = "{igb.b.ifname}"
""")
    conf_a = _agent_conf(tmp_path, "a", f"""
[server]
enabled = false
[exporter]
port = 19862
[[peers]]
name = "b"
address = "{igb.b.addr}"
protocol = "stamp"
port = {STAMP_PORT}
interval = 0.25
count = 8
timeout = 1.0
iface = "{igb.a.ifname}"
""")
    procs = []
    failure: AssertionError | None = None
    try:
        for nic, conf in ((igb.b, conf_b), (igb.a, conf_a)):
            procs.append(subprocess.Popen(_xwamp(nic.ns, "agent", "--config", str(conf)), cwd=ROOT, env=ENV,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        a0 = _wait_for("agent A: T1 and Follow-Up T3 from hardware",
                       lambda: ((s := _scrape(igb.a.ns, 19862)).get(("tx", "hw"), 0) >= 8
                                and s.get(("t3", "hw"), 0) >= 8, s))
        b0 = _scrape(igb.b.ns, 19863)
        print(f"\nagents as shipped: A (STAMP peer, iface {igb.a.ifname}) {a0}; B ([reflector], iface "
              f"{igb.b.ifname}) {b0}")
        assert a0.get(("rx", "sw"), 0) >= 1 and not a0.get(("rx", "hw")), a0
        assert b0.get(("rx", "sw"), 0) >= 1 and not b0.get(("rx", "hw")), b0
        assert b0.get(("reply", "hw"), 0) >= 8, b0  # B's own count of the hardware TX stamps it reported
        with rx_workaround_on(igb) as clearer:
            a1 = _wait_for("agents: T4 and T2 from hardware with the RX workaround",
                           lambda: ((s := _scrape(igb.a.ns, 19862)).get(("rx", "hw"), 0) >= 4
                                    and _scrape(igb.b.ns, 19863).get(("rx", "hw"), 0) >= 4, s))
            b1 = _scrape(igb.b.ns, 19863)
            # From here on the workaround is fully in place (tc and the registers took seconds under
            # TCG while packets flowed): what the next 8 exchanges got, on both sides.
            a2 = _wait_for("agent A: 8 more exchanges", lambda: ((s := _scrape(igb.a.ns, 19862)).get(
                ("tx", "hw"), 0) >= a1[("tx", "hw")] + 8, s))
            b2 = _scrape(igb.b.ns, 19863)
        d_a = {k: a2[k] - a1.get(k, 0) for k in a2 if a2[k] != a1.get(k, 0)}
        d_b = {k: b2[k] - b1.get(k, 0) for k in b2 if b2[k] != b1.get(k, 0)}
        print(f"agents with the RX workaround: A {a1}; B {b1}; then, workaround in place: A +{d_a}, B +{d_b}; "
              f"latches re-armed {clearer.cleared}")
        assert a1[("tx", "hw")] > a0[("tx", "hw")] and a1[("t3", "hw")] > a0[("t3", "hw")], (a0, a1)
        # Mostly hardware now (a re-arm racing a packet may cost one): T4 on A, T2 on B.
        assert d_a.get(("rx", "hw"), 0) >= max(4, d_a.get(("rx", "sw"), 0)), d_a
        assert d_b.get(("rx", "hw"), 0) >= max(4, d_b.get(("rx", "sw"), 0)), d_b
    except AssertionError as e:
        failure = e
    finally:
        errs = []
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                errs.append(p.communicate(timeout=60)[1])
            except subprocess.TimeoutExpired:
                p.kill()
                errs.append(p.communicate()[1])
    if failure is not None:  # with what the agents said
        raise AssertionError(f"{failure}\n--- agent stderr tails:\n" + "\n---\n".join(e[-3000:] for e in errs))
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
