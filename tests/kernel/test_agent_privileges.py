"""The agent on the lab tunnel (tools/lab/tunnel.sh), as it runs in production: not root,
with only CAP_NET_ADMIN (read SAs with their keys, policies, XFRM events), CAP_NET_RAW
and CAP_NET_BIND_SERVICE (TCP 862). Root makes the namespace and enters it first, then
setpriv drops to nobody with those three as ambient capabilities.

One VM test for two things (VM time is dear): the privileges, and the daemon end to end:
two agents discover the tunnel, measure it in auth+ipsec-bound keyed from the SA, serve
metrics that prometheus_client's parser reads, agree with themselves and with the kernel's
SA counters, and exit 0 on SIGTERM after Stop-Sessions."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "tools" / "lab" / "tunnel.sh"
P = "xpv"
INNER = {"a": "10.77.1.1", "b": "10.77.2.1"}
CAPS = "+net_admin,+net_raw,+net_bind_service"
CAP_BITS = (1 << 12) | (1 << 13) | (1 << 10)  # linux/capability.h: NET_ADMIN, NET_RAW, NET_BIND_SERVICE

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("curl"),
                       reason="needs root, setpriv and curl"),
]

CONFIG = """
[agent]
log_level = "info"
sa_refresh_interval = 2.0
[server]
listen = ["{inner}"]
[exporter]
listen = "{inner}"
port = 9862
[discovery]
enabled = true
mode = ["auth+ipsec-bound"]
interval = 0.1
count = 10
"""


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def _scrape(node: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", f"{P}-{node}", "curl", "-sf", "--max-time", "20",
                        f"http://{INNER[node]}:9862/metrics"], capture_output=True, text=True, timeout=60)
    return r.stdout if r.returncode == 0 else ""


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _one(samples: dict, metric: str, /, **labels: str) -> float:
    got = [v for (n, lb), v in samples.items() if n == metric and all((k, v2) in lb for k, v2 in labels.items())]
    assert len(got) == 1, (metric, labels, got)
    return got[0]


def _sum(samples: dict, metric: str, /, **labels: str) -> float:
    return sum(v for (n, lb), v in samples.items() if n == metric and all((k, v2) in lb for k, v2 in labels.items()))


def _world_executable(path: str) -> bool:
    """Can any user run this interpreter? (Not when it lives under /root, as with pyenv.)"""
    real = Path(os.path.realpath(path))
    return bool(real.stat().st_mode & 0o001) and all(p.stat().st_mode & 0o001 for p in real.parents)


def _esp_packets(ns: str, src: str, dst: str) -> int:
    import re

    out = subprocess.run(["ip", "-n", ns, "-s", "xfrm", "state", "get", "src", src, "dst", dst, "proto", "esp",
                          "spi", "0xa0b00001" if src == "192.0.2.1" else "0xb0a00001"],
                         check=True, capture_output=True, text=True).stdout
    return int(re.search(r"lifetime current:\s*\n\s*\d+\(bytes\), (\d+)\(packets\)", out).group(1))


@pytest.fixture(scope="module")
def agents():
    # Not pytest's tmp_path: /tmp/pytest-of-root is 0700 and nobody must read the config.
    d = Path(tempfile.mkdtemp(prefix="xwamp-priv-", dir="/tmp"))
    os.chmod(d, 0o755)
    subprocess.run([str(LAB), "up", P], check=True, capture_output=True)
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    try:
        for n in ("a", "b"):
            conf = d / f"{n}.toml"
            conf.write_text(CONFIG.format(inner=INNER[n]))
            os.chmod(conf, 0o644)
            logs[n] = d / f"{n}.log"
            with open(logs[n], "w") as log:  # opened by root: nobody needs no writable directory
                procs[n] = subprocess.Popen(
                    ["ip", "netns", "exec", f"{P}-{n}", "setpriv", "--reuid=nobody", "--regid=nogroup",
                     "--clear-groups", f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}",
                     sys.executable, "-m", "agent", "agent", "--config", str(conf)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                    env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"})
        yield procs, logs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for n, p in procs.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            print(f"--- agent {n}\n" + "\n".join(logs[n].read_text().splitlines()[-20:]))
        subprocess.run([str(LAB), "down", P])
        shutil.rmtree(d, ignore_errors=True)


def test_unprivileged_agents_measure_the_tunnel_end_to_end(agents):
    procs, logs = agents
    esp_before = _esp_packets(f"{P}-a", "192.0.2.1", "192.0.2.2")
    # 1. Privileges: not root, exactly the three capabilities effective.
    for n, p in procs.items():
        deadline = time.monotonic() + 60
        while "python" not in Path(f"/proc/{p.pid}/comm").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)  # `ip netns exec` and setpriv exec into the agent under the same pid
        st = _status(p.pid)
        assert st["Uid"].split()[:2] == ["65534", "65534"] and st["Gid"].split()[0] == "65534", st
        assert st["Groups"].strip() == ""
        assert int(st["CapEff"], 16) == CAP_BITS and int(st["CapAmb"], 16) == CAP_BITS, st
    # 2. Both discovered the tunnel and measured a few cycles (the VM is slow).
    texts: dict[str, str] = {}
    deadline = time.monotonic() + 300
    for n in ("a", "b"):
        while True:
            assert procs[n].poll() is None, f"agent {n} exited {procs[n].returncode}:\n{logs[n].read_text()[-3000:]}"
            texts[n] = _scrape(n)
            if texts[n] and _sum(_samples(texts[n]), "xwamp_cycles_total") >= 2:
                break
            assert time.monotonic() < deadline, f"agent {n} measured nothing:\n{texts[n][-2000:]}\n" \
                                                f"{logs[n].read_text()[-3000:]}"
            time.sleep(2)
    early = {n: _sum(_samples(t), "xwamp_packets_sent_total") for n, t in texts.items()}
    time.sleep(5)  # > sa_refresh_interval: the SA counters (re-dumped) cover those packets
    texts = {n: _scrape(n) for n in ("a", "b")}
    peer = {"a": "b", "b": "a"}
    for n, text in texts.items():
        s = _samples(text)
        lbl = {"name": "192.0.2.2/7" if n == "a" else "192.0.2.1/7", "peer": INNER[peer[n]], "reqid": "7"}
        # keyed from the SA: the agent read the SA's keys (CAP_NET_ADMIN) and its policy
        assert _one(s, "xwamp_session_sa_keyed", **lbl) == 1.0
        assert _one(s, "xwamp_session_sa_bound", **lbl) == 1.0
        assert _one(s, "xwamp_session_up", **lbl) == 1.0
        assert _sum(s, "xwamp_binder_refusals_total") == 0
        # at most a retry or two at start-up, while the peer's server was not listening yet
        assert _sum(s, "xwamp_session_restarts_total") <= 3
        # the reflector on TCP 862 (CAP_NET_BIND_SERVICE) served the peer's sessions
        assert _one(s, "xwamp_server_connections_accepted_total") >= 1
        # the metrics agree with each other: every cycle is 10 packets, each replied or lost
        sent = _one(s, "xwamp_packets_sent_total", **lbl)
        got = _one(s, "xwamp_packets_received_total", **lbl)
        lost = _sum(s, "xwamp_packets_lost_total", **lbl)
        cycles = _one(s, "xwamp_cycles_total", **lbl)
        assert sent == 10 * cycles and sent == got + lost and got >= sent - 2, (sent, got, lost)
        assert _one(s, "xwamp_rtt_seconds_count", **lbl) == got
        assert 0 < _one(s, "xwamp_rtt_seconds_sum", **lbl) / got < 1.0  # a sane mean RTT under TCG
        # ... and with the kernel: the test packets went through the tunnel's outbound SA
        assert _one(s, "xwamp_sa_packets_total", direction="out", **lbl) >= early[n] > 0
        info = [lb for (nm, lb), _ in s.items() if nm == "xwamp_sa_info" and ("direction", "out") in lb]
        assert info and ("mode", "tunnel") in info[0] and ("proto", "esp") in info[0], info
    assert _esp_packets(f"{P}-a", "192.0.2.1", "192.0.2.2") > esp_before
    # 3. SIGTERM: Stop-Sessions to the peer, exit status 0.
    for n in ("a", "b"):
        procs[n].send_signal(signal.SIGTERM)
    for n in ("a", "b"):
        assert procs[n].wait(60) == 0, logs[n].read_text()[-3000:]
        text = logs[n].read_text()
        assert '"agent stopped"' in text or "agent stopped" in text
        # Known, not this test's subject (agent/control/aio.py, reported): when both ends stop
        # at once, ControlListener's connection task can die of the peer's reset while
        # closing, after "agent stopped", and asyncio logs it as never retrieved.
        known = [x for x in text.splitlines() if "Task exception was never retrieved" in x
                 and "agent/control/aio.py" in x and "ConnectionResetError" in x]
        if known:
            print(f"note: agent {n}: known shutdown race in agent/control/aio.py (ConnectionResetError "
                  "in ControlListener._run while closing)")
        rest = "\n".join(x for x in text.splitlines() if x not in known)
        assert "Traceback" not in rest and "level=error" not in rest, rest[-3000:]
        # The exporter renders in a child process (same interpreter); as nobody that needs an
        # interpreter nobody may execute. Else it falls back to a thread, with a warning.
        if _world_executable(sys.executable):
            assert "render worker failed" not in text, text[-3000:]
        else:
            print(f"note: {os.path.realpath(sys.executable)} is not executable by nobody: "
                  "the exporter rendered in a thread")
