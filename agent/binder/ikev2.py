"""IKEv2 pseudo-random functions: prf, prf+ and the RFC 7296 key derivations.

Pure functions over octet strings, built on ``cryptography``'s HMAC. They
return ``bytes``; callers that keep the result wrap it in
:class:`netlink.secret.Secret` (see :mod:`agent.binder.keys`). Nothing here
logs, and exceptions never carry key bytes.

* :class:`PRF` — HMAC-SHA1 / SHA-256 (default) / SHA-384 / SHA-512, numbered
  with their IKEv2 Transform Type 2 IDs (the greeting carries that ID,
  docs/wire-format.md §2.1).
* :func:`prf`, :func:`prf_plus` — RFC 7296 §2.13.
* :func:`skeyseed`, :func:`ike_sa_keymat`, :func:`sk_d`, :func:`child_keymat`,
  :func:`rekey_skeyseed` — RFC 7296 §2.14, §2.17, §2.18.
* :func:`derive`, :func:`fit` — xwamp's length-fitting rules
  (docs/wire-format.md §3).
"""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac

from netlink.secret import Secret

KeyLike = bytes | bytearray | memoryview | Secret

PRF_PLUS_MAX_BLOCKS = 255  # RFC 7296 §2.13: the one-octet counter ends at 255


class PRF(enum.IntEnum):
    """Variable-key-length HMAC PRFs, valued by IKEv2 Transform Type 2 ID (IANA)."""

    HMAC_SHA1 = 2
    HMAC_SHA2_256 = 5
    HMAC_SHA2_384 = 6
    HMAC_SHA2_512 = 7

    @property
    def hash_len(self) -> int:
        return _HASHES[self]().digest_size

    @classmethod
    def from_name(cls, name: str) -> "PRF":
        """'hmac-sha256', 'sha256', 'HMAC_SHA2_256', 'sha-256' ... -> PRF."""
        key = name.strip().lower().replace("_", "-").removeprefix("prf-").removeprefix("hmac-")
        key = key.replace("sha2-", "sha").replace("sha-", "sha")
        try:
            return _NAMES[key]
        except KeyError:
            raise ValueError(f"unknown PRF name {name!r}") from None


DEFAULT_PRF = PRF.HMAC_SHA2_256

_HASHES: dict[PRF, type[hashes.HashAlgorithm]] = {
    PRF.HMAC_SHA1: hashes.SHA1,
    PRF.HMAC_SHA2_256: hashes.SHA256,
    PRF.HMAC_SHA2_384: hashes.SHA384,
    PRF.HMAC_SHA2_512: hashes.SHA512,
}
_NAMES = {"sha1": PRF.HMAC_SHA1, "sha256": PRF.HMAC_SHA2_256, "sha384": PRF.HMAC_SHA2_384, "sha512": PRF.HMAC_SHA2_512}


def _raw(k: KeyLike) -> bytes:
    return k.reveal() if isinstance(k, Secret) else bytes(k)


def prf(key: KeyLike, data: KeyLike, alg: PRF = DEFAULT_PRF) -> bytes:
    """prf(K, S) = HMAC-<hash>(K, S); the key is used as is (RFC 7296 §2.13, variable-length-key PRFs)."""
    h = _hmac.HMAC(_raw(key), _HASHES[PRF(alg)]())
    h.update(_raw(data))
    return h.finalize()


def prf_plus(key: KeyLike, seed: KeyLike, length: int, alg: PRF = DEFAULT_PRF) -> bytes:
    """RFC 7296 §2.13: T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n); first ``length`` octets of T1 | T2 | ...

    prf+ is undefined past 255 blocks, so asking for more raises ValueError.
    """
    alg = PRF(alg)
    if length < 0:
        raise ValueError("negative prf+ length")
    if length > PRF_PLUS_MAX_BLOCKS * alg.hash_len:
        raise ValueError(f"prf+ cannot produce {length} octets with {alg.name} (max {PRF_PLUS_MAX_BLOCKS} blocks)")
    k, s = _raw(key), _raw(seed)
    out = bytearray()
    t = b""
    n = 1
    while len(out) < length:
        t = prf(k, t + s + bytes((n,)), alg)
        out += t
        n += 1
    return bytes(out[:length])


def skeyseed(ni: bytes, nr: bytes, g_ir: KeyLike, alg: PRF = DEFAULT_PRF) -> bytes:
    """RFC 7296 §2.14: SKEYSEED = prf(Ni | Nr, g^ir)."""
    return prf(ni + nr, g_ir, alg)


def ike_sa_keymat(
    skeyseed_: KeyLike, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes, length: int, alg: PRF = DEFAULT_PRF
) -> bytes:
    """RFC 7296 §2.14: {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr)."""
    return prf_plus(skeyseed_, ni + nr + spi_i + spi_r, length, alg)


def sk_d(skeyseed_: KeyLike, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes, alg: PRF = DEFAULT_PRF) -> bytes:
    """SK_d: the first prf-output-length octets of the §2.14 stream (its length is the PRF's preferred key size, §2.13)."""
    alg = PRF(alg)
    return ike_sa_keymat(skeyseed_, ni, nr, spi_i, spi_r, alg.hash_len, alg)


def child_keymat(
    sk_d: KeyLike, ni: bytes, nr: bytes, length: int, g_ir_new: KeyLike | None = None, alg: PRF = DEFAULT_PRF
) -> bytes:
    """RFC 7296 §2.17: KEYMAT = prf+(SK_d, Ni | Nr), or prf+(SK_d, g^ir (new) | Ni | Nr) with PFS."""
    seed = (_raw(g_ir_new) if g_ir_new is not None else b"") + ni + nr
    return prf_plus(sk_d, seed, length, alg)


def rekey_skeyseed(sk_d_old: KeyLike, g_ir_new: KeyLike, ni: bytes, nr: bytes, alg: PRF = DEFAULT_PRF) -> bytes:
    """RFC 7296 §2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)."""
    return prf(sk_d_old, _raw(g_ir_new) + ni + nr, alg)


def derive(key: KeyLike, label: bytes | str, n: int, alg: PRF = DEFAULT_PRF) -> bytes:
    """xwamp's PRF{K, label} fitted to n octets: the first n octets of prf+(K, label) (wire-format §3)."""
    lab = label.encode("ascii") if isinstance(label, str) else label
    return prf_plus(key, lab, n, alg)


FIT_LABEL = b"xwamp fit"


def fit(key: KeyLike, n: int, alg: PRF = DEFAULT_PRF) -> bytes:
    """K itself when it already has n octets, else derive(K, "xwamp fit", n) (wire-format §3, Alternative 2)."""
    raw = _raw(key)
    return raw if len(raw) == n else derive(raw, FIT_LABEL, n, alg)
