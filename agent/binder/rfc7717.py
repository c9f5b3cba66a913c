"""RFC 7717: the O/TWAMP shared secret derived from an IKEv2 SA, as its own key mode.

A key source for :mod:`agent.control.keyring` over an IKE key source
(:mod:`agent.binder.keysource`). It needs no CHILD_SA and nothing in the greeting's
Unused field: only the IKE SA's SPIs and SK_d.

* Modes bit: TWAMP 128 (bit 7), OWAMP 16 (bit 4) (RFC 7717 §7, RFC 7718); "the Modes
  bit alone signals support" (§5.2). It goes with authenticated, encrypted or mixed
  mode: "In the authenticated, encrypted, and mixed modes, the shared secret key MUST
  be derived from the IKEv2 SA" (§5.1).
* KeyID: "the first 8 octets of the KeyID field MUST carry SPIi, and the second 8
  octets MUST carry SPIr. The remaining bits of the KeyID field MUST be set to zero."
  The server "MUST obtain the SPIi and SPIr from the first 16 octets and ignore the
  remaining octets" (§5.3).
* Secret: "Shared secret key = prf( SK_d, "IPPM" )" with the IKE SA's prf (§5.1).
  What turns it into the 16-octet Token key is not said; ``kdf`` picks the reading
  (docs/wire-format.md §4.4): ``"pbkdf2"`` (default) uses it as RFC 4656's shared
  secret, so PBKDF2(secret, Salt, Count) as for a passphrase (§4.1 restates that
  "the secret key is derived from the passphrase using ... PBKDF2", and the greeting
  keeps Salt and Count, Figure 2); ``"direct"`` takes its first 16 octets.
* No IKE SA for the KeyID: the server "MUST log the event" and "SHOULD set the Accept
  field of the Server-Start message to the value 6" (§5.3): :class:`SetupRefused`.
* No IKE SA for the peer on the client: "logs an error ... and proceeds with the modes
  defined in [RFC4656], [RFC5357], and [RFC5618]" (§5.1): the bit is dropped from the
  offer before the client chooses (``filter_offer``).
* Rekey or deletion of the IKE SA: "the corresponding shared secret key generated from
  the SA MUST continue to be used until the O/TWAMP session terminates" (§5.1). The
  key is used once, at Set-Up; the session keys it protects then live with the control
  connection, whatever happens to the IKE SA afterwards.
"""

from __future__ import annotations

import collections
import logging
from typing import Literal

from agent.binder import ikev2
from agent.binder.keysource import IKEEntry
from agent.control import modes as md
from agent.control.keyring import HandshakeContext, SetupRefused
from agent.control.messages import ACCEPT_NO_IKE_SA
from netlink.secret import Secret

log = logging.getLogger(__name__)

LABEL = b"IPPM"  # RFC 7717 §5.1: "the string "IPPM" is encoded in ASCII"
KEYID_LEN = 80
KDFS = ("pbkdf2", "direct")
Kdf = Literal["pbkdf2", "direct"]


def mode_bit(protocol: str) -> int:
    """TWAMP-Modes bit 7 (128) or OWAMP-Modes bit 4 (16) (RFC 7717 §7, RFC 7718)."""
    return int(md.Mode.IKEV2_DERIVED) if protocol == "twamp" else md.OWAMP_IKEV2_DERIVED


def shared_secret(sk_d: Secret, prf: ikev2.PRF) -> Secret:
    """prf(SK_d, "IPPM") (RFC 7717 §5.1): as long as the IKE SA's prf output."""
    return Secret(ikev2.prf(sk_d, LABEL, prf))


def key_id(spi_i: bytes, spi_r: bytes) -> bytes:
    """SPIi (8) | SPIr (8) | 64 zero octets (RFC 7717 §5.3)."""
    if len(spi_i) != 8 or len(spi_r) != 8:
        raise ValueError("IKE SPIs are 8 octets")
    return bytes(spi_i) + bytes(spi_r) + bytes(KEYID_LEN - 16)


def spis_of(key_id_raw: bytes) -> tuple[bytes, bytes]:
    """The server's reading: the first 16 octets, raw; the rest ignored (RFC 7717 §5.3)."""
    raw = bytes(key_id_raw).ljust(16, b"\0")
    return raw[:8], raw[8:16]


class RFC7717KeySource:
    """Key-source hooks for RFC 7717 (see the module doc). ``ike`` is any object with
    ``by_ike_spis(spi_i, spi_r)`` and ``for_peer(addr)`` (agent.binder.keysource).
    Answers only for connections whose selected Mode carries the RFC 7717 bit, so it
    chains in front of passphrase sources."""

    def __init__(self, ike: object, kdf: Kdf = "pbkdf2") -> None:
        if kdf not in KDFS:
            raise ValueError(f"rfc7717 kdf must be one of {', '.join(KDFS)}")
        self.ike = ike
        self.kdf = kdf
        self.counters: collections.Counter[str] = collections.Counter()

    @staticmethod
    def _mine(ctx: HandshakeContext) -> bool:
        return bool(ctx.mode & mode_bit(ctx.protocol))

    def _entry(self, ctx: HandshakeContext) -> IKEEntry | None:
        if ctx.role == "server":
            spi_i, spi_r = spis_of(ctx.key_id_raw)
            e = self.ike.by_ike_spis(spi_i, spi_r)  # type: ignore[attr-defined]
            if e is None or e.sk_d is None:
                self.counters["no_ike_sa"] += 1
                log.warning("RFC 7717: no IKE SA with SK_d for SPIi=%s SPIr=%s from %s: Accept=6",
                            spi_i.hex(), spi_r.hex(), ctx.peer[0] if ctx.peer else "?")
                raise SetupRefused(ACCEPT_NO_IKE_SA, "RFC 7717: no IKE SA for the KeyID's SPIs")
            self.counters["server_keyed"] += 1
            return e
        if ctx.peer is None:
            return None
        e = self.ike.for_peer(ctx.peer[0])  # type: ignore[attr-defined]
        return e if e is not None and e.sk_d is not None else None

    def serves_key_mode(self, bit: int, protocol: str) -> bool:
        return bit == mode_bit(protocol)

    # --- client hooks -------------------------------------------------------------

    def filter_offer(self, ctx: HandshakeContext, modes: int) -> int:
        bit = mode_bit(ctx.protocol)
        if not modes & bit or ctx.role != "client":
            return modes
        if self._entry(ctx) is None:
            self.counters["client_fallback"] += 1
            log.error("RFC 7717: server %s offers IKEv2-derived keys but we hold no IKE SA for it; "
                      "falling back to the RFC 4656/5357/5618 modes (RFC 7717 §5.1)",
                      ctx.peer[0] if ctx.peer else "?")
            return modes & ~bit
        return modes

    def key_id_octets(self, ctx: HandshakeContext) -> bytes | None:
        if not self._mine(ctx) or ctx.role != "client":
            return None
        e = self._entry(ctx)
        return None if e is None else key_id(e.spi_i, e.spi_r)

    # --- both sides ---------------------------------------------------------------

    def shared_secret(self, key_id_: str, ctx: HandshakeContext) -> Secret | None:
        """With kdf="pbkdf2" the prf output is RFC 4656's shared secret: the control layer
        runs PBKDF2 with the greeting's Salt and Count on it (off the event loop)."""
        if not self._mine(ctx) or self.kdf != "pbkdf2":
            return None
        e = self._entry(ctx)
        return None if e is None else shared_secret(e.sk_d, e.prf)  # type: ignore[arg-type]

    def token_key(self, key_id_: str, ctx: HandshakeContext) -> Secret | None:
        if not self._mine(ctx) or self.kdf != "direct":
            return None
        e = self._entry(ctx)
        if e is None:
            return None
        return Secret(shared_secret(e.sk_d, e.prf).reveal()[:16])  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<RFC7717KeySource kdf={self.kdf} over {self.ike!r}>"


def with_rfc7717(modes: tuple[str, ...], passphrase: bool) -> tuple[str, ...]:
    """A client's mode preferences once an IKE key source is configured: RFC 7717 first,
    since "IKEv2-derived keys SHOULD be used instead of shared secrets" (RFC 7717 §1).
    Each plain keyed mode is preceded by its ``+rfc7717`` form; the default (``unauth``
    alone) becomes ``auth+rfc7717`` then ``unauth``. A plain keyed mode stays only with a
    passphrase to key it: it is the §5.1 fallback. Other key modes are left alone."""
    if modes == ("unauth",):
        modes = ("auth", "unauth")
    out: list[str] = []
    for m in modes:
        sec, _, key = m.partition("+")
        if not key and sec != "unauth":
            out.append(f"{sec}+rfc7717")
            if passphrase:
                out.append(m)
        else:
            out.append(m)
    return tuple(dict.fromkeys(out))
