"""netlink/ against a real kernel with ESP/AH (run in the VM: tools/vm/run).

* SAs made by iproute2 read back field by field, with `ip -s xfrm state` as the oracle;
* after UDP through ESP between two namespaces, our counters == iproute2's, and
  the keys we read decrypt the ESP packets captured on the wire (scapy);
* notifications for add, update, soft expiry and delete, and a TableFollower
  that tracks them.

Every test builds its own namespaces (unique names) and removes them.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from netlink.client import XfrmClient
from netlink.constants import XFRM_INF
from netlink.events import EventKind
from netlink.monitor import TableFollower, XfrmMonitor
from netlink.netns import create_socket
from netlink.records import SA, Mode, Proto

pytestmark = pytest.mark.kernel

K_ENC = "0x" + "a1" * 16
K_AUTH256 = "0x" + "b2" * 32
K_GCM = "0x" + "c3" * 20  # 16-octet AES key + 4-octet salt (RFC 4106)
K_SHA1 = "0x" + "d4" * 20


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def ipx(ns: str, cmd: str) -> None:
    """One `ip xfrm ...` line, through -batch so quoting is iproute2's own."""
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=cmd + "\n", check=True, text=True, capture_output=True)


@pytest.fixture
def ns_pair() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth: A 10.200.0.1 / fd00:200::1, B .2 / ::2."""
    tag = uuid.uuid4().hex[:8]
    a, b = f"xwk{tag}a", f"xwk{tag}b"
    for ns in (a, b):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ip(a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        for ns, dev, n in ((a, "va", 1), (b, "vb", 2)):
            ip(ns, "link", "set", "lo", "up")
            ip(ns, "addr", "add", f"10.200.0.{n}/24", "dev", dev)
            ip(ns, "addr", "add", f"fd00:200::{n}/64", "dev", dev, "nodad")
            ip(ns, "link", "set", dev, "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False)


# --- iproute2's text as the oracle ---------------------------------------------


def parse_ip_s_xfrm_state(text: str) -> dict[int, dict]:
    """`ip -s xfrm state` -> {spi: fields}. Only what the tests compare."""
    out: dict[int, dict] = {}
    for block in re.split(r"^(?=src )", text, flags=re.M):
        if not block.strip():
            continue
        d: dict = {}
        m = re.match(r"src (\S+) dst (\S+)\n\s+proto (\w+) spi 0x([0-9a-f]+)\(\d+\) reqid (\d+)\(0x[0-9a-f]+\) mode (\S+)", block)
        assert m, block
        d["src"], d["dst"], d["proto"], spi, d["reqid"], d["mode"] = m.groups()
        d["reqid"] = int(d["reqid"])
        m = re.search(r"replay-window (\d+) seq 0x([0-9a-f]+) flag (.*?)\(0x([0-9a-f]+)\)", block)
        d["replay_window"], d["oseq"], d["flags"] = int(m.group(1)), int(m.group(2), 16), int(m.group(4), 16)
        d["algs"] = {}
        for kind, name, key, bits, extra in re.findall(r"^\s+(enc|auth|auth-trunc|aead) (\S+) 0x([0-9a-f]+) \((\d+) bits\)\s*(\d*)", block, re.M):
            d["algs"][name] = (bytes.fromhex(key), int(bits), int(extra) if extra else None)
        m = re.search(r"mark 0x([0-9a-f]+)/0x([0-9a-f]+)", block)
        d["mark"] = (int(m.group(1), 16), int(m.group(2), 16)) if m else None
        m = re.search(r"if_id 0x([0-9a-f]+)", block)
        d["if_id"] = int(m.group(1), 16) if m else None
        m = re.search(r"encap type (\S+) sport (\d+) dport (\d+)", block)
        d["encap"] = (m.group(1), int(m.group(2)), int(m.group(3))) if m else None
        m = re.search(r"sel src (\S+) dst (\S+)", block)
        d["sel"] = (m.group(1), m.group(2))

        def lim(s: str) -> int:
            return XFRM_INF if s == "(INF)" else int(s)

        m = re.search(r"limit: soft (\S+)\(bytes\), hard (\S+)\(bytes\)\s+limit: soft (\S+)\(packets\), hard (\S+)\(packets\)", block)
        d["limits"] = tuple(lim(x) for x in m.groups())
        m = re.search(r"expire add: soft (\d+)\(sec\), hard (\d+)\(sec\)\s+expire use: soft (\d+)\(sec\), hard (\d+)\(sec\)", block)
        d["expires"] = tuple(int(x) for x in m.groups())
        m = re.search(r"lifetime current:\s+(\d+)\(bytes\), (\d+)\(packets\)\s+add (\S+ \S+)", block)
        d["bytes"], d["packets"], d["add"] = int(m.group(1)), int(m.group(2)), m.group(3)
        m = re.search(r"stats:\s+replay-window (\d+) replay (\d+) failed (\d+)", block)
        d["stats"] = tuple(int(x) for x in m.groups())
        out[int(spi, 16)] = d
    return out


def assert_matches_iproute2(sa: SA, d: dict) -> None:
    assert (str(sa.saddr), str(sa.daddr)) == (d["src"], d["dst"])
    assert Proto(sa.proto).name.lower() == d["proto"] and Mode(sa.mode).name.lower() == d["mode"]
    assert sa.reqid == d["reqid"] and sa.replay_window == d["replay_window"]
    ours = {}
    for alg in (sa.crypt, sa.auth, sa.aead):
        if alg is not None:
            ours[alg.name] = (alg.key.reveal(), alg.key_bits, alg.trunc_bits if alg.trunc_bits is not None else alg.icv_bits)
    assert ours == d["algs"]
    assert (None if sa.mark is None else (sa.mark.value, sa.mark.mask)) == d["mark"]
    assert sa.if_id == d["if_id"]
    if d["encap"] is not None:
        assert sa.encap is not None and (sa.encap[1], sa.encap[2]) == d["encap"][1:]
    sel = sa.selector
    assert (f"{sel.saddr}/{sel.prefixlen_s}", f"{sel.daddr}/{sel.prefixlen_d}") == d["sel"]
    lt = sa.lifetime
    assert (lt.soft_byte_limit, lt.hard_byte_limit, lt.soft_packet_limit, lt.hard_packet_limit) == d["limits"]
    assert (lt.soft_add_expires_seconds, lt.hard_add_expires_seconds,
            lt.soft_use_expires_seconds, lt.hard_use_expires_seconds) == d["expires"]
    assert (sa.current.bytes, sa.current.packets) == (d["bytes"], d["packets"])
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sa.current.add_time)) == d["add"]
    assert (sa.stats.replay_window, sa.stats.replay, sa.stats.integrity_failed) == d["stats"]


SA_LINES = [
    # ESP cbc(aes)+hmac(sha256), IPv4 tunnel, with selector, mark, if_id, NAT-T encap
    f"xfrm state add src 10.200.0.1 dst 10.200.0.2 proto esp spi 0x1001 reqid 11 mode tunnel replay-window 64 "
    f"auth-trunc 'hmac(sha256)' {K_AUTH256} 128 enc 'cbc(aes)' {K_ENC} mark 0x7 mask 0xff if_id 0x33 "
    f"encap espinudp 4500 4500 0.0.0.0 sel src 10.1.0.0/16 dst 10.2.0.0/16",
    # ESP rfc4106(gcm(aes)), IPv6 transport, ESN
    f"xfrm state add src fd00:200::1 dst fd00:200::2 proto esp spi 0x1002 reqid 12 mode transport "
    f"flag esn replay-window 128 aead 'rfc4106(gcm(aes))' {K_GCM} 128",
    # AH hmac(sha256), IPv4 transport, lifetimes
    f"xfrm state add src 10.200.0.2 dst 10.200.0.1 proto ah spi 0x1003 reqid 13 mode transport "
    f"auth-trunc 'hmac(sha256)' {K_AUTH256} 128 limit time-soft 3000 limit time-hard 6000 "
    f"limit byte-soft 100000 limit packet-hard 5000",
    # AH hmac(sha1) (kernel-default truncation), IPv6 tunnel
    f"xfrm state add src fd00:200::2 dst fd00:200::1 proto ah spi 0x1004 reqid 14 mode tunnel auth 'hmac(sha1)' {K_SHA1}",
]


def test_sas_read_back_field_by_field(ns_pair: tuple[str, str]) -> None:
    a, _ = ns_pair
    for line in SA_LINES:
        ipx(a, line)
    with XfrmClient(a) as xc:
        sas = {sa.spi: sa for sa in xc.dump_sas()}
        oracle = parse_ip_s_xfrm_state(ip(a, "-s", "xfrm", "state"))
        assert sorted(sas) == sorted(oracle) == [0x1001, 0x1002, 0x1003, 0x1004]
        for spi, d in oracle.items():
            assert_matches_iproute2(sas[spi], d)
        # get_sa finds each one (with its mark where it has one) and agrees with the dump.
        assert xc.get_sa(ipaddress.ip_address("10.200.0.2"), 0x1001, Proto.ESP, mark=(7, 0xFF)) == sas[0x1001]
        assert xc.get_sa(ipaddress.ip_address("fd00:200::2"), 0x1002, Proto.ESP) == sas[0x1002]
        assert xc.get_sa(ipaddress.ip_address("10.200.0.2"), 0x9999, Proto.ESP) is None
    # The CLI shows the same SAs, keys redacted.
    cli = subprocess.run([sys.executable, "-m", "agent", "sas", "--netns", a, "--json"],
                         check=True, capture_output=True, text=True).stdout
    rows = json.loads(cli)
    assert sorted(int(r["spi"], 16) for r in rows) == sorted(sas)
    assert "a1a1a1a1" not in cli and "b2b2b2b2" not in cli and "<redacted>" in cli
    gcm = sas[0x1002]
    assert gcm.family == socket.AF_INET6 and gcm.replay is not None and gcm.replay.esn and gcm.replay.window == 128
    assert sas[0x1004].auth.trunc_bits == 96 and sas[0x1001].encap == (2, 4500, 4500)


# --- traffic ----------------------------------------------------------------------

TRAFFIC = {
    "cbc-hmac-v4": dict(
        src="10.200.0.1", dst="10.200.0.2", plen=32, spi=0x2001, fam=socket.AF_INET,
        algs=f"auth-trunc 'hmac(sha256)' {K_AUTH256} 128 enc 'cbc(aes)' {K_ENC}",
    ),
    "gcm-v6": dict(
        src="fd00:200::1", dst="fd00:200::2", plen=128, spi=0x2002, fam=socket.AF_INET6,
        algs=f"aead 'rfc4106(gcm(aes))' {K_GCM} 128",
    ),
}


@pytest.mark.parametrize("case", sorted(TRAFFIC))
def test_counters_and_keys_decrypt_the_wire(ns_pair: tuple[str, str], case: str) -> None:
    a, b = ns_pair
    t = TRAFFIC[case]
    src, dst, spi = t["src"], t["dst"], t["spi"]
    for ns in (a, b):
        ipx(ns, f"xfrm state add src {src} dst {dst} proto esp spi {spi:#x} reqid 7 mode transport {t['algs']}")
    ipx(a, f"xfrm policy add src {src}/{t['plen']} dst {dst}/{t['plen']} proto udp dir out "
           f"tmpl src {src} dst {dst} proto esp reqid 7 mode transport")

    # Resolve the neighbour first (ICMP, not covered by the policy): a UDP probe
    # queued behind IPv6 neighbour discovery can be lost.
    subprocess.run(["ip", "netns", "exec", a, "ping", "-c", "1", "-W", "10", dst], check=True, capture_output=True)
    ETH_P_ALL = 0x0003
    cap = create_socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL), b)
    cap.bind(("vb", 0))
    rx = create_socket(t["fam"], socket.SOCK_DGRAM, 0, b)
    rx.bind((dst, 9862))
    tx = create_socket(t["fam"], socket.SOCK_DGRAM, 0, a)
    payloads = [f"xwamp probe {i}".encode() * 3 for i in range(3)]
    try:
        for p in payloads:
            tx.sendto(p, (dst, 9862))
        # Delivery is not the point here (in the TCG guest the very first probe is
        # occasionally lost, cause not pinned down); what went through must be intact.
        rx.settimeout(10)
        received = []
        try:
            while len(received) < len(payloads):
                received.append(rx.recv(2048))
        except socket.timeout:
            pass
        assert received and all(p in payloads for p in received)
        cap.settimeout(2)
        frames = []
        try:
            while True:
                frames.append(cap.recv(65535))
        except socket.timeout:
            pass
    finally:
        for s in (cap, rx, tx):
            s.close()

    with XfrmClient(a) as xc:
        (sa,) = xc.dump_sas()
    d = parse_ip_s_xfrm_state(ip(a, "-s", "xfrm", "state"))[spi]
    assert sa.current.packets == d["packets"] >= len(received)
    assert sa.current.bytes == d["bytes"] > 0
    assert sa.current.use_time >= sa.current.add_time > 0
    assert sa.replay is not None and sa.replay.oseq == sa.current.packets

    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.ipsec import ESP, SecurityAssociation
    from scapy.layers.l2 import Ether

    if sa.aead is not None:
        assert sa.aead.icv_bits == 128  # scapy's AES-GCM uses the 16-octet ICV
        sa_scapy = SecurityAssociation(ESP, spi=sa.spi, crypt_algo="AES-GCM", crypt_key=sa.aead.key.reveal())
    else:
        assert sa.crypt is not None and sa.auth is not None and sa.auth.trunc_bits == 128
        sa_scapy = SecurityAssociation(ESP, spi=sa.spi, crypt_algo="AES-CBC", crypt_key=sa.crypt.key.reveal(),
                                       auth_algo="SHA2-256-128", auth_key=sa.auth.key.reveal())
    l3 = IP if t["fam"] == socket.AF_INET else IPv6
    esp = [Ether(f)[l3] for f in frames if ESP in Ether(f)]
    assert len(esp) == sa.current.packets  # every packet A encrypted was on the wire
    assert all(p[ESP].spi == spi for p in esp)
    clear = [bytes(sa_scapy.decrypt(p)[UDP].payload) for p in esp]
    assert all(c in payloads for c in clear) and all(r in clear for r in received)


# --- notifications -------------------------------------------------------------


def wait_for(mon: XfrmMonitor, kind: EventKind, spi: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        for ev in mon.events(timeout=max(0.0, deadline - time.monotonic())):
            seen.append(ev)
            if ev.kind is kind and ev.key_id is not None and ev.key_id[0] == spi:
                return seen
    raise AssertionError(f"no {kind} for spi {spi:#x} within {timeout}s; saw {seen}")


def test_events_add_update_soft_expire_delete(ns_pair: tuple[str, str]) -> None:
    a, _ = ns_pair
    base = (f"src 10.200.0.1 dst 10.200.0.2 proto esp spi 0x3001 reqid 5 mode tunnel "
            f"auth-trunc 'hmac(sha256)' {K_AUTH256} 128 enc 'cbc(aes)' {K_ENC}")
    dst = ipaddress.ip_address("10.200.0.2")
    with XfrmMonitor(a) as mon, TableFollower(a) as follower:
        ipx(a, f"xfrm state add {base}")
        (new,) = [e for e in wait_for(mon, EventKind.NEW_SA, 0x3001, 10) if e.kind is EventKind.NEW_SA]
        assert new.sa.crypt.key.reveal() == bytes.fromhex(K_ENC[2:]) and new.sa.reqid == 5

        ipx(a, f"xfrm state update {base} limit time-hard 500")
        upd = wait_for(mon, EventKind.UPD_SA, 0x3001, 10)[-1]
        assert upd.sa.lifetime.hard_add_expires_seconds == 500

        ipx(a, f"xfrm state add src 10.200.0.1 dst 10.200.0.2 proto esp spi 0x3002 reqid 6 mode tunnel "
               f"enc 'cbc(aes)' {K_ENC} auth 'hmac(sha256)' {K_AUTH256} limit time-soft 1 limit time-hard 300")
        soft = wait_for(mon, EventKind.EXPIRE, 0x3002, 15)[-1]
        assert soft.hard is False and soft.sa_id == (0x3002, 50, dst)

        ipx(a, "xfrm state delete src 10.200.0.1 dst 10.200.0.2 proto esp spi 0x3001")
        dele = wait_for(mon, EventKind.DEL_SA, 0x3001, 10)[-1]
        assert dele.sa_id == (0x3001, 50, dst) and dele.sa is not None and dele.sa.crypt is not None

        # The follower saw the same stream: 0x3001 gone, 0x3002 (soft-expired, keys kept) there.
        while follower.wait(timeout=1):
            pass
        assert follower.table.get(0x3001, 50, dst) is None
        kept = follower.table.get(0x3002, 50, dst)
        assert kept is not None and kept.crypt is not None and kept.auth is not None
        with XfrmClient(a) as xc:
            assert {sa.spi for sa in xc.dump_sas()} == {sa.spi for sa in follower.table} == {0x3002}
