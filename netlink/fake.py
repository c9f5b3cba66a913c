"""Hand-made SA records for tests (ours and other packages'): no kernel needed."""

from __future__ import annotations

import ipaddress

from netlink.records import (
    SA,
    Algorithm,
    IPAddress,
    LifetimeConfig,
    LifetimeCurrent,
    Mode,
    Proto,
    Selector,
    Stats,
)
from netlink.secret import Secret

XFRM_INF = (1 << 64) - 1  # the kernel's "no limit" for byte/packet lifetimes


def make_sa(
    saddr: str | IPAddress = "192.0.2.1",
    daddr: str | IPAddress = "192.0.2.2",
    spi: int = 0x1000,
    proto: int = Proto.ESP,
    mode: int = Mode.TUNNEL,
    reqid: int = 1,
    add_time: int = 1_700_000_000,
    seq: int = 0,
    enc_key: bytes = b"\x11" * 16,
    auth_key: bytes = b"\x22" * 32,
    aead_key: bytes | None = None,
    bytes_: int = 0,
    packets: int = 0,
) -> SA:
    """A plausible SA: ESP cbc(aes)+hmac(sha256) by default, rfc4106 if ``aead_key``."""
    s = ipaddress.ip_address(saddr) if isinstance(saddr, str) else saddr
    d = ipaddress.ip_address(daddr) if isinstance(daddr, str) else daddr
    family = 2 if s.version == 4 else 10
    plen = 0
    crypt = auth = aead = None
    if aead_key is not None:
        aead = Algorithm("rfc4106(gcm(aes))", Secret(aead_key), len(aead_key) * 8, icv_bits=128)
    else:
        if proto == Proto.ESP:
            crypt = Algorithm("cbc(aes)", Secret(enc_key), len(enc_key) * 8)
        auth = Algorithm("hmac(sha256)", Secret(auth_key), len(auth_key) * 8, trunc_bits=128)
    any_addr = ipaddress.ip_address("0.0.0.0" if family == 2 else "::")
    return SA(
        family=family,
        saddr=s,
        daddr=d,
        spi=spi,
        proto=Proto(proto) if proto in (50, 51, 108) else proto,
        mode=Mode(mode),
        reqid=reqid,
        flags=0,
        replay_window=32,
        selector=Selector(family, any_addr, any_addr, plen, plen),
        lifetime=LifetimeConfig(XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0),
        current=LifetimeCurrent(bytes_, packets, add_time, 0),
        stats=Stats(0, 0, 0),
        seq=seq,
        crypt=crypt,
        auth=auth,
        aead=aead,
    )
