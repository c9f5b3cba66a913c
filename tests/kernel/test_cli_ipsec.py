"""The IPsec-bound modes from the command line on a real kernel: ``xwamp server --ipsec
--netns B`` and ``xwamp ping --netns A --mode ...`` between the inner addresses of the
ESP tunnel of tools/lab/tunnel.sh, each keyed from its own namespace's SAs; then a server
announcing an SA pair the client's kernel does not hold: one line, exit 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "tools" / "lab" / "tunnel.sh"
PREFIX = "xwci"
A, B = f"{PREFIX}-a", f"{PREFIX}-b"
OA, OB, IB = "192.0.2.1", "192.0.2.2", "10.77.2.1"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def server():
    subprocess.run([str(LAB), "up", PREFIX], check=True, capture_output=True, timeout=60)
    srv = subprocess.Popen([sys.executable, "-m", "agent", "server", "--netns", B, "--listen", IB, "--protocol",
                            "twamp", "--twamp-port", "0", "--ipsec", "--allow-alt2", "--duration", "120"],
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        assert "port" in line, srv.stderr.read() if srv.stderr else ""
        yield int(line.split(" port ")[1].split(",")[0])
    finally:
        srv.terminate()
        srv.wait(15)
        subprocess.run([str(LAB), "down", PREFIX], capture_output=True, timeout=60)


def ping(port: int, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "ping", IB, "--netns", A, "--port", str(port), "--mode", mode,
                           "-c", "5", "-i", "0.05", "--wait", "1", "--timeout", "20", "--json"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["auth+ipsec-bound", "enc+ipsec-alt1", "auth+ipsec-alt2", "unauth+ipsec-bound"])
def test_cli_ping_in_every_ipsec_mode(server: int, mode: str) -> None:
    r = ping(server, mode)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == mode and doc["summary"]["loss"]["received"] >= 4


def test_cli_ping_refuses_a_pair_its_kernel_does_not_hold(server: int) -> None:
    # A newer SA pair in the server's namespace only, under another reqid: the kernel keeps
    # sending with the tunnel's (policy reqid 7), the binder announces the newest pair.
    time.sleep(1.1)  # add_time has one-second resolution
    for src, dst, spi in ((OA, OB, "0xa0b0000f"), (OB, OA, "0xb0a0000f")):
        ip("-n", B, "xfrm", "state", "add", "src", src, "dst", dst, "proto", "esp", "spi", spi, "reqid", "8",
           "mode", "tunnel", "enc", "cbc(aes)", "0x" + "11" * 16, "auth-trunc", "hmac(sha256)", "0x" + "22" * 32,
           "128", "sel", "src", "0.0.0.0/0", "dst", "0.0.0.0/0")
    try:
        r = ping(server, "auth+ipsec-bound")
        assert r.returncode == 3, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("xwamp ping:")]
        assert lines == ["xwamp ping: IPsec check failed: the server announced an SA our kernel does not hold "
                         f"(no_sa: spi=0xa0b0000f proto=50 daddr={OB})"], r.stderr
        assert "11" * 16 not in r.stderr and "22" * 32 not in r.stderr
    finally:
        for src, dst, spi in ((OA, OB, "0xa0b0000f"), (OB, OA, "0xb0a0000f")):
            ip("-n", B, "xfrm", "state", "delete", "src", src, "dst", dst, "proto", "esp", "spi", spi)
