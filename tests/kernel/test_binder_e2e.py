"""The key binder end to end on a real kernel: TWAMP between two namespaces over an ESP
tunnel whose keys were derived the way IKEv2 derives a CHILD_SA's (RFC 7296 §2.17),
keyed from the live SAs (docs/wire-format.md), following a rekey and a deletion (§5).

Server in namespace B (10.77.2.1), client in A (10.77.1.1): each side runs on an
asyncio loop in a thread that setns(2)-ed into its namespace (agent.sessions.netns_loop.NetnsLoop),
with netlink's TableFollower (via agent.sessions.bound.XfrmFollower) keeping its SA table and
policies current from XFRM notifications. Control and
test traffic go between the inner addresses, so they ride the tunnel's SAs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from agent.binder.announce import BinderConfig
from agent.sessions.bound import BinderRuntime, XfrmFollower
from agent.sessions.bound_measurement import BoundTwampMeasurement
from agent.sessions.bound_server import BoundTwampServer
from agent.sessions.netns_loop import NetnsLoop
from netlink.client import XfrmClient
from netlink.records import Proto
from netlink.secret import Secret
from tests.tampering import TamperedGreeting

LAB = Path(__file__).resolve().parents[2] / "tools" / "lab" / "tunnel.sh"
PREFIX = "xwbe"
A, B = f"{PREFIX}-a", f"{PREFIX}-b"
OA, OB = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
IA, IB = ipaddress.ip_address("10.77.1.1"), ipaddress.ip_address("10.77.2.1")
SPI_AB, SPI_BA = 0xA0B00001, 0xB0A00001  # tunnel.sh defaults
SPI_AB2, SPI_BA2 = 0xA0B00002, 0xB0A00002
REQID = 7

# Known IKE material: SK_d of the IKE SA and the nonces of the exchange that made the CHILD_SA.
SK_D = hashlib.sha256(b"xwamp e2e SK_d").digest()
NI, NR = hashlib.sha256(b"Ni").digest()[:16], hashlib.sha256(b"Nr").digest()[:24]
NI2, NR2 = hashlib.sha256(b"Ni rekey").digest(), hashlib.sha256(b"Nr rekey").digest()[:20]


def prf_plus(key: bytes, seed: bytes, n: int) -> bytes:
    """RFC 7296 §2.13 with PRF_HMAC_SHA2_256: T1 = prf(K, S|0x01), Tn = prf(K, Tn-1|S|n)."""
    out, t, i = b"", b"", 1
    while len(out) < n:
        h = HMAC(key, hashes.SHA256())
        h.update(t + seed + bytes([i]))
        t = h.finalize()
        out += t
        i += 1
    return out[:n]


def child_keys(ni: bytes, nr: bytes) -> tuple[bytes, list[str]]:
    """KEYMAT = prf+(SK_d, Ni | Nr) (RFC 7296 §2.17, no PFS), sliced for ESP
    cbc(aes)-128 + hmac(sha256): initiator->responder SA first (A is the initiator),
    each SA's encryption key before its integrity key."""
    km = prf_plus(SK_D, ni + nr, 2 * (16 + 32))
    return km, [km[0:16].hex(), km[16:48].hex(), km[48:64].hex(), km[64:96].hex()]


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30).stdout


def add_sa(ns: str, src, dst, spi: int, enc: str, auth: str) -> None:
    ip("-n", ns, "xfrm", "state", "add", "src", str(src), "dst", str(dst), "proto", "esp", "spi", hex(spi),
       "reqid", str(REQID), "mode", "tunnel", "replay-window", "32", "enc", "cbc(aes)", "0x" + enc,
       "auth-trunc", "hmac(sha256)", "0x" + auth, "128", "sel", "src", "0.0.0.0/0", "dst", "0.0.0.0/0")


def del_sa(ns: str, src, dst, spi: int) -> None:
    ip("-n", ns, "xfrm", "state", "delete", "src", str(src), "dst", str(dst), "proto", "esp", "spi", hex(spi))


def counters(ns: str, daddr, spi: int) -> tuple[int, int]:
    """(bytes, packets) of an SA, read from the kernel with netlink."""
    with XfrmClient(netns=ns) as xc:
        sa = xc.get_sa(daddr, spi, Proto.ESP)
    assert sa is not None, f"no SA 0x{spi:08x} in {ns}"
    return sa.current.bytes, sa.current.packets


def wait_until(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


class Side:
    """One namespace: its loop, follower (SA table + policies) and binder runtime."""

    def __init__(self, ns: str) -> None:
        self.loop = NetnsLoop(ns).start()
        self.follower = XfrmFollower(ns)
        self.runtime: BinderRuntime | None = None
        self.server: BoundTwampServer | None = None

    async def up(self, serve: bool) -> None:
        await self.follower.start()
        # grace 1 s: long enough for a make-before-break rekey, short for the deletion test
        self.runtime = BinderRuntime.following(self.follower, config=BinderConfig(allow_alt2=True), grace=1.0)
        self.runtime.start(0.1)
        if serve:
            self.server = BoundTwampServer(self.runtime, str(IB))
            await self.server.start()

    async def down(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.runtime is not None:
            await self.runtime.close()
        await self.follower.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    keymat, keys = child_keys(NI, NR)
    kf = tmp_path_factory.mktemp("lab") / "keys"
    kf.write_text(" ".join(keys) + "\n")
    kf.chmod(0o600)
    subprocess.run([str(LAB), "up", PREFIX], check=True, capture_output=True, timeout=60,
                   env=dict(os.environ, XWAMP_LAB_KEYS=str(kf)))
    client, server = Side(A), Side(B)
    try:
        server.loop.run(server.up(True), 60)
        client.loop.run(client.up(False), 60)
        yield client, server, keymat
    finally:
        for s in (client, server):
            try:
                s.loop.run(s.down(), 30)
            finally:
                s.loop.close()
        subprocess.run([str(LAB), "down", PREFIX], capture_output=True, timeout=60)


def measure(client: Side, server: Side, **kw) -> BoundTwampMeasurement:
    assert server.server is not None and client.runtime is not None
    return BoundTwampMeasurement(client.runtime, str(IB), server.server.port, timeout=30, **kw)


def keymat_seen(client: Side, server: Side) -> tuple[Secret, Secret, tuple[int, int]]:
    """KEYMAT as each side's binder rebuilds it from its own kernel's SAs for the inner
    connection 10.77.1.1 -> 10.77.2.1 (server announces, client validates)."""
    async def announce():
        return server.runtime.binder.announce(IB, IA)

    b = server.loop.run(announce(), 30)

    async def accept():
        return client.runtime.binder.accept(b.announcement.pack(), IA, IB)

    a = client.loop.run(accept(), 30)
    return a.root(), b.root(), (a.c2s.spi, a.s2c.spi)


def test_modes_counters_keymat_and_bad_greetings(lab) -> None:
    client, server, keymat = lab
    t0 = time.monotonic()
    # KEYMAT rebuilt from the live SAs = the prefix of prf+(SK_d, Ni|Nr) IPsec used (wire-format §3)
    a_root, b_root, spis = keymat_seen(client, server)
    assert spis == (SPI_AB, SPI_BA)
    assert a_root == Secret(keymat) and b_root == Secret(keymat)

    for wanted, bit in (("auth+ipsec-bound", 1 << 31), ("enc+ipsec-alt1", 1 << 30), ("auth+ipsec-alt2", 1 << 29),
                        ("unauth+ipsec-bound", 1 << 31)):
        before_ab, before_ba = counters(A, OB, SPI_AB), counters(A, OA, SPI_BA)
        meas = measure(client, server, wanted=[wanted], count=8, interval=0.1, wait=2.0)
        res = client.loop.run(meas.run(), 120)
        assert res.stop_reason is None, (wanted, res)
        assert res.sent == 8 and res.replies >= 6 and res.bad_hmac == 0, (wanted, res)
        leg = res.legs[0]
        assert leg.mode & bit and (leg.spi_c2s, leg.spi_s2c) == (SPI_AB, SPI_BA), (wanted, leg)
        after_ab, after_ba = counters(A, OB, SPI_AB), counters(A, OA, SPI_BA)
        # every test packet and control segment went out in ESP SA a->b and came back in b->a
        assert after_ab[1] - before_ab[1] >= res.sent and after_ba[1] - before_ba[1] >= res.replies, wanted
        assert after_ab[0] > before_ab[0] and after_ba[0] > before_ba[0]
        print(f"{wanted}: {res.replies}/{res.sent} replies, rtt {res.rtt}, "
              f"SA a->b +{after_ab[1] - before_ab[1]} packets, b->a +{after_ba[1] - before_ba[1]}")

    # A greeting naming a wrong SPI or another protocol: the client closes, no session is made.
    for tamper, reason in ((dict(spi_delta=1), "no_sa"), (dict(proto=51), "no_sa")):
        async def start_tampered():
            srv = BoundTwampServer(server.runtime, str(IB),
                                   key_source=TamperedGreeting(server.runtime.key_source, **tamper))
            await srv.start()
            return srv

        bad = server.loop.run(start_tampered(), 30)
        try:
            refused_before = client.runtime.binder.refusals[reason]
            meas = BoundTwampMeasurement(client.runtime, str(IB), bad.port, wanted=["auth+ipsec-bound"], count=3,
                                         timeout=30)
            res = client.loop.run(meas.run(), 60)
            assert res.stop_reason == reason and res.sent == 0 and res.legs == [], res
            assert client.runtime.binder.refusals[reason] == refused_before + 1
            # the server saw one connection that never completed set-up and was closed by the client
            wait_until(lambda: bad.connections and bad.connections[-1].end is not None, 30, "server-side close")
            assert [(c.mode, c.sessions, c.end) for c in bad.connections] == [(0, 0, "closed")], bad.connections
        finally:
            server.loop.run(bad.close(), 30)
    print(f"modes + bad greetings: {time.monotonic() - t0:.1f}s")


def test_rekey_then_deletion_mid_session(lab) -> None:
    client, server, _ = lab
    t0 = time.monotonic()
    meas = measure(client, server, wanted=["enc+ipsec-alt1"], duration=600, interval=0.1, wait=1.0,
                   rebind_timeout=20)
    fut = client.loop.submit(meas.run())
    try:
        wait_until(lambda: meas.result.replies >= 5, 60, "first replies")
        # CHILD_SA rekey (RFC 7296 §2.8, make-before-break): new nonces -> new KEYMAT, new SPIs,
        # same reqid; install both directions on both ends, then delete the old SAs.
        keymat2, k2 = child_keys(NI2, NR2)
        for ns in (A, B):
            add_sa(ns, OA, OB, SPI_AB2, k2[0], k2[1])
            add_sa(ns, OB, OA, SPI_BA2, k2[2], k2[3])
        for ns in (A, B):
            del_sa(ns, OA, OB, SPI_AB)
            del_sa(ns, OB, OA, SPI_BA)
        wait_until(lambda: len(meas.result.legs) >= 2 and meas.result.legs[-1].replies >= 5, 90, "rebound leg")
        r = meas.result
        assert r.rekeys == 1 and client.runtime.rekeys >= 1 and r.legs[0].end == "rebind"
        assert (r.legs[-1].spi_c2s, r.legs[-1].spi_s2c) == (SPI_AB2, SPI_BA2)
        assert r.legs[0].replies >= 5 and r.replies == sum(leg.replies for leg in r.legs)  # carried on
        a_root, b_root, spis = keymat_seen(client, server)
        assert spis == (SPI_AB2, SPI_BA2) and a_root == Secret(keymat2) and b_root == Secret(keymat2)
        sent = r.legs[-1].sent  # read before the kernel's counter, which can only be ahead
        assert counters(A, OB, SPI_AB2)[1] >= sent
        t_rekey = time.monotonic() - t0
        # The CHILD_SA is deleted with no successor: after the grace period the session stops.
        for ns in (A, B):
            del_sa(ns, OA, OB, SPI_AB2)
            del_sa(ns, OB, OA, SPI_BA2)
        res = fut.result(60)
    finally:
        if not fut.done():
            client.loop.loop.call_soon_threadsafe(meas.stop)
            fut.result(60)
    assert res.stop_reason == "sa_deleted" and f"spi_c2s=0x{SPI_AB2:08x}" in res.stop_detail, res
    assert res.legs[-1].end == "sa_deleted" and res.rekeys == 1
    # The server stops its side when its own kernel's SA goes (its grace period started
    # with the deletion in B, a moment after A's).
    wait_until(lambda: server.server.connections[-1].end is not None, 30, "server-side stop")
    old, new = server.server.connections[-2:]
    # The old connection ends "rebind" if the server's kernel lost the old SA before the
    # client hung up, else "closed" (the client's Stop-Sessions came first): both fine.
    assert old.spi_c2s == SPI_AB and old.end in ("rebind", "closed"), old
    assert old.client_stop == 0, old  # §5: Stop-Sessions Accept=0, then re-established on the new SAs
    assert new.spi_c2s == SPI_AB2 and new.end == "sa_deleted" and "0xa0b00002" in new.detail, new
    print(f"rekey: {res.replies}/{res.sent} replies over {len(res.legs)} legs, rekeyed after {t_rekey:.1f}s, "
          f"stopped ({res.stop_reason}) after {time.monotonic() - t0:.1f}s")
