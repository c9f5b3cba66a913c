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

OWAMP-Modes is a separate registry: only bits 0-2 are shared with TWAMP. Bits
3.. have no OWAMP meaning here except RFC 7717's IKEv2-derived bit, which we
treat as 128 in both (the RFC 7717 assignment was not re-verified for OWAMP:
see the report), so OWAMP never offers or accepts the TWAMP-only bits.

xwamp's IPsec-bound modes (docs/wire-format.md, defined by another engineer)
plug in through :func:`register_security_mode` without touching this module.
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
    IKEV2_DERIVED = 128  # RFC 7717
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


def split_mode(mode: int) -> tuple[SecurityMode, int]:
    """Split a selected Mode (Set-Up-Response) into its one security bit and feature bits.

    Raises ValueError if it does not name exactly one known security mode.
    """
    sec = [m for b, m in _SECURITY.items() if mode & b]
    if len(sec) != 1:
        raise ValueError("the selected mode must contain exactly one security mode")
    return sec[0], mode & ~sec[0].bit


def offerable(modes: int, twamp: bool) -> int:
    """Drop bits the protocol does not define (OWAMP has no mixed mode or TWAMP features)."""
    out = 0
    for b, m in _SECURITY.items():
        if modes & b and (m.twamp if twamp else m.owamp):
            out |= b
    if twamp:
        out |= modes & TWAMP_FEATURES
    return out


def choose(offered: int, wanted: list[str], twamp: bool) -> int | None:
    """The client's pick: first of ``wanted`` that the server offers, or None."""
    for name in wanted:
        try:
            m = by_name(name)
        except KeyError:
            continue
        if offered & m.bit and (m.twamp if twamp else m.owamp):
            return m.bit
    return None
