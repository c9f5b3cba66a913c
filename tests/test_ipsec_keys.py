"""agent.binder.keys: KEYMAT rebuilt from kernel SA records, per-mode derivations, refusals."""

from __future__ import annotations

import dataclasses
import hmac
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.binder import ikev2
from agent.binder import keys as ik
from agent.binder.ikev2 import PRF
from agent.binder.keys import BinderRefusal, Reason
from netlink.fake import make_sa
from netlink.records import Algorithm, Proto
from netlink.secret import Secret

C, S = "192.0.2.10", "192.0.2.20"


def _independent_prf_plus(key: bytes, seed: bytes, n: int, h: str = "sha256") -> bytes:
    """RFC 7296 §2.13 computed here with the stdlib HMAC, not with agent.binder.ikev2."""
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(key, t + seed + bytes([i]), h).digest()
        out, i = out + t, i + 1
    return out[:n]


def _ike_child(sk_d: bytes, ni: bytes, nr: bytes, enc_len: int, int_len: int, aead: bool = False):
    """Generate the SA pair the way an IKE daemon does (RFC 7296 §2.17) and return
    (KEYMAT prefix, SA initiator->responder, SA responder->initiator), client = initiator."""
    per = enc_len + (0 if aead else int_len)
    keymat = _independent_prf_plus(sk_d, ni + nr, 2 * per)
    halves = keymat[:per], keymat[per:]
    sas = []
    for (src, dst, spi), k in zip(((C, S, 0xC0000001), (S, C, 0xC0000002)), halves):
        if aead:
            sas.append(make_sa(src, dst, spi=spi, reqid=7, aead_key=k))
        else:
            sas.append(make_sa(src, dst, spi=spi, reqid=7, enc_key=k[:enc_len], auth_key=k[enc_len:]))
    return keymat, sas[0], sas[1]


@settings(max_examples=25, deadline=None)
@given(sk_d=st.binary(min_size=32, max_size=32), ni=st.binary(min_size=8, max_size=64),
       nr=st.binary(min_size=8, max_size=64), enc_len=st.sampled_from([16, 24, 32]), int_len=st.sampled_from([20, 32, 48, 64]))
def test_keymat_rebuilt_from_sas_equals_prf_plus(sk_d: bytes, ni: bytes, nr: bytes, enc_len: int, int_len: int) -> None:
    keymat, i2r, r2i = _ike_child(sk_d, ni, nr, enc_len, int_len)
    assert ik.rebuild_keymat(i2r, r2i).reveal() == keymat
    # O/TWAMP client was the IKE responder: same string on both ends, halves swapped.
    swapped = ik.rebuild_keymat(r2i, i2r).reveal()
    assert swapped == keymat[len(keymat) // 2 :] + keymat[: len(keymat) // 2]


def test_keymat_gcm_includes_salt() -> None:
    # rfc4106(gcm(aes)) with AES-128: 16-octet key + 4-octet salt per direction, straight from KEYMAT.
    keymat, i2r, r2i = _ike_child(os.urandom(32), os.urandom(32), os.urandom(32), 20, 0, aead=True)
    assert len(keymat) == 40
    assert ik.rebuild_keymat(i2r, r2i).reveal() == keymat


def test_keymat_ah_is_integrity_only() -> None:
    a = make_sa(C, S, spi=0x1001, proto=Proto.AH, auth_key=b"\x01" * 32)
    b = make_sa(S, C, spi=0x1002, proto=Proto.AH, auth_key=b"\x02" * 32)
    assert ik.rebuild_keymat(a, b).reveal() == b"\x01" * 32 + b"\x02" * 32


def _enc_only(sa):
    return dataclasses.replace(sa, auth=None)


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (_enc_only, Reason.ENCRYPTION_ONLY_ESP),
        (lambda sa: dataclasses.replace(sa, auth=Algorithm("digest_null", Secret(b""), 0)), Reason.ENCRYPTION_ONLY_ESP),
        (lambda sa: dataclasses.replace(sa, proto=Proto.COMP), Reason.UNSUPPORTED_PROTO),
        (lambda sa: make_sa(C, S, enc_key=bytes(16), auth_key=bytes(32)), Reason.KEYS_REDACTED),
    ],
)
def test_refusals(mutate, reason: Reason) -> None:
    good = make_sa(S, C, spi=0x2002)
    with pytest.raises(BinderRefusal) as ei:
        ik.rebuild_keymat(mutate(make_sa(C, S, spi=0x2001)), good)
    assert ei.value.reason is reason
    assert ei.value.reason.value == reason.value  # str-valued, ready for a metric label


def test_refusal_messages_never_carry_keys() -> None:
    key = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")
    sa = dataclasses.replace(make_sa(C, S, spi=0xABCD1234, enc_key=key), auth=None)
    with pytest.raises(BinderRefusal) as ei:
        ik.check_usable(sa)
    text = str(ei.value) + repr(ei.value)
    assert "0xabcd1234" in text
    assert key.hex() not in text.lower() and "a1b2c3" not in text.lower()


def test_mismatched_protocols_refused() -> None:
    a = make_sa(C, S, spi=0x1)
    b = make_sa(S, C, spi=0x2, proto=Proto.AH)
    with pytest.raises(BinderRefusal) as ei:
        ik.rebuild_keymat(a, b)
    assert ei.value.reason is Reason.SA_MISMATCH


def test_token_key_and_sid_keys() -> None:
    root = Secret(bytes(range(96)))
    k16 = ik.token_key16(root)
    assert k16.reveal() == _independent_prf_plus(root.reveal(), b"xwamp shared secret", 16)
    sid = bytes(range(16, 32))
    tk = ik.sid_test_keys(root, sid)
    s_sid = hmac.new(root.reveal(), sid, "sha256").digest()
    assert tk.aes_key.reveal() == _independent_prf_plus(s_sid, b"O/TWAMP enc", 16)
    assert tk.hmac_key.reveal() == _independent_prf_plus(s_sid, b"O/TWAMP auth", 32)
    assert ik.sid_test_keys(root, bytes(16)) != tk  # per-SID
    with pytest.raises(ValueError):
        ik.sid_test_keys(root, b"short")


@pytest.mark.parametrize("alg", list(PRF))
def test_alt1_keys_and_token(alg: PRF) -> None:
    root = Secret(os.urandom(64))
    keys = ik.alt1_keys(root, alg)
    assert len(keys.aes_key) == 16 and len(keys.hmac_key) == 32
    assert keys.as_test_keys().aes_key == keys.aes_key
    challenge = os.urandom(16)
    tok = ik.alt1_token(root, challenge, alg)
    assert len(tok) == 64
    # independent check: AES-128-CBC IV=0 over Challenge | 0^48 with K16
    k16 = ik.token_key16(root, alg).reveal()
    enc = Cipher(algorithms.AES(k16), modes.CBC(bytes(16))).encryptor()
    assert tok == enc.update(challenge + bytes(48)) + enc.finalize()
    assert ik.alt1_token_ok(root, challenge, tok, alg)
    assert not ik.alt1_token_ok(root, os.urandom(16), tok, alg)
    assert not ik.alt1_token_ok(Secret(os.urandom(64)), challenge, tok, alg)
    assert not ik.alt1_token_ok(root, challenge, tok[:32], alg)


def test_alt2_direct_and_fitted() -> None:
    sa = make_sa(C, S, enc_key=b"\x11" * 16, auth_key=b"\x22" * 32)
    keys = ik.alt2_keys(sa)
    assert keys.aes_key.reveal() == b"\x11" * 16 and keys.hmac_key.reveal() == b"\x22" * 32  # "equal", draft §4.2.2
    sa256 = dataclasses.replace(sa, crypt=Algorithm("cbc(aes)", Secret(b"\x33" * 32), 256),
                                auth=Algorithm("hmac(sha1)", Secret(b"\x44" * 20), 160, trunc_bits=96))
    k = ik.alt2_keys(sa256)
    assert k.aes_key.reveal() == ikev2.derive(b"\x33" * 32, b"xwamp fit", 16)
    assert k.hmac_key.reveal() == ikev2.derive(b"\x44" * 20, b"xwamp fit", 32)


@pytest.mark.parametrize(
    "sa,reason",
    [
        (make_sa(C, S, aead_key=b"\x55" * 20), Reason.ALT2_AEAD),
        (make_sa(C, S, proto=Proto.AH), Reason.ALT2_AH),
        (dataclasses.replace(make_sa(C, S), crypt=Algorithm("rfc3686(ctr(aes))", Secret(b"\x66" * 20), 160)), Reason.ALT2_CIPHER),
        (_enc_only(make_sa(C, S)), Reason.ENCRYPTION_ONLY_ESP),
    ],
)
def test_alt2_refusals(sa, reason: Reason) -> None:
    with pytest.raises(BinderRefusal) as ei:
        ik.alt2_keys(sa)
    assert ei.value.reason is reason


def test_control_keys_repr_is_key_free() -> None:
    keys = ik.alt1_keys(Secret(b"\x99" * 40))
    r = repr(keys) + str(keys)
    assert keys.aes_key.reveal().hex() not in r and "Secret" in r
    with pytest.raises(ValueError):
        ik.ControlKeys(Secret(b"x" * 15), Secret(b"y" * 32))


def _acvp_child_sa_stanzas() -> list[dict[str, str]]:
    """The DKM(Child_SA) stanzas (key, ni, nr, no secret) of the stored ACVP/OpenSSL vectors."""
    from pathlib import Path

    text = (Path(__file__).parent / "data" / "vectors" / "openssl_evpkdf_ikev2.txt").read_text()
    out = []
    for block in text.split("\n\n"):
        kv = {}
        for line in block.splitlines():
            if line.startswith("Ctrl."):
                name, _, val = line.split("=", 1)[1].strip().partition(":")
                kv[name.removeprefix("hex")] = val
            elif line.startswith("Output"):
                kv["out"] = line.split("=", 1)[1].strip()
        if kv.get("mode") == "1" and "key" in kv and "secret" not in kv and kv.get("digest") == "SHA256":
            out.append(kv)
    return out


@pytest.mark.parametrize("v", _acvp_child_sa_stanzas())
def test_keymat_rebuilt_matches_acvp_child_sa_vector(v) -> None:
    # An IKE daemon slices the ACVP Child SA KEYMAT into AES-256 + HMAC-SHA-256 keys per
    # direction (RFC 7296 §2.17); the kernel SAs it installs rebuild exactly that prefix.
    keymat = bytes.fromhex(v["out"])
    per = 32 + 32
    i2r = make_sa(C, S, spi=0xC0000001, enc_key=keymat[:32], auth_key=keymat[32:per])
    r2i = make_sa(S, C, spi=0xC0000002, enc_key=keymat[per:per + 32], auth_key=keymat[per + 32:2 * per])
    assert ik.rebuild_keymat(i2r, r2i).reveal() == keymat[: 2 * per]
    assert ikev2.child_keymat(bytes.fromhex(v["key"]), bytes.fromhex(v["ni"]), bytes.fromhex(v["nr"]), 2 * per) \
        == keymat[: 2 * per]
