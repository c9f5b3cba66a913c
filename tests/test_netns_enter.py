"""Entering a network namespace for the whole process (``xwamp agent`` with agent.netns,
``--netns`` on the CLI): one setns(2) wrapper, which works on Python 3.11 too (os.setns
is 3.12+; the agent's own copy called it and died with AttributeError on 3.11)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2")


@pytest.fixture
def netns():
    name = f"xwne-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("entry", ["agent.daemon.supervisor.enter_netns", "agent.commands._runtime.enter_netns"])
def test_enter_moves_the_process(netns: str, entry: str) -> None:
    mod, _, fn = entry.rpartition(".")
    code = (f"import os, {mod} as m; before = os.stat('/proc/self/ns/net').st_ino; m.{fn}({netns!r}); "
            f"after = os.stat('/proc/self/ns/net').st_ino; "
            f"print(before != after, after == os.stat('/run/netns/{netns}').st_ino)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


def test_a_missing_namespace_is_a_clear_error() -> None:
    r = subprocess.run([sys.executable, "-c", "from netlink.netns import enter; enter('xwne-none')"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "network namespace 'xwne-none' not found" in r.stderr
