"""A real IKEv2 tunnel (tools/lab/strongswan.sh): two charon instances in two network
namespaces negotiate ESP SAs into the kernel; traffic moves their counters, and a
CHILD_SA rekey replaces the SPI pair while keeping the reqid.

The VM is slow (Python 20-30x), so this is one lab bring-up doing the whole story,
plus one certificate bring-up. Everything else is shell and iproute2."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "tools" / "lab" / "strongswan.sh"
OA, OB, IA, IB = "192.0.2.1", "192.0.2.2", "10.77.1.1", "10.77.2.1"

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not shutil.which("swanctl") or not os.path.exists("/usr/lib/ipsec/charon"),
                       reason="strongSwan missing: apt-get install strongswan-charon strongswan-swanctl"),
]


def lab(*args: str, **env: str) -> str:
    r = subprocess.run([str(LAB), *args], capture_output=True, text=True,
                       env={**os.environ, "XWAMP_LAB_TRACE": "1", **env}, timeout=180)
    assert r.returncode == 0, f"strongswan.sh {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    print(r.stderr, end="")  # the step timings: shown with -s or on failure
    return r.stdout


def esp_states(ns: str) -> dict[int, dict]:
    """SPI -> {src, dst, reqid, packets} for every ESP SA in the namespace."""
    out = subprocess.run(["ip", "-n", ns, "-s", "xfrm", "state"], check=True,
                         capture_output=True, text=True).stdout
    sas = {}
    for block in re.split(r"\n(?=src )", out.strip()):
        # -s adds "(decimal)" after each number
        m = re.match(r"src (\S+) dst (\S+)\s+proto esp spi (0x[0-9a-f]+)(?:\(\d+\))? reqid (\d+)", block)
        if not m:
            continue
        pk = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", block)
        assert pk, block
        sas[int(m.group(3), 16)] = {"src": m.group(1), "dst": m.group(2), "reqid": int(m.group(4)),
                                    "packets": int(pk.group(2))}
    return sas


def assert_pair(a: dict, b: dict) -> tuple[int, int, int]:
    """Each side holds the same inbound/outbound pair with one reqid; returns (a->b SPI, b->a SPI, reqid)."""
    assert len(a) == 2 and len(b) == 2, (a, b)
    assert set(a) == set(b), "both ends must hold the same two SPIs"
    ab = [s for s, v in a.items() if (v["src"], v["dst"]) == (OA, OB)]
    ba = [s for s, v in a.items() if (v["src"], v["dst"]) == (OB, OA)]
    assert len(ab) == 1 and len(ba) == 1, a
    reqids = {v["reqid"] for v in a.values()}
    assert len(reqids) == 1 and reqids == {v["reqid"] for v in b.values()}, (a, b)
    return ab[0], ba[0], reqids.pop()


def ping(ns: str, src: str, dst: str, n: int = 3) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", str(n), "-i", "0.2", "-W", "5", "-I", src, dst],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture
def psk_lab():
    # The key log also lets the same bring-up check the IKE key-source export.
    out = lab("up", "xss", XWAMP_LAB_KEYLOG="1")
    print(out)
    yield "xss-a", "xss-b"
    lab("down", "xss")


def test_ikev2_psk_tunnel_traffic_and_rekey(psk_lab):
    a, b = psk_lab
    ab, ba, reqid = assert_pair(esp_states(a), esp_states(b))

    ping(a, IA, IB, 3)
    sa_a, sa_b = esp_states(a), esp_states(b)
    assert sa_a[ab]["packets"] == 3  # echo requests, encrypted by A
    assert sa_b[ab]["packets"] == 3  # and decrypted by B
    assert sa_b[ba]["packets"] == 3 and sa_a[ba]["packets"] == 3  # the replies, the other way

    # The IKE key-source export: SK_d and the CHILD_SA nonces from charon's key log
    # rebuild exactly the ESP keys the kernel holds (RFC 7296 §2.17, no PFS): first for
    # the CHILD_SA made in IKE_AUTH (IKE_SA_INIT nonces), then for the rekeyed one.
    check_keysource(Path(lab("keys", "xss").strip().splitlines()[-1]), a, [(ab, ba)])

    print(lab("rekey", "xss"))
    new_a, new_b = esp_states(a), esp_states(b)
    ab2, ba2, reqid2 = assert_pair(new_a, new_b)
    assert {ab2, ba2}.isdisjoint({ab, ba}), "a rekey must install new SPIs and remove the old ones"
    assert reqid2 == reqid, "strongSwan keeps the reqid across a CHILD_SA rekey"
    ping(b, IB, IA, 2)
    assert esp_states(b)[ba2]["packets"] == 2 and esp_states(a)[ba2]["packets"] == 2

    check_keysource(Path(lab("keys", "xss").strip().splitlines()[-1]), a, [(ab2, ba2)])


def check_keysource(keyfile: Path, ns: str, pairs) -> None:
    from agent.binder import ikev2
    from agent.binder.keysource import FileIKEKeySource

    src = FileIKEKeySource(keyfile)
    out = subprocess.run(["ip", "-n", ns, "xfrm", "state"], check=True, capture_output=True, text=True).stdout
    keys = {}
    for block in re.split(r"\n(?=src )", out.strip()):
        m = re.search(r"spi (0x[0-9a-f]+)", block)
        enc = re.search(r"enc cbc\(aes\) 0x([0-9a-f]+)", block)
        auth = re.search(r"auth-trunc hmac\(sha256\) 0x([0-9a-f]+)", block)
        assert m and enc and auth, block
        keys[int(m.group(1), 16)] = bytes.fromhex(enc.group(1)) + bytes.fromhex(auth.group(1))
    for ab, ba in pairs:
        mat = src.by_child_spis(ab, ba)
        assert mat is not None and mat.sk_d is not None, f"no key-source entry for {ab:08x}/{ba:08x}"
        # KEYMAT = SK_ei | SK_ai | SK_er | SK_ar; A initiated, so i->r is the a->b SA.
        km = ikev2.child_keymat(mat.sk_d, mat.child.ni, mat.child.nr, 2 * (16 + 32), alg=mat.prf)
        assert km[:48] == keys[ab] and km[48:] == keys[ba]


@pytest.fixture
def cert_lab():
    out = lab("up", "xsc", XWAMP_LAB_AUTH="cert")
    print(out)
    yield "xsc-a", "xsc-b"
    lab("down", "xsc")


def test_ikev2_certificate_tunnel(cert_lab):
    a, b = cert_lab
    assert_pair(esp_states(a), esp_states(b))
    sas = lab("status", "xsc")
    assert "ESTABLISHED" in sas and "INSTALLED" in sas
