"""agent.binder.keysource: the file-based IKE key source (parsing, permissions, reload, lookups)."""

from __future__ import annotations

import json
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.binder.ikev2 import PRF
from agent.binder.keysource import FileIKEKeySource, KeySourceError, parse_entries

SK_D = "462B9DD525D4FD71169174272779E704BAF62C6231779AE9EFE8C58B21916B42"


def _doc(**over) -> dict:
    e = {"spi_i": "8e5c3ae507221684", "spi_r": "b1f201bb155c3acd", "prf": "hmac-sha256", "sk_d": SK_D,
         "skeyseed": "ef" * 32, "ni": "3651fef5c9c35e93", "nr": "c09a8b90a3f04d59",
         "children": [{"reqid": 3, "spis": ["c0000001", "c0000002"]}]}
    e.update(over)
    return {"version": 1, "ike_sas": [e]}


def _write(tmp_path, doc, mode=0o600):
    p = tmp_path / "ike.json"
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    os.chmod(p, mode)
    return p


def test_lookups(tmp_path) -> None:
    src = FileIKEKeySource(_write(tmp_path, _doc()))
    m = src.by_child_spis(0xC0000002, 0xC0000001)  # any order
    assert m is not None and m is not None and m.sk_d is not None
    assert m.sk_d.reveal().hex().upper() == SK_D and m.prf is PRF.HMAC_SHA2_256
    assert src.by_reqid(3) == m
    assert src.by_reqid(4) is None and src.by_child_spis(1, 2) is None


def test_repr_and_errors_key_free(tmp_path) -> None:
    src = FileIKEKeySource(_write(tmp_path, _doc()))
    m = src.by_reqid(3)
    assert SK_D.lower() not in (repr(m) + repr(src)).lower()
    bad = _doc(sk_d="zz" + SK_D)
    with pytest.raises(KeySourceError) as ei:
        FileIKEKeySource(_write(tmp_path, bad))
    assert "sk_d is not hex" in str(ei.value) and SK_D.lower() not in str(ei.value).lower()


def test_permissions(tmp_path) -> None:
    with pytest.raises(KeySourceError):
        FileIKEKeySource(_write(tmp_path, _doc(), mode=0o644))
    assert FileIKEKeySource(_write(tmp_path, _doc(), mode=0o644), strict_perms=False).by_reqid(3) is not None


def test_reload_on_change_keeps_last_good(tmp_path) -> None:
    p = _write(tmp_path, _doc())
    src = FileIKEKeySource(p)
    assert src.by_reqid(3) is not None
    time.sleep(0.01)
    p.write_text(json.dumps(_doc(children=[{"reqid": 9, "spis": ["c0000003", "c0000004"]}])))
    assert src.by_reqid(9) is not None and src.by_reqid(3) is None
    time.sleep(0.01)
    p.write_text("{ broken")
    assert src.by_reqid(9) is not None and src.last_error is not None


@pytest.mark.parametrize("doc", [
    {"version": 2, "ike_sas": []},
    _doc(spi_i="00"),
    _doc(prf="md5"),
    _doc(children=[{"reqid": 1, "spis": ["c0000001"]}]),
    _doc(children=[{"reqid": -1, "spis": ["c0000001", "c0000002"]}]),
    _doc(children=[{"spis": ["c00001", "c0000002"]}]),
])
def test_rejects(doc) -> None:
    with pytest.raises(KeySourceError):
        parse_entries(doc)


@settings(max_examples=50, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                    max_leaves=20))
def test_parse_never_crashes_on_junk(doc) -> None:
    try:
        parse_entries(doc)
    except KeySourceError:
        pass


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["spi_i", "spi_r", "prf", "sk_d", "skeyseed", "ni", "nr", "children"]),
                       st.none() | st.integers() | st.text(max_size=20) | st.lists(st.dictionaries(
                           st.sampled_from(["reqid", "spis", "ni", "nr"]),
                           st.none() | st.integers() | st.text(max_size=10) | st.lists(st.text(max_size=10), max_size=3)),
                           max_size=2)))
def test_parse_structured_junk(entry) -> None:
    try:
        parse_entries({"version": 1, "ike_sas": [entry]})
    except KeySourceError:
        pass


def test_permissions_follow_the_key_file_rule(tmp_path) -> None:
    """The same rule as O/TWAMP key files (agent.control.keyring.check_secret_file): group
    access is refused on our own file (0640 owned by us serves nobody), others never;
    a directory or an oversized file is refused with one line, not read."""
    for mode in (0o640, 0o604, 0o660):
        with pytest.raises(KeySourceError, match="too open"):
            FileIKEKeySource(_write(tmp_path, _doc(), mode=mode))
    with pytest.raises(KeySourceError, match="not a regular file"):
        FileIKEKeySource(tmp_path)
    big = _write(tmp_path, _doc())
    big.write_bytes(b" " * (2 << 20))
    with pytest.raises(KeySourceError, match="larger than"):
        FileIKEKeySource(big)


def test_group_readable_file_of_another_owner_is_accepted(tmp_path) -> None:
    """root:xwamp 0640 written by the IKE daemon's hook, read by the agent's user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the file to another owner")
    p = _write(tmp_path, _doc(), mode=0o640)
    os.chown(p, 4242, 4242)
    assert FileIKEKeySource(p).by_reqid(3) is not None
