#!/usr/bin/env python3
"""Record real NETLINK_XFRM bytes for the host decoder tests (stdlib only).

Run as root on a kernel with ESP/AH (the VM):
    tools/vm/run -- python3 /work/main/tests/data/xfrm/record.py

Creates a throwaway netns, installs a few SAs and a policy with iproute2,
and writes tests/data/xfrm/recorded.json: every datagram received (dump
replies and multicast notifications) as hex, labelled, plus the
`ip -s xfrm state` text of the same moment. The keys are fixed test keys.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time

NS = f"xwrec{os.getpid()}"
NETLINK_XFRM = 6
SOL_NETLINK = 270
GROUPS = (2, 3, 4)  # XFRMNLGRP_EXPIRE, _SA, _POLICY
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recorded.json")

SAS = [
    # ESP cbc(aes) + hmac(sha256), IPv4 tunnel, with mark, if_id and NAT-T encap
    "xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x11111111 reqid 10 mode tunnel "
    "replay-window 32 auth-trunc 'hmac(sha256)' 0x" + "22" * 32 + " 128 enc 'cbc(aes)' 0x" + "11" * 16
    + " mark 0x5 mask 0xff if_id 7 encap espinudp 4500 4500 0.0.0.0 sel src 10.0.1.0/24 dst 10.0.2.0/24",
    # ESP rfc4106(gcm(aes)) IPv6 transport, ESN
    "xfrm state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x22222222 reqid 20 mode transport "
    "flag esn replay-window 128 aead 'rfc4106(gcm(aes))' 0x" + "33" * 20 + " 128",
    # AH hmac(sha1) IPv4 transport with lifetimes
    "xfrm state add src 192.0.2.2 dst 192.0.2.1 proto ah spi 0x33333333 reqid 30 mode transport "
    "auth 'hmac(sha1)' 0x" + "44" * 20 + " limit time-soft 3600 limit time-hard 7200 limit byte-soft 1000000",
]


def ip(*args: str) -> str:
    return subprocess.run(["ip", "-n", NS, *args], check=True, capture_output=True, text=True).stdout


def ipb(line: str) -> None:
    subprocess.run(["ip", "-n", NS, "-batch", "-"], input=line + "\n", check=True, text=True)


def xfrm_socket() -> socket.socket:
    # Create it inside the netns via a child `ip netns exec` is awkward; use setns.
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{NS}", os.O_RDONLY)
    try:
        assert libc.setns(target, 0x40000000) == 0
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    finally:
        libc.setns(own, 0x40000000)
        os.close(own)
        os.close(target)
    s.bind((0, 0))
    return s


def drain(s: socket.socket, label: str, out: list, wait: float = 0.5) -> None:
    end = time.monotonic() + wait
    while True:
        left = end - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            return
        out.append({"label": label, "hex": s.recv(1 << 16).hex()})


def dump(s: socket.socket, msg_type: int, label: str, out: list) -> None:
    req = (16).to_bytes(4, sys.byteorder) + msg_type.to_bytes(2, sys.byteorder)
    req += (0x301).to_bytes(2, sys.byteorder) + (77).to_bytes(4, sys.byteorder) + bytes(4)
    s.send(req)
    while True:
        data = s.recv(1 << 16)
        out.append({"label": label, "hex": data.hex()})
        # NLMSG_ERROR (2) / NLMSG_DONE (3) in any header of the datagram ends the dump.
        off, done = 0, False
        while off + 16 <= len(data):
            ln = int.from_bytes(data[off : off + 4], sys.byteorder)
            if int.from_bytes(data[off + 4 : off + 6], sys.byteorder) in (2, 3):
                done = True
            off += (ln + 3) & ~3
            if ln < 16:
                break
        if done:
            return


def main() -> int:
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        mon = xfrm_socket()
        for g in GROUPS:
            mon.setsockopt(SOL_NETLINK, 1, g)
        q = xfrm_socket()
        out: list[dict] = []
        for line in SAS:
            ipb(line)
        drain(mon, "event:newsa", out)
        ipb("xfrm policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 192.0.2.1 dst 192.0.2.2 "
            "proto esp reqid 10 mode tunnel")
        drain(mon, "event:newpolicy", out)
        dump(q, 0x12, "dump:sa", out)  # XFRM_MSG_GETSA
        dump(q, 0x15, "dump:policy", out)  # XFRM_MSG_GETPOLICY
        ip_text = ip("-s", "xfrm", "state")
        ipb("xfrm state update src 192.0.2.2 dst 192.0.2.1 proto ah spi 0x33333333 reqid 31 mode transport "
            "auth 'hmac(sha1)' 0x" + "44" * 20)
        drain(mon, "event:updsa", out)
        ipb("xfrm state add src 192.0.2.9 dst 192.0.2.8 proto esp spi 0x44444444 reqid 40 mode tunnel "
            "enc 'cbc(aes)' 0x" + "55" * 16 + " auth 'hmac(sha256)' 0x" + "66" * 32
            + " limit time-soft 1 limit time-hard 3")
        drain(mon, "event:newsa-expiring", out)
        drain(mon, "event:expire", out, wait=6.0)  # soft at ~1 s, hard at ~3 s
        ipb("xfrm state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x11111111 mark 0x5 mask 0xff")
        drain(mon, "event:delsa", out)
        ipb("xfrm policy delete src 10.0.1.0/24 dst 10.0.2.0/24 dir out")
        drain(mon, "event:delpolicy", out)
        ipb("xfrm state flush proto ah")
        drain(mon, "event:flushsa", out)
        with open(OUT, "w") as f:
            json.dump({"kernel": os.uname().release, "ip_s_xfrm_state": ip_text, "datagrams": out}, f, indent=1)
            f.write("\n")
        print(f"wrote {len(out)} datagrams to {OUT}")
        return 0
    finally:
        subprocess.run(["ip", "netns", "del", NS])


if __name__ == "__main__":
    sys.exit(main())
