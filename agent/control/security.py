"""The O/TWAMP-Control security layer (RFC 4656 §3.1, §3.2, §4.1.2; RFC 5357 §3.1, §4.1.2).

Everything here composes primitives from ``cryptography``; no key byte ever reaches a
log line, an exception message or a repr (keys travel in :class:`Secret`).

What each rule rests on (RFC text was not readable here; see the report):
the HMAC coverage and the Server-Start / Fetch framing were checked against
perfSONAR owamp's protocol.c/sapi.c (which HMAC-chains exactly this way); the
Token and test-key derivations follow RFC 4656 §3.1 / §4.1.2 as recalled and
agree with the protocol notes; the tests pin all of it with vectors composed
from raw primitives.
  * shared key: PBKDF2-HMAC-SHA1(passphrase, Salt, Count), 16 octets (RFC 4656 §3.1);
    Count is offered by the server, a client caps what it will spend;
  * Token = AES-128-CBC(key, IV=0) of Challenge(16) | AES session key(16) | HMAC session key(32);
  * after Set-Up-Response each direction is one AES-CBC stream (client: Client-IV,
    server: Server-IV) whose chain continues across messages (RFC 4656 §3.2);
  * the control HMAC is HMAC-SHA1 with the 32-octet HMAC session key, truncated to
    16 octets; each HMAC covers every plaintext octet sent in that direction since the
    end of the previous HMAC (so the server's first HMAC, in the first Accept-Session or
    Start-Ack, also covers Server-Start's Start-Time block); the HMAC block is then
    encrypted with the rest of the message;
  * test keys: AES key = AES-ECB(key=SID) of the control AES session key, HMAC key =
    AES-CBC(key=SID, IV=0) of the control HMAC session key (RFC 4656 §4.1.2).
"""

from __future__ import annotations

import hmac as _hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from agent.control.messages import BLOCK, HMAC_LEN, ProtocolError
from agent.engine.keys import TestKeys
from netlink.secret import Secret

DEFAULT_MAX_COUNT = 1 << 20  # client cap on PBKDF2 iterations it accepts from a server
DEFAULT_SERVER_COUNT = 1 << 12
MIN_COUNT = 1024  # RFC 4656 §3.1
ZERO_IV = bytes(16)


def check_count(count: int, max_count: int = DEFAULT_MAX_COUNT) -> None:
    """RFC 4656 §3.1: Count is a power of 2, at least 1024. Clients cap it (CPU abuse)."""
    if count < MIN_COUNT or count & (count - 1):
        raise ProtocolError(f"Count {count} is not a power of 2 >= 1024")
    if count > max_count:
        raise ProtocolError(f"Count {count} exceeds our limit {max_count}")


def pbkdf2_key(passphrase: Secret, salt: bytes, count: int) -> Secret:
    """The 16-octet shared key from a passphrase (RFC 4656 §3.1, PKCS#5 PBKDF2-HMAC-SHA1)."""
    kdf = PBKDF2HMAC(algorithm=hashes.SHA1(), length=16, salt=salt, iterations=count)
    return Secret(kdf.derive(passphrase.reveal()))


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The control session keys chosen by the client and carried in the Token."""

    aes_key: Secret  # 16
    hmac_key: Secret  # 32

    @classmethod
    def random(cls) -> "SessionKeys":
        return cls(Secret(os.urandom(16)), Secret(os.urandom(32)))


def _aes_cbc(key: bytes, iv: bytes) -> Cipher:
    return Cipher(algorithms.AES(key), modes.CBC(iv))


def encrypt_token(key: Secret, challenge: bytes, keys: SessionKeys) -> bytes:
    enc = _aes_cbc(key.reveal(), ZERO_IV).encryptor()
    return enc.update(challenge + keys.aes_key.reveal() + keys.hmac_key.reveal()) + enc.finalize()


def decrypt_token(key: Secret, token: bytes, challenge: bytes) -> SessionKeys:
    """Decrypt and check the Token; a wrong key shows as a Challenge mismatch."""
    if len(token) != 64:
        raise ProtocolError("token must be 64 octets")
    dec = _aes_cbc(key.reveal(), ZERO_IV).decryptor()
    plain = dec.update(token) + dec.finalize()
    if not _hmac.compare_digest(plain[:16], challenge):
        raise ProtocolError("token does not decrypt to our challenge (wrong shared secret?)")
    return SessionKeys(Secret(plain[16:32]), Secret(plain[32:64]))


def derive_test_keys(keys: SessionKeys, sid: bytes) -> TestKeys:
    """Per-session test keys (RFC 4656 §4.1.2; RFC 5357 §4.1.2 reuses them in both directions)."""
    if len(sid) != 16:
        raise ValueError("SID must be 16 octets")
    ecb = Cipher(algorithms.AES(sid), modes.ECB()).encryptor()
    aes = ecb.update(keys.aes_key.reveal()) + ecb.finalize()
    cbc = _aes_cbc(sid, ZERO_IV).encryptor()
    hk = cbc.update(keys.hmac_key.reveal()) + cbc.finalize()
    return TestKeys(Secret(aes), Secret(hk))


class _HmacChain:
    """HMAC-SHA1/128 over everything since the previous HMAC in one direction."""

    __slots__ = ("_key", "_h")

    def __init__(self, key: Secret) -> None:
        self._key = key
        self._h = HMAC(key.reveal(), hashes.SHA1())

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        d = self._h.finalize()[:HMAC_LEN]
        self._h = HMAC(self._key.reveal(), hashes.SHA1())
        return d

    def __repr__(self) -> str:
        return "<HMAC chain>"


class SendStream:
    """One direction, sending side: fills HMAC fields then CBC-encrypts, chaining forever.

    In unauthenticated mode it is the identity (HMAC fields stay zero).
    """

    __slots__ = ("_enc", "_mac")

    def __init__(self, keys: SessionKeys | None = None, iv: bytes | None = None) -> None:
        self._enc = None
        self._mac: _HmacChain | None = None
        if keys is not None:
            if iv is None or len(iv) != 16:
                raise ValueError("IV must be 16 octets")
            self._enc = _aes_cbc(keys.aes_key.reveal(), iv).encryptor()
            self._mac = _HmacChain(keys.hmac_key)

    @property
    def secure(self) -> bool:
        return self._enc is not None

    def seal(self, plain: bytes, hmac_offsets: tuple[int, ...] = ()) -> bytes:
        if len(plain) % BLOCK:
            raise ValueError("control messages are whole blocks")
        if self._enc is None or self._mac is None:
            return plain
        buf = bytearray(plain)
        pos = 0
        for off in hmac_offsets:
            self._mac.update(bytes(buf[pos:off]))
            buf[off:off + HMAC_LEN] = self._mac.digest()
            pos = off + HMAC_LEN
        self._mac.update(bytes(buf[pos:]))  # covered by the next HMAC we send
        return self._enc.update(bytes(buf))

    def __repr__(self) -> str:
        return f"<SendStream secure={self.secure}>"


class RecvStream:
    """One direction, receiving side: decrypts whole blocks as they arrive; the parser
    then asks :meth:`verify` for each complete message."""

    __slots__ = ("_dec", "_mac", "_raw", "plain")

    def __init__(self, keys: SessionKeys | None = None, iv: bytes | None = None) -> None:
        self._dec = None
        self._mac: _HmacChain | None = None
        self._raw = bytearray()
        self.plain = bytearray()
        if keys is not None:
            if iv is None or len(iv) != 16:
                raise ValueError("IV must be 16 octets")
            self._dec = _aes_cbc(keys.aes_key.reveal(), iv).decryptor()
            self._mac = _HmacChain(keys.hmac_key)

    @property
    def secure(self) -> bool:
        return self._dec is not None

    def feed(self, data: bytes) -> None:
        if self._dec is None:
            self.plain += data
            return
        self._raw += data
        n = len(self._raw) // BLOCK * BLOCK
        if n:
            self.plain += self._dec.update(bytes(self._raw[:n]))
            del self._raw[:n]

    def take(self, n: int) -> bytes:
        out = bytes(self.plain[:n])
        del self.plain[:n]
        return out

    def verify(self, plain: bytes, hmac_offsets: tuple[int, ...] = ()) -> None:
        """Check the HMAC fields of one decrypted message; raise ProtocolError on mismatch."""
        if self._mac is None:
            return  # unauthenticated: HMAC fields are MBZ and not checked (lenient receive)
        pos = 0
        for off in hmac_offsets:
            self._mac.update(plain[pos:off])
            if not _hmac.compare_digest(self._mac.digest(), plain[off:off + HMAC_LEN]):
                raise ProtocolError("control HMAC mismatch")
            pos = off + HMAC_LEN
        self._mac.update(plain[pos:])

    def __repr__(self) -> str:
        return f"<RecvStream secure={self.secure}>"
