"""O/TWAMP keys from IPsec SAs: KEYMAT rebuilt from the kernel and the per-mode derivations.

Implements docs/wire-format.md §3–§4 on :class:`netlink.records.SA` records.
Everything key-bearing is a :class:`netlink.secret.Secret`; refusals raise
:class:`BinderRefusal`, whose ``reason`` is a :class:`Reason` (the exporter's
``binder refusals by reason`` label) and whose message names SPI/reqid only.

Functions
---------
* :func:`check_usable` — may this SA key O/TWAMP at all (draft §4.1)?
* :func:`rebuild_keymat` — keys(SA c->s) | keys(SA s->c) (RFC 7296 §2.17 order).
* :func:`token_key16` — K16, the AES-128 key replacing RFC 4656's PBKDF2 key.
* :func:`sid_test_keys` — draft §4.1 PRF{root, SID} test keys (SID-bound flag).
* :func:`alt1_keys`, :func:`alt1_token`, :func:`alt1_token_ok` — draft §4.2.1.
* :func:`alt2_keys` — draft §4.2.2.
"""

from __future__ import annotations

import enum
import hmac as _stdhmac
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.binder import ikev2
from agent.binder.ikev2 import DEFAULT_PRF, PRF
from agent.engine.keys import TestKeys
from netlink.records import SA, Proto
from netlink.secret import Secret


class Reason(str, enum.Enum):
    """Machine-readable refusal reasons (docs/wire-format.md §6)."""

    BAD_ANNOUNCEMENT = "bad_announcement"
    NO_SA = "no_sa"
    NO_REVERSE_SA = "no_reverse_sa"
    SA_MISMATCH = "sa_mismatch"
    UNSUPPORTED_PROTO = "unsupported_proto"
    ENCRYPTION_ONLY_ESP = "encryption_only_esp"
    KEYS_REDACTED = "keys_redacted"
    NO_IKE_SOURCE = "no_ike_source"
    UNSUPPORTED_PRF = "unsupported_prf"
    ALT2_AEAD = "alt2_aead"
    ALT2_AH = "alt2_ah"
    ALT2_CIPHER = "alt2_cipher"
    BAD_MODE = "bad_mode"
    SA_DELETED = "sa_deleted"


class BinderRefusal(Exception):
    """The binder will not key (or keep) this session. ``reason`` is machine-readable;
    the message carries SPI/reqid/protocol only, never key material."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = Reason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)


def describe(sa: SA) -> str:
    """Key-free one-liner for logs and refusals."""
    return f"spi=0x{sa.spi:08x} proto={int(sa.proto)} reqid={sa.reqid} {sa.saddr}->{sa.daddr}"


@dataclass(frozen=True, slots=True)
class ControlKeys:
    """The control session's AES-128 key and 32-octet HMAC key (RFC 4656 §3.1),
    here derived rather than carried in the Token (Alternatives 1 and 2)."""

    aes_key: Secret
    hmac_key: Secret

    def __post_init__(self) -> None:
        if len(self.aes_key) != 16 or len(self.hmac_key) != 32:
            raise ValueError("control keys must be a 16-octet AES key and a 32-octet HMAC key")

    def as_test_keys(self) -> TestKeys:
        """Draft §4.2: one enc/auth pair serves Control and every Test session."""
        return TestKeys(self.aes_key, self.hmac_key)


# --- what an SA contributes ----------------------------------------------------

_NULL_AUTH = {"digest_null"}


def _has_integrity(sa: SA) -> bool:
    if sa.aead is not None:
        return True  # AEAD: integrity is part of the transform
    return sa.auth is not None and len(sa.auth.key) > 0 and sa.auth.name not in _NULL_AUTH


def check_usable(sa: SA) -> None:
    """Raise BinderRefusal unless ``sa`` can key O/TWAMP (wire-format §6)."""
    p = int(sa.proto)
    if p not in (Proto.ESP, Proto.AH):
        raise BinderRefusal(Reason.UNSUPPORTED_PROTO, describe(sa))
    if sa.keys_redacted:
        raise BinderRefusal(Reason.KEYS_REDACTED, describe(sa))
    if not _has_integrity(sa):
        # Draft §4.1: encryption-only ESP yields no integrity key; prohibited for O/TWAMP.
        raise BinderRefusal(Reason.ENCRYPTION_ONLY_ESP if p == Proto.ESP else Reason.SA_MISMATCH, describe(sa))


def sa_key_material(sa: SA) -> bytes:
    """The SA's slice of KEYMAT: encryption key (if any) then integrity key (if any).

    RFC 7296 §2.17: "the encryption key (if any) MUST be taken from the first
    bits and the integrity key (if any) MUST be taken from the remaining bits";
    an AEAD key already includes its salt (RFC 4106 §8.1: key | 4-octet salt).
    """
    check_usable(sa)
    if sa.aead is not None:
        return sa.aead.key.reveal()
    enc = sa.crypt.key.reveal() if sa.crypt is not None else b""
    return enc + sa.auth.key.reveal()  # type: ignore[union-attr]  # _has_integrity checked it


def rebuild_keymat(c2s: SA, s2c: SA) -> Secret:
    """KEYMAT = keys(SA client->server) | keys(SA server->client) (wire-format §3).

    Equals the prefix of prf+(SK_d, Ni | Nr) that IPsec used when the O/TWAMP
    client was the IKE initiator; otherwise its two halves are swapped. Both
    ends compute the same string, which is what a shared secret needs.
    """
    check_usable(c2s)
    check_usable(s2c)
    if int(c2s.proto) != int(s2c.proto):
        raise BinderRefusal(Reason.SA_MISMATCH, f"{describe(c2s)} vs {describe(s2c)}: protocols differ")
    if c2s.key_id == s2c.key_id:
        raise BinderRefusal(Reason.NO_REVERSE_SA, describe(c2s))
    return Secret(sa_key_material(c2s) + sa_key_material(s2c))


# --- derivations ------------------------------------------------------------

SHARED_LABEL = b"xwamp shared secret"
ENC_LABEL = b"O/TWAMP enc"  # draft §4.2.1
AUTH_LABEL = b"O/TWAMP auth"  # draft §4.2.1


def token_key16(root: Secret, alg: PRF = DEFAULT_PRF) -> Secret:
    """K16 = derive(Root, "xwamp shared secret", 16): replaces RFC 4656's PBKDF2 key (IPSEC_BOUND, Alt 1)."""
    return Secret(ikev2.derive(root, SHARED_LABEL, 16, alg))


def sid_test_keys(root: Secret, sid: bytes, alg: PRF = DEFAULT_PRF) -> TestKeys:
    """Draft §4.1 "PRF{KEYMAT, Session ID}": S_sid = prf(Root, SID), then enc/auth by label.

    Only once Accept-Session has delivered the SID (wire-format §4.1).
    """
    if len(sid) != 16:
        raise ValueError("SID must be 16 octets")
    s_sid = ikev2.prf(root, sid, alg)
    return TestKeys(Secret(ikev2.derive(s_sid, ENC_LABEL, 16, alg)), Secret(ikev2.derive(s_sid, AUTH_LABEL, 32, alg)))


def alt1_keys(root: Secret, alg: PRF = DEFAULT_PRF) -> ControlKeys:
    """Draft §4.2.1: enc = PRF{root, "O/TWAMP enc"}, auth = PRF{root, "O/TWAMP auth"}, fitted by derive()."""
    return ControlKeys(Secret(ikev2.derive(root, ENC_LABEL, 16, alg)), Secret(ikev2.derive(root, AUTH_LABEL, 32, alg)))


def _aes_cbc_iv0(key: bytes, data: bytes, decrypt: bool = False) -> bytes:
    c = Cipher(algorithms.AES(key), modes.CBC(bytes(16)))
    op = c.decryptor() if decrypt else c.encryptor()
    return op.update(data) + op.finalize()


def alt1_token(root: Secret, challenge: bytes, alg: PRF = DEFAULT_PRF) -> bytes:
    """Draft §4.2.1 Token = Enc_root(Challenge): AES-128-CBC(K16, IV 0) over Challenge | 0^48 (64 octets)."""
    if len(challenge) != 16:
        raise ValueError("Challenge must be 16 octets")
    return _aes_cbc_iv0(token_key16(root, alg).reveal(), challenge + bytes(48))


def alt1_token_ok(root: Secret, challenge: bytes, token: bytes, alg: PRF = DEFAULT_PRF) -> bool:
    """Server side: the Token decrypts to our Challenge followed by 48 zero octets (constant-time compare)."""
    if len(token) != 64 or len(challenge) != 16:
        return False
    plain = _aes_cbc_iv0(token_key16(root, alg).reveal(), token, decrypt=True)
    return _stdhmac.compare_digest(plain, challenge + bytes(48))


ALT2_TOKEN = bytes(64)  # wire-format §4.3: Token MBZ


def alt2_keys(c2s: SA, alg: PRF = DEFAULT_PRF) -> ControlKeys:
    """Draft §4.2.2: session keys = the client->server SA's own keys, fitted (wire-format §4.3)."""
    check_usable(c2s)
    if int(c2s.proto) == Proto.AH:
        raise BinderRefusal(Reason.ALT2_AH, describe(c2s))
    if c2s.aead is not None:
        raise BinderRefusal(Reason.ALT2_AEAD, describe(c2s))
    if c2s.crypt is None or c2s.crypt.name != "cbc(aes)" or len(c2s.crypt.key) not in (16, 24, 32):
        raise BinderRefusal(Reason.ALT2_CIPHER, describe(c2s))
    assert c2s.auth is not None  # check_usable
    return ControlKeys(Secret(ikev2.fit(c2s.crypt.key, 16, alg)), Secret(ikev2.fit(c2s.auth.key, 32, alg)))
