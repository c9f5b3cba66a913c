"""Authenticated STAMP whose key depends on who sent the packet (docs/wire-format.md §9).

A reflector keyed from the tunnel holds no single key: ``keys_for(peer)`` gives the candidate
keys of the SA pairs that packet may ride in (the current pair first; during a rekey overlap
also the other one). The first that verifies the packet's HMAC (RFC 8762 §4.2.2, octets 0..95)
keys the answer too, so a sender still on the old pair can verify it. Outcomes are counted in
``key_results``: ``current`` (first candidate), ``previous`` (another one), ``mismatch`` (none
verified: the packet is dropped as bad_hmac), ``no_sa`` (no pair at all for that peer).
"""

from __future__ import annotations

import collections
import os
from typing import Callable, Hashable

from agent.engine.crypto import STAMP_HMAC_SPAN, StampCrypto
from agent.engine.packets import STAMP_AUTH_BASE, Proto, Security
from agent.engine.reflector import NowNs, ReflectorSession
from netlink.secret import Secret

# keys_for(host, fresh): candidates for a packet from host; fresh=True after a miss asks the
# provider to look at the SA table again (a rekey may have just happened).
KeysFor = Callable[[Hashable, bool], "list[StampCrypto]"]


class TunnelKeyedReflector(ReflectorSession):
    def __init__(self, keys_for: KeysFor, on_verified: Callable[[Hashable, StampCrypto], None] | None = None,
                 **kw) -> None:
        """``on_verified(host, crypto)``: told which key verified a packet from ``host``."""
        # A random key nobody holds: what a packet that no candidate verifies is checked against.
        self._nobody = StampCrypto(Secret(os.urandom(32)))
        super().__init__(Proto.STAMP, Security.AUTH, stamp_key=Secret(os.urandom(32)), **kw)
        self._keys_for = keys_for
        self._on_verified = on_verified
        self.key_results: collections.Counter[str] = collections.Counter()
        self._plain = self.reflect
        self.reflect = self._keyed  # type: ignore[method-assign]

    def _keyed(self, data: bytes, rx_ns: int, ttl: int | None, now_ns: NowNs, tos: int | None = None,
               peer: Hashable = None, rx_source: str = "sw") -> bytes | None:
        if len(data) >= STAMP_AUTH_BASE:
            host = peer[0] if isinstance(peer, tuple) else peer
            mac, covered = data[STAMP_HMAC_SPAN:STAMP_AUTH_BASE], data[:STAMP_HMAC_SPAN]
            cands = self._keys_for(host, False)
            found = self._first(cands, mac, covered, ())
            if found is None:
                fresh = self._keys_for(host, True)
                found = self._first(fresh, mac, covered, cands)
                cands = fresh or cands
            if found is not None:
                i, cr = found
                self._scrypto = cr
                self.key_results["current" if i == 0 else "previous"] += 1
                if self._on_verified is not None:
                    self._on_verified(host, cr)
                self._verified = cr  # this packet's HMAC is checked: the base reflector need not again
                try:
                    return self._plain(data, rx_ns, ttl, now_ns, tos, peer, rx_source)
                finally:
                    self._verified = None
            self.key_results["mismatch" if cands else "no_sa"] += 1
            self._scrypto = self._nobody  # counted as bad_hmac and dropped by the base reflector
        return self._plain(data, rx_ns, ttl, now_ns, tos, peer, rx_source)

    @staticmethod
    def _first(cands: "list[StampCrypto]", mac: bytes, covered: bytes,
               tried: "list[StampCrypto] | tuple") -> "tuple[int, StampCrypto] | None":
        for i, cr in enumerate(cands):
            if cr not in tried and cr.verify(mac, covered):
                return i, cr
        return None


__all__ = ["TunnelKeyedReflector", "KeysFor"]
