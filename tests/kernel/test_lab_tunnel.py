"""The lab tunnel (tools/lab/tunnel.sh) is a real ESP tunnel: traffic between the inner
addresses leaves the wire as ESP and moves the SA counters, as iproute2 reports them."""

import re
import subprocess
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[2] / "tools" / "lab" / "tunnel.sh"
pytestmark = pytest.mark.kernel


@pytest.fixture
def tunnel():
    subprocess.run([str(LAB), "up", "xwt"], check=True, capture_output=True)
    yield ("xwt-a", "xwt-b")
    subprocess.run([str(LAB), "down", "xwt"], check=True)


def sa_packets(ns: str, spi: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "xfrm", "state", "get", "src", "192.0.2.1",
                          "dst", "192.0.2.2", "proto", "esp", "spi", spi],
                         check=True, capture_output=True, text=True).stdout
    m = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", out)
    assert m, out
    return int(m.group(2))


def test_ping_goes_through_esp(tunnel):
    a, b = tunnel
    before = sa_packets(a, "0xa0b00001")
    subprocess.run(["ip", "netns", "exec", a, "ping", "-c", "2", "-i", "0.2", "-W", "5",
                    "-I", "10.77.1.1", "10.77.2.1"], check=True, capture_output=True)
    assert sa_packets(a, "0xa0b00001") - before == 2  # two echo requests, encrypted by A
    assert sa_packets(b, "0xa0b00001") >= 2  # and decrypted by B
