"""Full sessions between two network namespaces this test creates (veth pair, IPv4 and
IPv6): ``xwamp server`` runs in one, ``xwamp ping`` / ``xwamp owping`` in the other,
as the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 to create network namespaces")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def netns_pair(tmp_path_factory):
    tag = secrets.token_hex(3)
    a, b = f"xwc-{tag}-s", f"xwc-{tag}-c"
    va, vb = f"xwc{tag}s", f"xwc{tag}c"
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, dev, v4, v6 in ((a, va, "10.77.0.1/24", "fd77::1/64"), (b, vb, "10.77.0.2/24", "fd77::2/64")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", v4, "dev", dev)
            _ip("-n", ns, "addr", "add", v6, "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create namespaces: {e}")
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("alice netns passphrase\n")
    keys.chmod(0o600)
    yield a, b, keys
    for ns in (a, b):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _xwamp(ns: str, *args: str, timeout: float = 30, background: bool = False):
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "agent", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if background:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(netns_pair):
    a, b, keys = netns_pair
    p = _xwamp(a, "server", "--keyfile", str(keys), "--mode", "unauth", "--mode", "auth", "--mode", "enc",
               "--mode", "mixed", "--count", "1024",
               "--duration", "60", background=True)
    assert p.stdout is not None
    lines: list[str] = []
    while not any("OWAMP" in ln for ln in lines):  # TWAMP listeners are announced first
        ln = p.stdout.readline()
        assert ln, f"server exited: {p.stderr.read() if p.stderr else ''}"
        lines.append(ln)
    yield netns_pair
    p.terminate()
    p.wait(10)


@pytest.mark.parametrize("host", ["10.77.0.1", "fd77::1"])
@pytest.mark.parametrize("mode", ["unauth", "enc"])
def test_ping_across_namespaces(server, host: str, mode: str) -> None:
    _, b, keys = server
    r = _xwamp(b, "ping", host, "-c", "3", "-i", "0.02", "--wait", "1", "--mode", mode,
               "--keyfile", str(keys), "--user", "alice", "--json", "--dscp", "46")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == mode and doc["summary"]["loss"]["received"] == 3
    assert all(rec["sender_ttl"] == 64 or rec["sender_ttl"] == 255 for rec in doc["records"])


@pytest.mark.parametrize("host", ["10.77.0.1", "fd77::1"])
def test_owping_across_namespaces(server, host: str) -> None:
    _, b, keys = server
    r = _xwamp(b, "owping", host, "-c", "3", "-i", "0.02", "--wait", "1", "--mode", "auth",
               "--keyfile", str(keys), "--user", "alice", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["forward"]["received"] == 3 and doc["reverse"]["received"] == 3


def test_wrong_passphrase_across_namespaces(server, tmp_path) -> None:
    _, b, _ = server
    bad = tmp_path / "bad"
    bad.write_text("alice wrong\n")
    bad.chmod(0o600)
    r = _xwamp(b, "ping", "10.77.0.1", "-c", "1", "--mode", "auth", "--keyfile", str(bad), "--user", "alice")
    assert r.returncode == 1 and "refused" in r.stderr
    time.sleep(0)  # nothing to clean up: the server keeps serving (other tests use it)
