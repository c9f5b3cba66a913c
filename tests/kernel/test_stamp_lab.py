"""Two agents measure the lab's real ESP tunnel (tools/lab/tunnel.sh) with protocol = "stamp",
keyed from the tunnel's SA pair (docs/wire-format.md §9): A sends, B's [reflector] answers.
Mid-measurement the tunnel is rekeyed make-before-break with ip xfrm (new SPIs and keys, same
reqid, then the old SAs deleted, in both namespaces): the measurement carries on, A's session
counts a rebind, B's reflector verifies with the new pair, and no packet fails its key."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "tools" / "lab" / "tunnel.sh"
P = "xst"
INNER = {"a": "10.77.1.1", "b": "10.77.2.1"}
OUTER = {"a": "192.0.2.1", "b": "192.0.2.2"}

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

SENDER = """
[agent]
log_level = "info"
[server]
enabled = false
[exporter]
listen = "{inner}"
port = 9862
[[peers]]
name = "b"
address = "{peer}"
source = "{inner}"
protocol = "stamp"
mode = "auth+ipsec-bound"
interval = 0.1
count = 10
timeout = 2.0
"""
REFLECTOR = """
[agent]
log_level = "info"
[server]
enabled = false
[exporter]
listen = "{inner}"
port = 9862
[reflector]
enabled = true
listen = ["{inner}"]
mode = "auth+ipsec-bound"
"""


def _scrape(node: str) -> dict[str, float]:
    r = subprocess.run(["ip", "netns", "exec", f"{P}-{node}", sys.executable, "-c",
                        "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                        f"'http://{INNER[node]}:9862/metrics',timeout=20).read().decode())"],
                       capture_output=True, text=True, timeout=60)
    out: dict[str, float] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(xwamp_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _get(s: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in s.items() if k.startswith(prefix))


def _rekey() -> None:
    """Make-before-break: new SAs (SPIs ...02, new keys, reqid 7) in both namespaces, then the old go."""
    def hx(n: int) -> str:
        return os.urandom(n).hex()

    keys = {"ab": (hx(16), hx(32)), "ba": (hx(16), hx(32))}
    for ns in (f"{P}-a", f"{P}-b"):
        for d, (src, dst, spi) in {"ab": (OUTER["a"], OUTER["b"], "0xa0b00002"),
                                   "ba": (OUTER["b"], OUTER["a"], "0xb0a00002")}.items():
            enc, auth = keys[d]
            subprocess.run(["ip", "-n", ns, "xfrm", "state", "add", "src", src, "dst", dst, "proto", "esp", "spi", spi,
                            "reqid", "7", "mode", "tunnel", "replay-window", "32", "enc", "cbc(aes)", "0x" + enc,
                            "auth-trunc", "hmac(sha256)", "0x" + auth, "128", "sel", "src", "0.0.0.0/0", "dst",
                            "0.0.0.0/0"], check=True)
    time.sleep(1.0)
    for ns in (f"{P}-a", f"{P}-b"):
        for src, dst, spi in ((OUTER["a"], OUTER["b"], "0xa0b00001"), (OUTER["b"], OUTER["a"], "0xb0a00001")):
            subprocess.run(["ip", "-n", ns, "xfrm", "state", "delete", "src", src, "dst", dst, "proto", "esp",
                            "spi", spi], check=True)


def test_stamp_agents_keyed_from_the_tunnel_survive_a_rekey() -> None:
    d = Path(tempfile.mkdtemp(prefix="xwamp-stamp-", dir="/tmp"))
    subprocess.run([str(LAB), "up", P], check=True, capture_output=True)
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        for n, tmpl in (("b", REFLECTOR), ("a", SENDER)):
            conf = d / f"{n}.toml"
            conf.write_text(tmpl.format(inner=INNER[n], peer=INNER["b"]))
            logs[n] = d / f"{n}.log"
            with open(logs[n], "w") as log:
                procs[n] = subprocess.Popen(["ip", "netns", "exec", f"{P}-{n}", sys.executable, "-m", "agent", "agent",
                                             "--config", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=REPO,
                                            env={**os.environ, "PYTHONPATH": str(REPO)})
        sess = 'name="b",peer="10.77.2.1",reqid="7",protocol="stamp"'

        def wait_cycles(k: int, deadline_s: float = 300) -> dict[str, float]:
            end = time.monotonic() + deadline_s
            while True:
                for n, p in procs.items():
                    assert p.poll() is None, f"agent {n} exited:\n{logs[n].read_text()[-3000:]}"
                s = _scrape("a")
                if s.get(f"xwamp_cycles_total{{{sess}}}", 0) >= k:
                    return s
                assert time.monotonic() < end, f"no cycles:\n{logs['a'].read_text()[-3000:]}"
                time.sleep(2)

        # (the first cycle may go out before B's reflector listens: the VM starts Python slowly)
        s = wait_cycles(2)
        assert s[f"xwamp_session_sa_keyed{{{sess}}}"] == 1.0
        s = wait_cycles(s[f"xwamp_cycles_total{{{sess}}}"] + 1)
        before = s[f"xwamp_cycles_total{{{sess}}}"]
        sent0, got0 = s[f"xwamp_packets_sent_total{{{sess}}}"], s[f"xwamp_packets_received_total{{{sess}}}"]
        r0 = _scrape("b")
        _rekey()
        # The scrape of B and the rekey take seconds in a loaded TCG guest: cycles may end on the
        # old pair meanwhile (make-before-break keeps it valid). A cycle that starts after the old
        # SAs are gone can only take the new pair, so count from here: the cycle in progress
        # now, then one that started after the rekey.
        after = _scrape("a")[f"xwamp_cycles_total{{{sess}}}"]
        s = wait_cycles(max(before + 3, after + 2))
        sent = s[f"xwamp_packets_sent_total{{{sess}}}"] - sent0
        got = s[f"xwamp_packets_received_total{{{sess}}}"] - got0
        assert s[f"xwamp_session_rebinds_total{{{sess}}}"] >= 1.0, (before, after, s[f"xwamp_cycles_total{{{sess}}}"])
        r = _scrape("b")
        print("reflector B across the rekey:", {k: v - r0.get(k, 0) for k, v in r.items() if "stamp_reflector" in k},
              f"sender A: sent {sent:.0f} received {got:.0f}")
        # Lost: the packets in flight as the old SAs went, and replies later than a cycle's wait
        # (a loaded TCG guest delays some; seen: 95 of 100 with the reflector answering all 104
        # it got). The reflector's own counters below say no packet failed its key.
        assert sent >= 30 and got >= sent - max(3, sent // 10), (sent, got)
        assert r['xwamp_stamp_reflector_packets_total{result="tunnel_key_current"}'] >= got0 + got - 5
        assert _get(r, 'xwamp_stamp_reflector_packets_total{result="tunnel_key_mismatch"}') == 0
        assert _get(r, 'xwamp_stamp_reflector_packets_total{result="tunnel_key_no_sa"}') == 0
        # and the packets went through the new SA
        out = subprocess.run(["ip", "-n", f"{P}-a", "-s", "xfrm", "state", "get", "src", OUTER["a"], "dst", OUTER["b"],
                              "proto", "esp", "spi", "0xa0b00002"], check=True, capture_output=True, text=True).stdout
        m = re.search(r"lifetime current:\s*\n\s*\d+\(bytes\), (\d+)\(packets\)", out)
        assert m and int(m.group(1)) >= 10, out
        # the CLI's key mode over the same tunnel, against B's reflector
        cli = subprocess.run(["ip", "netns", "exec", f"{P}-a", sys.executable, "-m", "agent", "stamp", INNER["b"],
                              "--source", INNER["a"], "--key-from-tunnel", "-c", "3", "-i", "0.2", "--json"],
                             capture_output=True, text=True, timeout=300, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert cli.returncode == 0, cli.stderr
        import json

        doc = json.loads(cli.stdout)
        assert doc["mode"] == "auth" and doc["key_pair"].startswith("spi_c2s=0xa0b00002 spi_s2c=0xb0a00002")
        assert doc["summary"]["loss"]["received"] == 3
        for n in ("a", "b"):
            procs[n].send_signal(signal.SIGTERM)
        for n in ("a", "b"):
            assert procs[n].wait(60) == 0, logs[n].read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for n in logs:
            print(f"--- agent {n}\n" + "\n".join(logs[n].read_text().splitlines()[-15:]))
        subprocess.run([str(LAB), "down", P])
