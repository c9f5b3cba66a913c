"""Sender TTL is the TTL / Hop Limit the reflector really received, across a forwarding hop.

Three network namespaces this test creates: sender -- router -- reflector (two veth
pairs, IPv4 and IPv6, forwarding on in the router). The sender's namespace defaults to
TTL / Hop Limit 50, but test packets go out with 255 (RFC 4656 §4.1.2), so the reflector
must report 254 in Sender TTL (RFC 5357 §4.2.1), and the sender sees the reflector's 255
minus one hop on the replies. Runs the
real CLI (``xwamp server`` / ``xwamp ping``) inside the namespaces; no ESP needed, so it
runs on the host (root + iproute2), not in the kernel VM.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 to create network namespaces")

SENDER_TTL = 50


def _ns(ns: str, *cmd: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True, timeout=10)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture()
def routed_namespaces():
    tag = secrets.token_hex(3)
    snd, rtr, rfl = (f"xwt-{tag}-{r}" for r in ("s", "r", "f"))
    try:
        for ns in (snd, rtr, rfl):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        links = ((snd, f"xt{tag}s", "10.78.1.2/24", "fd78:1::2/64", rtr, f"xt{tag}a", "10.78.1.1/24", "fd78:1::1/64"),
                 (rfl, f"xt{tag}f", "10.78.2.2/24", "fd78:2::2/64", rtr, f"xt{tag}b", "10.78.2.1/24", "fd78:2::1/64"))
        for ns1, d1, v4a, v6a, ns2, d2, v4b, v6b in links:
            _ip("link", "add", d1, "type", "veth", "peer", "name", d2)
            for ns, dev, v4, v6 in ((ns1, d1, v4a, v6a), (ns2, d2, v4b, v6b)):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", v4, "dev", dev)
                _ip("-n", ns, "addr", "add", v6, "dev", dev, "nodad")
                _ip("-n", ns, "link", "set", dev, "up")
        _ns(rtr, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        for ns, gw4, gw6 in ((snd, "10.78.1.1", "fd78:1::1"), (rfl, "10.78.2.1", "fd78:2::1")):
            _ip("-n", ns, "route", "add", "default", "via", gw4)
            _ip("-n", ns, "-6", "route", "add", "default", "via", gw6)
        # The sender's namespace starts every packet with TTL / Hop Limit 50.
        # (the veth existed before the default changed: set its own IPv6 hop limit too)
        _ns(snd, "sysctl", "-qw", f"net.ipv4.ip_default_ttl={SENDER_TTL}",
            f"net.ipv6.conf.default.hop_limit={SENDER_TTL}", f"net.ipv6.conf.xt{tag}s.hop_limit={SENDER_TTL}")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        for ns in (snd, rtr, rfl):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create namespaces: {e}")
    yield snd, rfl
    for ns in (snd, rtr, rfl):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _xwamp(ns: str, *args: str, background: bool = False):
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "agent", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if background:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_sender_ttl_is_the_received_ttl_after_one_hop(routed_namespaces) -> None:
    snd, rfl = routed_namespaces
    srv = _xwamp(rfl, "server", "--protocol", "twamp", "--duration", "60", background=True)
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        assert "TWAMP" in line, srv.stderr.read() if srv.stderr else ""
        for host in ("10.78.2.2", "fd78:2::2"):
            r = _xwamp(snd, "ping", host, "-c", "3", "-i", "0.05", "--wait", "2", "--json")
            assert r.returncode == 0, r.stderr
            doc = json.loads(r.stdout)
            assert doc["summary"]["loss"]["received"] == 3, host
            for rec in doc["records"]:
                assert rec["sender_ttl"] == 255 - 1, (host, rec)  # what the reflector received
                assert rec["reply_ttl"] == 255 - 1, (host, rec)  # the reflector sends 255 too, one hop
    finally:
        srv.terminate()
        srv.wait(10)
