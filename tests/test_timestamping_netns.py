"""Kernel RX/TX stamps over a veth between two network namespaces this test creates.

The file doubles as the helper script run inside the namespaces:
``python3 test_timestamping_netns.py echo ADDR PORT IFACE`` / ``... probe ADDR PORT IFACE N``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # when run as a helper inside a namespace
    sys.path.insert(0, str(ROOT))

from agent.engine import ethtool  # noqa: E402
from agent.engine import timestamping as ts  # noqa: E402
from agent.engine.clock import StampCounters  # noqa: E402

N_PACKETS = 50


def _echo(addr: str, port: int, iface: str, count: int) -> None:
    """Reflector: answers ``count`` packets with (T2 kernel RX, T3 kernel TX of the previous reply)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((addr, port))
        cfg = ts.enable_timestamping(s, iface)
        print("ready", flush=True)
        s.settimeout(5)
        c = StampCounters()
        t2: dict[int, int] = {}
        for i in range(count):
            data, anc, _flags, peer = s.recvmsg(2048, ts.ANCILLARY_BUFSIZE)
            rx = ts.rx_stamp(anc, config=cfg, counters=c)
            t2[i] = rx.ns if rx else 0
            s.sendto(data, peer)
        deadline = time.monotonic() + 2
        t3: dict[int, int] = {}
        while len(t3) < count and time.monotonic() < deadline:
            t3.update({k: v.ns for k, v in ts.drain_tx_stamps(s, config=cfg, counters=c)})
            time.sleep(0.002)
        print(json.dumps({"t2": t2, "t3": t3, "counters": c.snapshot()}), flush=True)


def _probe(addr: str, port: int, iface: str, count: int) -> None:
    """Sender: T1 user + kernel TX, T4 kernel RX; prints JSON."""
    info = ethtool.ts_info(iface)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        cfg = ts.enable_timestamping(s, iface)  # hardware=True: a veth must fall back to software
        s.settimeout(2)
        c = StampCounters()
        rows = []
        for i in range(count):
            t1_user = time.time_ns()
            s.sendto(i.to_bytes(4, "big") * 10, (addr, port))
            _d, anc, flags, _ = s.recvmsg(2048, ts.ANCILLARY_BUFSIZE)
            t4_user = time.time_ns()
            rx = ts.rx_stamp(anc, config=cfg, counters=c)
            tx = dict(ts.drain_tx_stamps(s, config=cfg, counters=c))
            rows.append({"t1_user": t1_user, "t4_user": t4_user, "t4": rx.ns if rx else None,
                         "t4_src": rx.source.value if rx else None, "ctrunc": bool(flags & socket.MSG_CTRUNC),
                         "t1": {str(k): v.ns for k, v in tx.items()}})
        time.sleep(0.01)
        late = {str(k): v.ns for k, v in ts.drain_tx_stamps(s, config=cfg, counters=c)}
        print(json.dumps({"rows": rows, "late": late, "counters": c.snapshot(),
                          "hwtstamp": repr(ethtool.get_hwtstamp(iface)),
                          "cfg": [cfg.hardware_rx, cfg.hardware_tx, cfg.software_rx, cfg.software_tx],
                          "ts_info": info.to_dict()}), flush=True)


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def veth_pair():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = secrets.token_hex(3)
    ns_a, ns_b, va, vb = f"xwts-a-{tag}", f"xwts-b-{tag}", f"xwa{tag}", f"xwb{tag}"
    try:
        _sh("ip", "netns", "add", ns_a)
        _sh("ip", "netns", "add", ns_b)
        _sh("ip", "link", "add", va, "netns", ns_a, "type", "veth", "peer", "name", vb, "netns", ns_b)
        for ns, v, a in ((ns_a, va, "10.77.0.1/24"), (ns_b, vb, "10.77.0.2/24")):
            _sh("ip", "-n", ns, "addr", "add", a, "dev", v)
            _sh("ip", "-n", ns, "link", "set", v, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create netns/veth: {e.stderr.decode().strip()}")
    try:
        yield ns_a, ns_b, va, vb
    finally:
        for ns in (ns_a, ns_b):  # deleting the namespace destroys the veth pair too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_every_packet_gets_kernel_rx_and_tx_stamps(veth_pair):
    ns_a, ns_b, va, vb = veth_pair
    me = str(Path(__file__).resolve())
    echo = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, me, "echo", "10.77.0.2", "8620", vb,
                             str(N_PACKETS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert echo.stdout.readline().strip() == "ready", echo.stderr.read()
        probe = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, me, "probe", "10.77.0.2", "8620", va,
                                str(N_PACKETS)], capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        out_echo, err_echo = echo.communicate(timeout=10)
        assert echo.returncode == 0, err_echo
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait()
    p = json.loads(probe.stdout)
    e = json.loads(out_echo.strip().splitlines()[-1])

    # veth has no PHC: the hardware request degrades to software, and says so.
    assert p["cfg"] == [False, False, True, True]
    assert p["ts_info"]["phc_index"] is None and "software-receive" in p["ts_info"]["capabilities"]
    assert p["hwtstamp"] == "None"

    t1 = {int(k): v for row in p["rows"] for k, v in row["t1"].items()} | {int(k): v for k, v in p["late"].items()}
    assert sorted(t1) == list(range(N_PACKETS)), "every packet needs a kernel TX stamp, keyed by OPT_ID"
    assert sorted(int(k) for k in e["t2"]) == list(range(N_PACKETS))
    assert sorted(int(k) for k in e["t3"]) == list(range(N_PACKETS))
    assert all(v > 0 for v in e["t2"].values())
    for i, row in enumerate(p["rows"]):
        assert not row["ctrunc"]
        assert row["t4"] is not None and row["t4_src"] == "sw"
        assert t1[i] >= row["t1_user"], "the kernel stamps after user space handed the packet over"
        assert row["t4"] >= t1[i]
        assert row["t4_user"] >= row["t4"]
        rtt = row["t4"] - t1[i]
        assert rtt > 0
        # the reflector's own times lie inside the round trip (one clock: same host)
        assert t1[i] <= e["t2"][str(i)] <= e["t3"][str(i)] <= row["t4"]
    assert p["counters"]["rx_sw"] == N_PACKETS and p["counters"]["tx_sw"] == N_PACKETS
    assert p["counters"]["rx_user"] == 0 and p["counters"]["hw_fallback"] == 0


if __name__ == "__main__":
    mode, addr, port, iface, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    (_echo if mode == "echo" else _probe)(addr, port, iface, count)
