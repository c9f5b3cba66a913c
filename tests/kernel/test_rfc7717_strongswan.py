"""RFC 7717 keyed from a real IKE SA: strongSwan negotiates the tunnel (tools/lab/strongswan.sh),
charon's key log gives SK_d (tools/lab/charon-keys -> the IKE key-source JSON), and `xwamp
server --ike-keys` in one namespace and `xwamp ping --ike-keys` in the other measure through
the tunnel in auth+rfc7717, with nothing else configured (no passphrase, no --ipsec).

Mid-session the IKE SA is rekeyed (new SPIs, new SK_d, the old IKE SA deleted): the session
keeps its key and runs to the end, as RFC 7717 §5.1 requires ("the corresponding shared
secret key generated from the SA MUST continue to be used until the O/TWAMP session
terminates"). Afterwards a new session keys from the new IKE SA, and a client still naming
the old SPIs gets Server-Start Accept = 6 (§5.3)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "tools" / "lab" / "strongswan.sh"
P = "x77"
A, B = f"{P}-a", f"{P}-b"
IA, IB = "10.77.1.1", "10.77.2.1"
PORT = 8862

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not shutil.which("swanctl") or not os.path.exists("/usr/lib/ipsec/charon"),
                       reason="strongSwan missing: apt-get install strongswan-charon strongswan-swanctl"),
]


def lab(*args: str, **env: str) -> str:
    r = subprocess.run([str(LAB), *args], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=300)
    assert r.returncode == 0, f"strongswan.sh {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def ike_spis(keyfile: Path) -> set[tuple[str, str]]:
    doc = json.loads(keyfile.read_text())
    return {(e["spi_i"], e["spi_r"]) for e in doc["ike_sas"]}


def live_ike_spis() -> set[tuple[str, str]]:
    """(SPIi, SPIr) of the IKE SAs node a's charon holds now."""
    out = lab("swanctl", "a", P, "--", "--list-sas")
    return set(re.findall(r"IKEv2, ([0-9a-f]{16})_i\*? ([0-9a-f]{16})_r", out))


def diagnostics() -> str:
    """charon's key-log lines that are not key material (headers, IKE events), and list-sas."""
    state = Path(os.environ.get("XWAMP_LAB_STATE", "/tmp/xwamp-lab")) / P / "a"
    out = []
    for name in ("keys.log", "list-sas.txt"):
        f = state / name
        if f.exists():
            keep = [ln for ln in f.read_text(errors="replace").splitlines()
                    if name != "keys.log" or ("=>" in ln or "IKE_SA" in ln or "CHILD_SA" in ln)]
            out.append(f"--- {name}\n" + "\n".join(keep[-60:]))
    return "\n".join(out)


def snapshot(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    dst.chmod(0o600)
    return dst


def xwamp(ns: str, *args: str, background: bool = False):
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "agent", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if background:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def tunnel(tmp_path):
    lab("up", P, XWAMP_LAB_KEYLOG="1", XWAMP_LAB_WAIT="300")
    try:
        yield tmp_path
    finally:
        subprocess.run([str(LAB), "down", P], timeout=120)


def test_rfc7717_from_strongswan_survives_ike_rekey(tunnel) -> None:
    tmp = tunnel
    live = Path(lab("keys", P).strip().splitlines()[-1])  # rewritten in place by `keys` (rename)
    old = snapshot(live, tmp / "old.json")
    (first,) = ike_spis(old)
    srv = xwamp(B, "server", "--protocol", "twamp", "--listen", IB, "--twamp-port", str(PORT),
                "--ike-keys", str(live), "--mode", "auth", "--count", "1024", "--duration", "900",
                background=True)
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        assert "TWAMP" in line and "rfc7717" in line, srv.stderr.read() if srv.stderr else line

        # The client keys from its own copy: the file it read when the session began.
        n = 40
        cli = xwamp(A, "ping", IB, "--port", str(PORT), "--source", IA, "--ike-keys", str(old),
                    "-c", str(n), "-i", "0.5", "--wait", "10", "--timeout", "120", "--json", background=True)
        # Rekey the IKE SA once the session is under way (its test packets are flowing).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and cli.poll() is None:
            st = subprocess.run(["ip", "-n", A, "-s", "xfrm", "state"], capture_output=True, text=True).stdout
            if any(int(x) >= 3 for x in re.findall(r"(\d+)\(packets\)", st)):
                break
            time.sleep(0.5)
        assert cli.poll() is None, "the session ended before the rekey: " + (cli.stderr.read() if cli.stderr else "")
        lab("swanctl", "a", P, "--", "--rekey", "--ike", "xwamp")
        # The rekey is done (the old IKE SA gone from charon) while the session still runs.
        deadline = time.monotonic() + 120
        while first in live_ike_spis():
            assert time.monotonic() < deadline, "charon did not replace the IKE SA"
            time.sleep(0.5)
        assert cli.poll() is None, "the session ended before the IKE rekey completed"
        out, err = cli.communicate(timeout=900)
        assert cli.returncode == 0, err
        doc = json.loads(out)
        assert doc["mode"] == "auth+rfc7717"
        assert doc["summary"]["loss"]["received"] == n, doc["summary"]

        # The rekey gave the IKE SA new SPIs (and SK_d): the key source follows it...
        deadline = time.monotonic() + 120
        while True:
            r = subprocess.run([str(LAB), "keys", P], capture_output=True, text=True, timeout=300)
            new = ike_spis(live) if r.returncode == 0 else set()
            if new and first not in new:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"no key-source entry for the rekeyed IKE SA ({new}): {r.stderr}\n" + diagnostics())
            time.sleep(2)
        r = xwamp(A, "ping", IB, "--port", str(PORT), "--source", IA, "--ike-keys", str(live),
                  "-c", "3", "-i", "0.2", "--wait", "5", "--timeout", "120", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["mode"] == "auth+rfc7717"
        # ... and a client still naming the deleted IKE SA is told so (Accept = 6, §5.3).
        r = xwamp(A, "ping", IB, "--port", str(PORT), "--source", IA, "--ike-keys", str(old), "-c", "1",
                  "--timeout", "120")
        assert r.returncode == 1 and "no IKEv2 SA" in r.stderr, r.stderr
    finally:
        srv.terminate()
        try:
            _, err = srv.communicate(timeout=60)
            print("--- server stderr\n" + err[-3000:])
        except subprocess.TimeoutExpired:
            srv.kill()
