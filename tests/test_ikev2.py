"""agent.binder.ikev2 against published vectors (tests/data/vectors/, sources named there)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.binder import ikev2
from agent.binder.ikev2 import PRF
from netlink.secret import Secret

VECTORS = Path(__file__).parent / "data" / "vectors"


def _openssl_stanzas() -> list[dict[str, str]]:
    """Parse the OpenSSL evp test stanzas: 'Ctrl.x = name:HEX' and 'Output = HEX', blank-line separated."""
    stanzas: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    title = ""
    for line in (VECTORS / "openssl_evpkdf_ikev2.txt").read_text().splitlines() + [""]:
        line = line.strip()
        if line.startswith("#"):
            title = line.lstrip("# ")
            continue
        if not line:
            if cur:
                cur["_title"] = title
                stanzas.append(cur)
                cur = {}
            continue
        k, _, v = line.partition("=")
        k, v = k.strip(), v.strip()
        if k.startswith("Ctrl."):
            name, _, val = v.partition(":")
            cur[name.removeprefix("hex")] = val
        else:
            cur[k] = v
    return stanzas


OPENSSL = _openssl_stanzas()
DIGESTS = {"SHA256": PRF.HMAC_SHA2_256, "SHA512": PRF.HMAC_SHA2_512, "SHA384": PRF.HMAC_SHA2_384, "SHA1": PRF.HMAC_SHA1}


def test_openssl_file_parsed() -> None:
    assert len(OPENSSL) == 13
    assert {s["mode"] for s in OPENSSL} == {"0", "1", "2"}


@pytest.mark.parametrize("v", OPENSSL, ids=[s["_title"] for s in OPENSSL])
def test_acvp_ikev2_kdf(v: dict[str, str]) -> None:
    alg = DIGESTS[v["digest"]]
    h = bytes.fromhex
    ni, nr, want = h(v["ni"]), h(v["nr"]), h(v["Output"])
    mode = v["mode"]
    if mode == "0":
        got = ikev2.skeyseed(ni, nr, h(v["secret"]), alg)
    elif mode == "2":
        got = ikev2.rekey_skeyseed(h(v["key"]), h(v["secret"]), ni, nr, alg)
    elif "seed" in v:
        got = ikev2.ike_sa_keymat(h(v["seed"]), ni, nr, h(v["spii"]), h(v["spir"]), len(want), alg)
    else:
        g = h(v["secret"]) if "secret" in v else None
        got = ikev2.child_keymat(h(v["key"]), ni, nr, len(want), g, alg)
    assert got == want


def _strongswan() -> dict:
    return json.loads((VECTORS / "strongswan_prf_plus.json").read_text())


def test_strongswan_prf_plus_counter_vectors() -> None:
    data = _strongswan()
    for v in data["counter"]:
        chunks = [bytes.fromhex(c) for c in v["chunks"]]
        stream = b"".join(chunks)
        got = ikev2.prf_plus(bytes.fromhex(v["key"]), bytes.fromhex(v["seed"]), len(stream))
        assert got == stream
        # consecutive reads are prefixes of one stream
        off = 0
        for c in chunks:
            assert got[off : off + len(c)] == c
            off += len(c)


def test_strongswan_classic_first_block_is_plain_prf() -> None:
    v = _strongswan()["classic"][0]
    first = bytes.fromhex("".join(v["chunks"]))[:32]  # = RFC 4231 TC1 HMAC-SHA-256
    assert ikev2.prf(bytes.fromhex(v["key"]), bytes.fromhex(v["seed"])) == first


def test_strongswan_wrap_255_blocks() -> None:
    w = _strongswan()["wrap"]
    key, seed = bytes.fromhex(w["key"]), bytes.fromhex(w["seed"])
    assert len(ikev2.prf_plus(key, seed, w["read"] * w["ok_reads"])) == 255 * 32
    with pytest.raises(ValueError):
        ikev2.prf_plus(key, seed, w["read"] * (w["ok_reads"] + 1))


@pytest.mark.parametrize("alg,hashname", [(PRF.HMAC_SHA1, "sha1"), (PRF.HMAC_SHA2_256, "sha256"),
                                          (PRF.HMAC_SHA2_384, "sha384"), (PRF.HMAC_SHA2_512, "sha512")])
def test_prf_is_hmac(alg: PRF, hashname: str) -> None:
    assert ikev2.prf(b"k", b"data", alg) == hmac.new(b"k", b"data", hashname).digest()
    assert alg.hash_len == hashlib.new(hashname).digest_size


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=1, max_size=80), seed=st.binary(max_size=80), n=st.integers(0, 200),
       alg=st.sampled_from(list(PRF)))
def test_prf_plus_matches_rfc_construction(key: bytes, seed: bytes, n: int, alg: PRF) -> None:
    name = {PRF.HMAC_SHA1: "sha1", PRF.HMAC_SHA2_256: "sha256", PRF.HMAC_SHA2_384: "sha384", PRF.HMAC_SHA2_512: "sha512"}[alg]
    t, out, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(key, t + seed + bytes([i]), name).digest()
        out, i = out + t, i + 1
    assert ikev2.prf_plus(key, seed, n, alg) == out[:n]
    assert ikev2.prf_plus(Secret(key), seed, n, alg) == out[:n]


def test_derive_and_fit() -> None:
    k = bytes(range(40))
    assert ikev2.derive(k, "O/TWAMP enc", 16) == ikev2.prf_plus(k, b"O/TWAMP enc", 16)
    assert ikev2.fit(k[:16], 16) == k[:16]
    assert ikev2.fit(k, 16) == ikev2.prf_plus(k, b"xwamp fit", 16)
    assert len(ikev2.derive(k, "O/TWAMP auth", 32, PRF.HMAC_SHA1)) == 32  # longer than one SHA-1 block


@pytest.mark.parametrize("name,alg", [("hmac-sha256", PRF.HMAC_SHA2_256), ("SHA1", PRF.HMAC_SHA1),
                                      ("HMAC_SHA2_512", PRF.HMAC_SHA2_512), ("prf-hmac-sha-384", PRF.HMAC_SHA2_384)])
def test_prf_from_name(name: str, alg: PRF) -> None:
    assert PRF.from_name(name) is alg


def test_prf_from_name_rejects() -> None:
    with pytest.raises(ValueError):
        PRF.from_name("md5")


def test_errors_carry_no_key_bytes() -> None:
    with pytest.raises(ValueError) as ei:
        ikev2.prf_plus(b"\xaa" * 32, b"seed", 10_000)
    assert "aaaa" not in str(ei.value).lower()


def test_sk_d_chains_into_child_keymat() -> None:
    # In the ACVP set, the DKM stanza's first prf-length octets (SK_d) are the key of the
    # DKM(Child_SA) stanza with the same nonces: GEN -> DKM -> Child SA, end to end.
    by_title = {s["_title"]: s for s in OPENSSL}
    for dkm_title, child_title in (("self_test_data.c - DKM", "self_test_data.c - DKM(Child_SA)"),
                                   ("tgId = 7, tcId = 121, DKM", "tgId = 7, tcId = 121, DKM(Child_SA)")):
        dkm, child = by_title[dkm_title], by_title[child_title]
        h = bytes.fromhex
        skd = ikev2.sk_d(h(dkm["seed"]), h(dkm["ni"]), h(dkm["nr"]), h(dkm["spii"]), h(dkm["spir"]))
        assert skd == h(child["key"])
        assert ikev2.child_keymat(skd, h(child["ni"]), h(child["nr"]), len(h(child["Output"]))) == h(child["Output"])
