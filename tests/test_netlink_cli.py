"""`xwamp sas` output: table and JSON, keys redacted unless asked for."""

from __future__ import annotations

import json

from agent.commands.sas import render_table, sa_to_dict
from netlink.fake import make_sa

KEY_E, KEY_A = b"\xab" * 16, b"\xcd" * 32


def test_table_redacts_by_default() -> None:
    sas = [make_sa("192.0.2.1", "192.0.2.2", spi=0x1234, enc_key=KEY_E, auth_key=KEY_A, bytes_=500, packets=5),
           make_sa("2001:db8::2", "2001:db8::1", spi=0xC0FFEE, aead_key=b"\x01" * 20)]
    text = render_table(sas)
    assert "0x00001234" in text and "192.0.2.1 -> 192.0.2.2" in text and "cbc(aes)+hmac(sha256)" in text
    assert "rfc4106(gcm(aes))" in text and "2001:db8::2 -> 2001:db8::1" in text
    assert KEY_E.hex() not in text and KEY_A.hex() not in text
    shown = render_table(sas, show_keys=True)
    assert KEY_E.hex() in shown and KEY_A.hex() in shown


def test_json_redacts_by_default() -> None:
    sa = make_sa(enc_key=KEY_E, auth_key=KEY_A)
    doc = json.dumps(sa_to_dict(sa))
    assert KEY_E.hex() not in doc and KEY_A.hex() not in doc and "<redacted>" in doc
    d = sa_to_dict(sa, show_keys=True)
    assert d["crypt"]["key"] == KEY_E.hex() and d["auth"]["key"] == KEY_A.hex() and d["auth"]["trunc_bits"] == 128
    assert d["spi"] == "0x00001000" and d["proto"] == "esp" and d["mode"] == "tunnel" and d["family"] == 4
    json.dumps(d)  # every value serialisable


def test_redaction_warning_only_when_every_key_is_zero(caplog) -> None:
    import netlink.client as client

    client._redaction_warned = False
    client.warn_if_redacted([make_sa(enc_key=bytes(16), auth_key=bytes(32)), make_sa(spi=2)])
    assert "zeroed" not in caplog.text  # one real key: not lockdown, just a zero test key
    client.warn_if_redacted([make_sa(enc_key=bytes(16), auth_key=bytes(32))] * 2)
    client.warn_if_redacted([make_sa(enc_key=bytes(16), auth_key=bytes(32))])
    assert caplog.text.count("zeroed IPsec keys") == 1  # logged once
    assert "0000" not in caplog.text
    client._redaction_warned = False


def test_kernel_without_netlink_xfrm_is_a_clear_error(monkeypatch) -> None:
    import errno

    import pytest

    import netlink.client as client
    from netlink.errors import XfrmUnavailableError

    def no_xfrm(*args, **kwargs):
        raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    monkeypatch.setattr(client, "create_socket", no_xfrm)
    with pytest.raises(XfrmUnavailableError, match="xfrm_user"):
        client.XfrmClient()
