"""Per-session crypto of O/TWAMP-Test and STAMP packets, on `cryptography` primitives.

What is covered, and how (checked against the reference implementation's wire
behaviour, perfSONAR owamp/twamp ``endpoint.c``, since the RFC text itself was not
reachable from the stored corpora; see the module-level constants for each span):

* O/TWAMP authenticated mode (RFC 4656 §4.1.2, RFC 5357 §4.1.2/§4.2.1): only the
  first 16-octet block (Sequence Number + MBZ) is encrypted, AES-128 ECB, so the
  timestamps stay in clear and can be written at the last moment.
* O/TWAMP encrypted mode: AES-128 CBC with IV = 0, restarted for every packet, over
  the first 32 octets of a sender packet and the first 96 octets of a reflector
  packet. (CBC of one block with IV 0 equals ECB, so both modes share one code path.)
* HMAC: HMAC-SHA1 keyed with the 32-octet test HMAC key, truncated to 16 octets,
  computed over the *plaintext* of the covered octets and sent in clear:
  sender 16 (auth) / 32 (encrypted); reflector 16 (auth) / 96 (encrypted).
  The reflector's authenticated span (16) is what perfSONAR puts on the wire; a
  session can widen it with ``reflector_auth_span=96`` for peers that cover all
  six blocks.
* STAMP authenticated mode (RFC 8762 §4.2.2/§4.3.2/§4.4): no encryption;
  HMAC-SHA-256 truncated to 16 octets over octets 0..95, placed at 96..111.
* RFC 8972 §4.8 HMAC TLV: HMAC-SHA-256/16 over the base packet's Sequence Number
  (4 octets) followed by every TLV that precedes the HMAC TLV.

Cipher and HMAC contexts are built once per session: the ECB encryptor/decryptor
are stateless across ``update`` calls on whole blocks, and the HMAC is a keyed
prototype that is ``copy()``-ed per packet (no re-keying per packet).
Key material never appears in ``repr`` or exceptions.
"""

from __future__ import annotations

import hmac as _stdlib_hmac  # only for compare_digest (constant-time comparison)
from typing import Callable

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.engine.keys import TestKeys
from netlink.secret import Secret

BLOCK = 16
HMAC_LEN = 16  # RFC 4656 §4.1.2 / RFC 8762 §4.4: truncated to 128 bits

# Octets covered by encryption and by the HMAC (plaintext), per packet kind.
SENDER_AUTH_SPAN = 16
SENDER_ENC_SPAN = 32
REFLECTOR_AUTH_SPAN = 16  # perfSONAR wire behaviour; 96 selectable per session
REFLECTOR_ENC_SPAN = 96
STAMP_HMAC_SPAN = 96

_compare = _stdlib_hmac.compare_digest


def _xor(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


class TwampTestCrypto:
    """AES-128 + HMAC-SHA1 of one O/TWAMP-Test session (authenticated or encrypted)."""

    __slots__ = ("encrypted", "reflector_auth_span", "_enc", "_dec", "_mac")

    def __init__(self, keys: TestKeys, encrypted: bool, reflector_auth_span: int = REFLECTOR_AUTH_SPAN) -> None:
        if reflector_auth_span not in (16, 96):
            raise ValueError("reflector_auth_span must be 16 or 96")
        self.encrypted = encrypted
        self.reflector_auth_span = reflector_auth_span
        cipher = Cipher(algorithms.AES(keys.aes_key.reveal()), modes.ECB())
        self._enc = cipher.encryptor()
        self._dec = cipher.decryptor()
        self._mac = hmac.HMAC(keys.hmac_key.reveal(), hashes.SHA1())

    def __repr__(self) -> str:
        return f"<TwampTestCrypto {'encrypted' if self.encrypted else 'authenticated'}>"

    @property
    def sender_span(self) -> int:
        return SENDER_ENC_SPAN if self.encrypted else SENDER_AUTH_SPAN

    @property
    def reflector_span(self) -> int:
        return REFLECTOR_ENC_SPAN if self.encrypted else self.reflector_auth_span

    @property
    def sender_cipher_span(self) -> int:
        return SENDER_ENC_SPAN if self.encrypted else BLOCK

    @property
    def reflector_cipher_span(self) -> int:
        return REFLECTOR_ENC_SPAN if self.encrypted else BLOCK

    def fast_ops(self) -> tuple:
        """(ECB encrypt-update, ECB decrypt-update, keyed HMAC prototype ``copy``) for hot loops.

        The update functions take whole 16-octet blocks; each ``copy()`` gives a fresh keyed HMAC.
        """
        return self._enc.update, self._dec.update, self._mac.copy

    def mac(self, data: bytes | bytearray | memoryview) -> bytes:
        ctx = self._mac.copy()
        ctx.update(data)
        return ctx.finalize()[:HMAC_LEN]

    def encrypt(self, plain: bytes | bytearray | memoryview, span: int) -> bytes:
        """AES-CBC, IV = 0, over ``plain[:span]`` (span a multiple of 16)."""
        upd = self._enc.update
        prev = upd(bytes(plain[:BLOCK]))
        if span == BLOCK:
            return prev
        out = [prev]
        for off in range(BLOCK, span, BLOCK):
            prev = upd(_xor(plain[off : off + BLOCK], prev))
            out.append(prev)
        return b"".join(out)

    def decrypt(self, data: bytes | bytearray | memoryview, span: int) -> bytes:
        """Inverse of :meth:`encrypt`: one ECB pass, then the CBC XOR with the shifted ciphertext."""
        ct = bytes(data[:span])
        p = self._dec.update(ct)
        if span == BLOCK:
            return p
        return p[:BLOCK] + _xor(p[BLOCK:], ct[: span - BLOCK])

    def verify(self, plain_prefix: bytes, tag: bytes | memoryview) -> bool:
        return _compare(self.mac(plain_prefix), bytes(tag))


class StampCrypto:
    """HMAC-SHA-256/16 of STAMP authenticated mode and of the RFC 8972 HMAC TLV."""

    __slots__ = ("_mac",)

    def __init__(self, key: Secret) -> None:
        if len(key) == 0:
            raise ValueError("empty STAMP HMAC key")
        self._mac = hmac.HMAC(key.reveal(), hashes.SHA256())

    def __repr__(self) -> str:
        return "<StampCrypto hmac-sha256/16>"

    def mac(self, *parts: bytes | bytearray | memoryview) -> bytes:
        ctx = self._mac.copy()
        for p in parts:
            ctx.update(p)
        return ctx.finalize()[:HMAC_LEN]

    def verify(self, tag: bytes | memoryview, *parts: bytes | bytearray | memoryview) -> bool:
        return _compare(self.mac(*parts), bytes(tag))

    def fast_mac(self) -> Callable[[], hmac.HMAC]:
        """The keyed HMAC prototype's ``copy``, for hot loops: each call gives a fresh keyed HMAC."""
        return self._mac.copy
