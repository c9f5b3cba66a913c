"""Modes field bits (RFC 4656 §3.1; IANA TWAMP-Modes and OWAMP-Modes registries).

TWAMP-Modes (checked against the IANA registry):
  bit 0 (1)   unauthenticated                          RFC 4656/5357
  bit 1 (2)   authenticated                            RFC 4656/5357
  bit 2 (4)   encrypted                                RFC 4656/5357
  bit 3 (8)   unauth. TEST, encrypted CONTROL (mixed)  RFC 5618
  bit 4 (16)  individual session control               RFC 5938
  bit 5 (32)  reflect octets capability                RFC 6038
  bit 6 (64)  symmetrical size sender test format      RFC 6038
  bit 7 (128) IKEv2-derived shared secret key          RFC 7717
  bit 8 (256) DSCP and ECN monitoring                  RFC 7750
  bit 9 (512) PTPv2 timestamp capability               RFC 8186

OWAMP-Modes is a separate registry: bits 0-2 as above, bit 3 reserved, bit 4
(16) IKEv2-derived (RFC 7717) -- so RFC 7717's bit differs between the two
protocols (IANA registries, checked in docs/wire-format.md §7). OWAMP never
offers or accepts the TWAMP-only capability bits.

A selected Mode (Set-Up-Response) is: exactly one *security* bit (1, 2, 4, 8),
plus at most one *key* bit (RFC 7717, or xwamp's IPsec-bound modes of
docs/wire-format.md, which plug in through :func:`register_key_mode` without
touching this module), plus TWAMP capability bits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mode(enum.IntFlag):
    UNAUTHENTICATED = 1
    AUTHENTICATED = 2
    ENCRYPTED = 4
    MIXED = 8  # RFC 5618
    INDIVIDUAL_SESSION_CONTROL = 16  # RFC 5938
    REFLECT_OCTETS = 32  # RFC 6038
    SYMMETRICAL_SIZE = 64  # RFC 6038
    IKEV2_DERIVED = 128  # RFC 7717, TWAMP-Modes bit 7
    DSCP_ECN_MONITORING = 256  # RFC 7750
    PTP_TIMESTAMPS = 512  # RFC 8186


@dataclass(frozen=True, slots=True)
class SecurityMode:
    """What a security mode bit means for the two planes.

    control_crypto: the control stream is AES-CBC + HMAC after Set-Up-Response.
    test_auth: test packets carry an HMAC and the ECB-encrypted first block.
    test_encrypt: test packets are CBC-encrypted (RFC 4656 §4.1.2).
    owamp / twamp: whether the bit is defined in that protocol's registry.
    """

    bit: int
    name: str
    control_crypto: bool
    test_auth: bool
    test_encrypt: bool
    owamp: bool = True
    twamp: bool = True


_SECURITY: dict[int, SecurityMode] = {}


def register_security_mode(m: SecurityMode) -> None:
    """Add a security mode (used by xwamp's IPsec-bound modes). Bits must be single bits."""
    if m.bit <= 0 or m.bit & (m.bit - 1):
        raise ValueError("a security mode is a single bit")
    if m.bit in _SECURITY and _SECURITY[m.bit] != m:
        raise ValueError(f"mode bit {m.bit} already registered as {_SECURITY[m.bit].name}")
    _SECURITY[m.bit] = m


for _m in (
    SecurityMode(Mode.UNAUTHENTICATED, "unauth", False, False, False),
    SecurityMode(Mode.AUTHENTICATED, "auth", True, True, False),
    SecurityMode(Mode.ENCRYPTED, "enc", True, True, True),
    SecurityMode(Mode.MIXED, "mixed", True, False, False, owamp=False),
):
    register_security_mode(_m)

OWAMP_IKEV2_DERIVED = 16  # RFC 7717, OWAMP-Modes bit 4 (not the TWAMP value)


@dataclass(frozen=True, slots=True)
class KeyMode:
    """A bit saying where the shared secret comes from (RFC 7717, xwamp IPsec modes).
    ``with_unauth``: may be combined with the unauthenticated security bit.
    ``announced``: offered only when the key source's ``greeting_extra`` hook put an
    announcement in the greeting (the SA pair the keys come from)."""

    bit: int
    name: str
    owamp: bool = True
    twamp: bool = True
    with_unauth: bool = False
    announced: bool = True


_KEY: dict[int, KeyMode] = {}


def register_key_mode(k: KeyMode) -> None:
    if k.bit <= 0 or k.bit & (k.bit - 1):
        raise ValueError("a key mode is a single bit")
    if k.bit in _SECURITY:
        raise ValueError("bit already used by a security mode")
    _KEY[k.bit] = k


def key_modes(twamp: bool) -> dict[int, KeyMode]:
    return {b: k for b, k in _KEY.items() if (k.twamp if twamp else k.owamp)}


# Capability bits that may be OR-ed into the selected Mode alongside one security bit.
TWAMP_FEATURES = (Mode.INDIVIDUAL_SESSION_CONTROL | Mode.REFLECT_OCTETS | Mode.SYMMETRICAL_SIZE
                  | Mode.DSCP_ECN_MONITORING | Mode.PTP_TIMESTAMPS)

# Client preference order when several are offered: strongest first (RFC 4656 §3.1 leaves it to the client).
PREFERENCE = ("enc", "auth", "mixed", "unauth")


def security_modes() -> dict[int, SecurityMode]:
    return dict(_SECURITY)


def by_name(name: str) -> SecurityMode:
    for m in _SECURITY.values():
        if m.name == name:
            return m
    raise KeyError(f"unknown mode {name!r}")


def security_bits(modes: int) -> list[SecurityMode]:
    return [m for b, m in sorted(_SECURITY.items()) if modes & b]


def split_mode(mode: int, twamp: bool = True) -> tuple[SecurityMode, KeyMode | None, int]:
    """Split a selected Mode (Set-Up-Response) into its security mode, its key mode (if
    any) and the remaining feature bits.

    Raises ValueError unless it names exactly one security mode and at most one key mode
    valid for the protocol (docs/wire-format.md §1.2).
    """
    sec = [m for b, m in _SECURITY.items() if mode & b]
    if len(sec) != 1:
        raise ValueError("the selected mode must contain exactly one security mode")
    keys = [k for b, k in key_modes(twamp).items() if mode & b]
    if len(keys) > 1:
        raise ValueError("at most one key mode may be selected")
    key = keys[0] if keys else None
    rest = int(mode) & ~int(sec[0].bit) & ~int(key.bit if key else 0)
    return sec[0], key, rest


def offerable(modes: int, twamp: bool) -> int:
    """Drop bits the protocol does not define (OWAMP has no mixed mode or TWAMP features)."""
    out = 0
    for b, m in _SECURITY.items():
        if modes & b and (m.twamp if twamp else m.owamp):
            out |= b
    for b in key_modes(twamp):
        out |= modes & b
    if twamp:
        out |= modes & TWAMP_FEATURES
    return int(out)


def choose(offered: int, wanted: list[str], twamp: bool) -> int | None:
    """The client's pick: first of ``wanted`` that the server offers, or None.

    A wanted entry is a security mode name ("auth") or "security+key" ("auth+ipsec-alt1")
    naming a registered key mode as well.
    """
    for name in wanted:
        sname, _, kname = name.partition("+")
        try:
            m = by_name(sname)
        except KeyError:
            continue
        if not (offered & m.bit and (m.twamp if twamp else m.owamp)):
            continue
        if not kname:
            return int(m.bit)
        for b, k in key_modes(twamp).items():
            if k.name == kname and offered & b and (m.bit != Mode.UNAUTHENTICATED or k.with_unauth):
                return int(m.bit | b)
    return None


# RFC 7717 §5.2: the Modes bit alone signals support; nothing rides in the greeting's
# Unused field, so the bit is offered whenever configured (announced=False).
register_key_mode(KeyMode(Mode.IKEV2_DERIVED, "rfc7717", owamp=False, twamp=True, announced=False))
register_key_mode(KeyMode(OWAMP_IKEV2_DERIVED, "rfc7717", owamp=True, twamp=False, announced=False))
