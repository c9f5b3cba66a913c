"""Crypto of the control plane, checked against published vectors and against
expectations composed here directly from ``cryptography`` primitives (not from
agent.control.security): Token, CBC streams chained across messages, control
HMAC coverage (including Server-Start's Start-Time block), test-session keys."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from agent.control import events as ev
from agent.control import messages as m
from agent.control import security as sec
from agent.control.client import ControlClient
from agent.control.keyring import StaticKeySource
from agent.control.server import ControlServer, ServerConfig
from netlink.secret import Secret

# ---------------------------------------------------------------- published vectors

RFC6070 = [  # (P, S, c, DK) -- PBKDF2-HMAC-SHA1; we use the first 16 octets
    (b"password", b"salt", 1, "0c60c80f961f0e71f3a9b524af6012062fe037a6"),
    (b"password", b"salt", 2, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"),
    (b"password", b"salt", 4096, "4b007901b765489abead49d926f721d065a429c1"),
    (b"passwordPASSWORDpassword", b"saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096,
     "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"),
    (b"pass\0word", b"sa\0lt", 4096, "56fa6aa75548099dcc37d7f03425e0c3"),
]


@pytest.mark.parametrize("p,s,c,dk", RFC6070)
def test_pbkdf2_rfc6070(p: bytes, s: bytes, c: int, dk: str) -> None:
    assert sec.pbkdf2_key(Secret(p), s, c).reveal() == bytes.fromhex(dk)[:16]


RFC2202 = [  # HMAC-SHA1 (key, data, digest)
    (b"\x0b" * 20, b"Hi There", "b617318655057264e28bc0b6fb378c8ef146be00"),
    (b"Jefe", b"what do ya want for nothing?", "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
    (b"\xaa" * 20, b"\xdd" * 50, "125d7342b9ac11cd91a39af48aa17b4f63f175d3"),
    (bytes(range(1, 26)), b"\xcd" * 50, "4c9007f4026250c6bc8414f9bf50c86c2d7235da"),
    (b"\x0c" * 20, b"Test With Truncation", "4c1a03424b55e07fe7f27be1d58bb9324a9a5a04"),
    (b"\xaa" * 80, b"Test Using Larger Than Block-Size Key - Hash Key First", "aa4ae5e15272d00e95705637ce8a3b55ed402112"),
    (b"\xaa" * 80, b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data",
     "e8e99d0f45237d786d6bbaa7965c7808bbff1a91"),
]


@pytest.mark.parametrize("key,data,digest", RFC2202)
def test_hmac_sha1_rfc2202_truncated(key: bytes, data: bytes, digest: str) -> None:
    chain = sec._HmacChain(Secret(key))
    chain.update(data[:7])
    chain.update(data[7:])  # split updates = one message
    assert chain.digest() == bytes.fromhex(digest)[:16]
    chain.update(data)  # the chain restarts after each digest
    assert chain.digest() == bytes.fromhex(digest)[:16]


def test_count_rules() -> None:
    sec.check_count(1024)
    for bad in (1023, 1536, 512):
        with pytest.raises(m.ProtocolError):
            sec.check_count(bad)
    with pytest.raises(m.ProtocolError):
        sec.check_count(1 << 21, max_count=1 << 20)


# ---------------------------------------------------------------- independent composition


def _cbc(key: bytes, iv: bytes):
    c = Cipher(algorithms.AES(key), modes.CBC(iv))
    return c.encryptor(), c.decryptor()


def _hmac16(key: bytes, data: bytes) -> bytes:
    h = HMAC(key, hashes.SHA1())
    h.update(data)
    return h.finalize()[:16]


def _pbkdf2(pw: bytes, salt: bytes, count: int) -> bytes:
    return PBKDF2HMAC(hashes.SHA1(), 16, salt, count).derive(pw)


def test_token_and_test_keys_vs_direct_composition() -> None:
    key = Secret(bytes(range(16)))
    keys = sec.SessionKeys(Secret(b"A" * 16), Secret(b"H" * 32))
    challenge = b"c" * 16
    token = sec.encrypt_token(key, challenge, keys)
    enc, _ = _cbc(bytes(range(16)), bytes(16))
    assert token == enc.update(challenge + b"A" * 16 + b"H" * 32) + enc.finalize()
    assert sec.decrypt_token(key, token, challenge) == keys
    with pytest.raises(m.ProtocolError):
        sec.decrypt_token(Secret(bytes(16)), token, challenge)
    sid = bytes(range(100, 116))
    tk = sec.derive_test_keys(keys, sid)
    ecb = Cipher(algorithms.AES(sid), modes.ECB()).encryptor()
    assert tk.aes_key.reveal() == ecb.update(b"A" * 16)
    cbc, _ = _cbc(sid, bytes(16))
    assert tk.hmac_key.reveal() == cbc.update(b"H" * 32)


def test_send_stream_chains_cbc_across_messages() -> None:
    keys = sec.SessionKeys(Secret(b"k" * 16), Secret(b"h" * 32))
    s = sec.SendStream(keys, b"i" * 16)
    m1 = s.seal(b"\x02" + bytes(31), (16,))
    m2 = s.seal(b"\x03" + bytes(31), (16,))
    enc, _ = _cbc(b"k" * 16, b"i" * 16)
    p1 = b"\x02" + bytes(15) + _hmac16(b"h" * 32, b"\x02" + bytes(15))
    p2 = b"\x03" + bytes(15) + _hmac16(b"h" * 32, b"\x03" + bytes(15))
    assert m1 + m2 == enc.update(p1 + p2)  # one CBC chain over both messages


def _fake_server_handshake(twamp: bool, mode: int, pw: bytes):
    """A server written with raw primitives, driving the real client."""
    ks = StaticKeySource({"bob": Secret(pw)})
    cli = ControlClient(twamp=twamp, wanted=["enc" if mode == 4 else "auth"], key_id="bob", key_source=ks)
    challenge, salt = b"C" * 16, b"S" * 16
    greet = m.ServerGreeting(mode, challenge, salt, 1024).pack()
    evs = cli.receive_data(greet)
    assert isinstance(evs[0], ev.GreetingReceived)
    resp = cli.data_to_send()
    assert len(resp) == 164 and int.from_bytes(resp[:4], "big") == mode
    assert resp[4:84].rstrip(b"\0") == b"bob"
    k = _pbkdf2(pw, salt, 1024)
    _, dec = _cbc(k, bytes(16))
    plain = dec.update(resp[84:148]) + dec.finalize()
    assert plain[:16] == challenge
    aes, hk = plain[16:32], plain[32:64]
    client_iv = resp[148:164]
    server_iv = b"V" * 16
    s_enc, _ = _cbc(aes, server_iv)
    tail = (12345).to_bytes(8, "big") + bytes(8)
    start = bytes(15) + b"\0" + server_iv + s_enc.update(tail)
    evs = cli.receive_data(start)
    assert evs == [ev.Ready(12345)]
    _, c_dec = _cbc(aes, client_iv)
    return cli, aes, hk, s_enc, c_dec, tail


@pytest.mark.parametrize("mode", [2, 4])
def test_client_wire_against_raw_server(mode: int) -> None:
    cli, aes, hk, s_enc, c_dec, tail = _fake_server_handshake(True, mode, b"sekrit")
    req = m.RequestTWSession(ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv4Address("127.0.0.1"), 4000, 0)
    cli.request_tw_session(req)
    wire = cli.data_to_send()
    assert len(wire) == 112
    plain = c_dec.update(wire)
    assert plain[:96] == req.pack()[:96]
    # The client's first HMAC covers only its own blocks since Set-Up-Response.
    assert plain[96:] == _hmac16(hk, plain[:96])
    # The server's first HMAC covers Server-Start's Start-Time block too (RFC 4656 §3.2).
    sid = bytes(range(16))
    acc = bytes([0, 0]) + (862).to_bytes(2, "big") + sid + bytes(12)
    acc_msg = acc + _hmac16(hk, tail + acc)
    evs = cli.receive_data(s_enc.update(acc_msg))
    assert len(evs) == 1 and isinstance(evs[0], ev.SessionAccepted) and evs[0].ok
    keys = evs[0].test_keys
    ecb = Cipher(algorithms.AES(sid), modes.ECB()).encryptor()
    assert keys is not None and keys.aes_key.reveal() == ecb.update(aes)
    cbc, _ = _cbc(sid, bytes(16))
    assert keys.hmac_key.reveal() == cbc.update(hk)
    # Start-Sessions / Start-Ack continue both chains.
    cli.start_sessions()
    p = c_dec.update(cli.data_to_send())
    assert p[:16] == b"\x02" + bytes(15) and p[16:] == _hmac16(hk, p[:16])
    ack = bytes(16)
    assert cli.receive_data(s_enc.update(ack + _hmac16(hk, ack))) == [ev.StartAckReceived(0)]
    cli.stop_sessions(1)
    p = c_dec.update(cli.data_to_send())
    assert p[:8] == b"\x03\x00\x00\x00\x00\x00\x00\x01" and p[16:] == _hmac16(hk, p[:16])


def test_client_rejects_tampered_hmac() -> None:
    cli, aes, hk, s_enc, c_dec, tail = _fake_server_handshake(True, 2, b"pw")
    cli.request_tw_session(m.RequestTWSession(ipaddress.IPv4Address("1.2.3.4"), ipaddress.IPv4Address("1.2.3.5")))
    c_dec.update(cli.data_to_send())
    acc = bytes(48)  # wrong HMAC (should cover tail + first 32)
    evs = cli.receive_data(s_enc.update(acc))
    assert isinstance(evs[0], ev.ProtocolFailure) and cli.closed


def test_server_wire_against_raw_client() -> None:
    pw = b"correct horse"
    ks = StaticKeySource({"carol": Secret(pw)})
    srv = ControlServer(twamp=True, config=ServerConfig(count=1024), key_source=ks)
    g = m.ServerGreeting.unpack(srv.data_to_send())
    assert g.modes == 15 and g.count == 1024
    k = _pbkdf2(pw, g.salt, g.count)
    aes, hk, civ = b"a" * 16, b"b" * 32, b"c" * 16
    enc, _ = _cbc(k, bytes(16))
    token = enc.update(g.challenge + aes + hk) + enc.finalize()
    evs = srv.receive_data((4).to_bytes(4, "big") + b"carol".ljust(80, b"\0") + token + civ)
    assert evs == [ev.SetupComplete(4, "carol")]
    out = srv.data_to_send()
    assert len(out) == 48 and out[15] == 0
    _, s_dec = _cbc(aes, out[16:32])
    tail = s_dec.update(out[32:])
    assert tail[8:] == bytes(8)
    c_enc, _ = _cbc(aes, civ)
    req = m.RequestTWSession(ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv4Address("127.0.0.1"), 4000, 0).pack()
    req = req[:96] + _hmac16(hk, req[:96])
    evs = srv.receive_data(c_enc.update(req))
    assert isinstance(evs[0], ev.SessionRequested)
    srv.accept_session(0, 5555)
    p = s_dec.update(srv.data_to_send())
    assert p[2:4] == (5555).to_bytes(2, "big") and p[4:20] == evs[0].sid
    assert p[32:] == _hmac16(hk, tail + p[:32])


def test_secrets_not_in_repr() -> None:
    keys = sec.SessionKeys(Secret(b"Q" * 16), Secret(b"R" * 32))
    s = sec.SendStream(keys, bytes(16))
    for obj in (keys, s, sec.RecvStream(keys, bytes(16)), sec.derive_test_keys(keys, bytes(16))):
        assert "QQQQ" not in repr(obj) and "RRRR" not in repr(obj)
