"""`xwamp doctor` on a real kernel: an SA in a namespace is seen as readable, keys not redacted."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.kernel
def test_xfrm_sa_visible_in_a_namespace():
    ns = f"xwts-d-{secrets.token_hex(3)}"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        add = subprocess.run(["ip", "-n", ns, "xfrm", "state", "add", "src", "10.9.0.1", "dst", "10.9.0.2",
                              "proto", "esp", "spi", "0x1000", "reqid", "1", "mode", "tunnel",
                              "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128"], capture_output=True, text=True)
        assert add.returncode == 0, add.stderr
        # doctor's kernel-stamp self-test runs on lo: a fresh namespace has it down.
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "agent", "doctor", "lo", "--json"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        x = json.loads(r.stdout)["xfrm"]
        assert x["readable"] is True and x["sa_count"] == 1
        if x.get("lockdown") != "confidentiality":
            assert x["keys"] in ("visible", "unknown")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
