"""STAMP keyed from the tunnel (docs/wire-format.md §9): the HMAC key of authenticated STAMP
(RFC 8762 §4.2.2, and the RFC 8972 §4.8 HMAC TLV) derived from the IPsec SA pair the test
packets ride in. Sans-IO: SA records in, keys out.

STAMP has no control channel, so nothing on the wire names the pair: both ends find it
from the path (the outbound policy's tunnel, then the SAs of its reqid), and during a rekey
overlap the reflector tries the old and new pairs; the one that verifies wins.
"""

from __future__ import annotations

from typing import Iterable

from agent.binder import ikev2
from agent.binder.ikev2 import PRF
from agent.binder.keys import rebuild_keymat
from netlink.records import SA, Proto
from netlink.secret import Secret

STAMP_LABEL = b"xwamp STAMP HMAC"
STAMP_KEY_LEN = 32  # HMAC-SHA-256 key (RFC 8762 §4.4 names HMAC-SHA-256)
STAMP_PRF = PRF.HMAC_SHA2_256  # no greeting to name another one
MAX_PER_DIRECTION = 2  # a rekey overlap holds the old and the new SA of each direction


def stamp_key(c2s: SA, s2c: SA) -> Secret:
    """K_stamp = derive(KEYMAT, "xwamp STAMP HMAC", 32), KEYMAT = keys(sender->reflector SA) ‖
    keys(reflector->sender SA) (wire-format §3); raises BinderRefusal as rebuild_keymat does."""
    return Secret(ikev2.derive(rebuild_keymat(c2s, s2c), STAMP_LABEL, STAMP_KEY_LEN, STAMP_PRF))


def _ranked(sas: Iterable[SA], reqid: int) -> list[SA]:
    """ESP before AH, newest first (add time), at most MAX_PER_DIRECTION; IPcomp never keys."""
    c = [sa for sa in sas if int(sa.proto) in (Proto.ESP, Proto.AH) and (not reqid or sa.reqid == reqid)]
    c.sort(key=lambda sa: (int(sa.proto) == Proto.ESP, sa.current.add_time), reverse=True)
    return c[:MAX_PER_DIRECTION]


def candidate_pairs(forward: Iterable[SA], reverse: Iterable[SA], reqid: int = 0) -> list[tuple[SA, SA]]:
    """(sender->reflector, reflector->sender) pairs, the current one (newest of each) first.

    ``forward``: the SAs from the sender's outer address to the reflector's; ``reverse`` the
    other way; ``reqid`` (0: any) the outbound policy's. Pairs keep one protocol and one
    reqid; at most MAX_PER_DIRECTION² pairs are returned (bounded work per packet)."""
    fw, rv = _ranked(forward, reqid), _ranked(reverse, reqid)
    out: list[tuple[SA, SA]] = []
    for c2s in fw:
        for s2c in rv:
            if int(c2s.proto) == int(s2c.proto) and c2s.reqid == s2c.reqid:
                out.append((c2s, s2c))
    return out


def pair_tag(c2s: SA, s2c: SA) -> str:
    """Key-free name of a pair for logs and errors."""
    return f"spi_c2s=0x{c2s.spi:08x} spi_s2c=0x{s2c.spi:08x} reqid={c2s.reqid}"


__all__ = ["STAMP_LABEL", "candidate_pairs", "pair_tag", "stamp_key"]
