"""The key seam: key files, chaining, and the hooks an IPsec binder plugs in."""

from __future__ import annotations

import ipaddress
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from agent.control import events as ev
from agent.control import messages as m
from agent.control.client import ControlClient
from agent.control.keyring import (
    ChainedKeySource,
    HandshakeContext,
    KeyFileError,
    KeySource,
    PassphraseFile,
    StaticKeySource,
    resolve_token_key,
)
from agent.control.server import ControlServer, ServerConfig
from agent.engine.keys import TestKeys
from netlink.secret import Secret

CTX = HandshakeContext("server", "twamp", salt=b"s" * 16, count=1024)


def test_xwamp_keyfile(tmp_path) -> None:
    p = tmp_path / "keys"
    p.write_text("# comment\n\nalice  pass phrase with spaces\nbob\tx\n")
    p.chmod(0o600)
    kf = PassphraseFile(p)
    assert isinstance(kf, KeySource)
    assert kf.shared_secret("alice", CTX) == Secret(b"pass phrase with spaces")
    assert kf.shared_secret("bob", CTX) == Secret(b"x")
    assert kf.shared_secret("carol", CTX) is None
    assert "pass phrase" not in repr(kf)
    p.write_text("carol new\n")
    os.utime(p, (1, 1))  # force an mtime change even within the same second
    assert kf.shared_secret("carol", CTX) == Secret(b"new") and kf.shared_secret("alice", CTX) is None


def test_pfs_keyfile(tmp_path) -> None:
    p = tmp_path / "owamp-server.pfs"
    p.write_text("alice 736563726574\n")
    p.chmod(0o600)
    assert PassphraseFile(p).shared_secret("alice", CTX) == Secret(b"secret")
    p.write_text("alice nothex\n")
    with pytest.raises(KeyFileError) as e:
        PassphraseFile(p)
    assert "nothex" not in str(e.value)


def test_keyfile_errors_do_not_leak(tmp_path) -> None:
    p = tmp_path / "k"
    p.write_text("lonelysecretword\n")
    p.chmod(0o600)
    with pytest.raises(KeyFileError) as e:
        PassphraseFile(p)
    assert "lonelysecretword" not in str(e.value)


@pytest.mark.parametrize("content, mode, why", [
    (b"alice secret\n", 0o644, "too open"),
    (b"alice secret\n", 0o640, "too open"),
    (b"alice secret\n", 0o602, "too open"),
    (b"alice s\xffcret\n", 0o600, ":1: not UTF-8"),
    (b"alice\n", 0o600, ":1: expected 'identity passphrase'"),
])
def test_keyfile_refused_in_one_line(tmp_path, content: bytes, mode: int, why: str) -> None:
    p = tmp_path / "k"
    p.write_bytes(content)
    p.chmod(mode)
    with pytest.raises(KeyFileError) as e:
        PassphraseFile(p)
    assert why in str(e.value) and "\n" not in str(e.value) and "secret" not in str(e.value)


def test_keyfile_directory_and_missing_refused(tmp_path) -> None:
    with pytest.raises(KeyFileError, match="not a regular file"):
        PassphraseFile(tmp_path)
    with pytest.raises(KeyFileError, match="No such file"):
        PassphraseFile(tmp_path / "nope")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another owner")
def test_keyfile_shared_with_a_group_by_another_owner(tmp_path) -> None:
    """root:xwamp 0640 read by the agent's user (packaging/xwamp.service): allowed, as ssh
    allows a key file it does not own; the same mode on our own file is refused."""
    p = tmp_path / "k"
    p.write_text("alice secret\n")
    p.chmod(0o640)
    os.chown(p, 65534, os.getegid())  # another owner; we read it (as root here, through the group in real life)
    assert PassphraseFile(p).shared_secret("alice", CTX) == Secret(b"secret")
    p.chmod(0o644)
    with pytest.raises(KeyFileError, match="by others"):
        PassphraseFile(p)


def test_keyfile_group_readable_allowed_without_strict_perms(tmp_path) -> None:
    p = tmp_path / "k"
    p.write_text("alice secret\n")
    p.chmod(0o644)
    assert PassphraseFile(p, strict_perms=False).shared_secret("alice", CTX) == Secret(b"secret")


def test_resolve_token_key_pbkdf2() -> None:
    src = StaticKeySource({"a": Secret(b"pw")})
    k = resolve_token_key(src, "a", CTX)
    assert k is not None and k.reveal() == PBKDF2HMAC(hashes.SHA1(), 16, b"s" * 16, 1024).derive(b"pw")
    assert resolve_token_key(src, "b", CTX) is None


class FakeIPsecBinder:
    """What the IPsec engineer's binder looks like from here: keys from (SPI, proto, addresses)."""

    def __init__(self) -> None:
        self.seen: list[HandshakeContext] = []

    def greeting_extra(self, ctx: HandshakeContext) -> bytes:
        return (0x01020304).to_bytes(4, "big") + bytes([50]) + bytes(7)

    def token_key(self, key_id: str, ctx: HandshakeContext) -> Secret | None:
        self.seen.append(ctx)
        if ctx.ipsec_hint != (0x01020304, 50):
            return None
        return Secret(b"K" * 16)

    def test_keys(self, sid: bytes, ctx: HandshakeContext) -> TestKeys:
        return TestKeys(Secret(sid), Secret(sid * 2))

    def shared_secret(self, key_id: str, ctx: HandshakeContext) -> Secret | None:
        return None


def test_ipsec_binder_replaces_pbkdf2_and_test_keys() -> None:
    lo = ipaddress.IPv4Address("127.0.0.1")
    sb, cb = FakeIPsecBinder(), FakeIPsecBinder()
    srv = ControlServer(True, ServerConfig(count=1024), ChainedKeySource(sb), local=(lo, 862), peer=(lo, 5555))
    cli = ControlClient(True, ["auth"], "", ChainedKeySource(cb), local=(lo, 5555), peer=(lo, 862),
                        max_count=1024)
    greet = srv.data_to_send()
    assert greet[:5] == bytes([1, 2, 3, 4, 50])
    cli.receive_data(greet)
    assert srv.receive_data(cli.data_to_send()) == [ev.SetupComplete(2, "")]
    assert isinstance(cli.receive_data(srv.data_to_send())[0], ev.Ready)
    assert sb.seen[0].peer == (lo, 5555) and cb.seen[0].ipsec_hint == (0x01020304, 50)
    cli.request_tw_session(m.RequestTWSession(lo, lo))
    sid = srv.receive_data(cli.data_to_send())[0].sid
    srv.accept_session(0, 1000)
    acc = cli.receive_data(srv.data_to_send())[0]
    assert acc.test_keys == TestKeys(Secret(sid), Secret(sid * 2)) == srv.test_keys(sid)


def test_chained_first_answer_wins() -> None:
    a = StaticKeySource({"x": Secret(b"1")})
    b = StaticKeySource({"x": Secret(b"2"), "y": Secret(b"3")})
    c = ChainedKeySource(a, b)
    assert c.shared_secret("x", CTX) == Secret(b"1") and c.shared_secret("y", CTX) == Secret(b"3")
    assert c.token_key("x", CTX) is None and c.test_keys(bytes(16), CTX) is None


class FakeAlt1:
    """Derived control keys, Token = Enc(Challenge | 0^48) (wire-format §4.2 shape)."""

    BIT = 0x40000000

    def __init__(self, root: bytes) -> None:
        self.root = root

    def _keys(self):
        from agent.control.security import SessionKeys

        return SessionKeys(Secret(self.root[:16]), Secret(self.root[:16] * 2))

    def _enc(self, data: bytes, decrypt: bool = False) -> bytes:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        c = Cipher(algorithms.AES(self.root[16:32]), modes.CBC(bytes(16)))
        op = c.decryptor() if decrypt else c.encryptor()
        return op.update(data) + op.finalize()

    def make_token(self, key_id, ctx, challenge):
        if not ctx.mode & self.BIT:
            return None
        return self._enc(challenge + bytes(48)), self._keys()

    def open_token(self, key_id, ctx, challenge, token):
        from agent.control.keyring import TokenRejected

        if not ctx.mode & self.BIT:
            return None
        if self._enc(token, decrypt=True) != challenge + bytes(48):
            raise TokenRejected("bad")
        return self._keys()

    def test_keys(self, sid, ctx):
        k = self._keys()
        return TestKeys(k.aes_key, k.hmac_key) if ctx.mode & self.BIT else None

    def shared_secret(self, key_id, ctx):
        return None

    def serves_key_mode(self, bit, protocol):  # an unannounced key mode is offered when served
        return bit == self.BIT


def test_key_mode_with_derived_session_keys() -> None:
    from agent.control import modes as md

    md.register_key_mode(md.KeyMode(FakeAlt1.BIT, "test-alt1", with_unauth=False, announced=False))
    lo = ipaddress.IPv4Address("127.0.0.1")
    for cli_root, ok in ((b"r" * 32, True), (b"q" * 32, False)):
        srv = ControlServer(True, ServerConfig(count=1024, modes=2 | FakeAlt1.BIT), FakeAlt1(b"r" * 32))
        cli = ControlClient(True, ["auth+test-alt1"], "xwamp-ipsec", FakeAlt1(cli_root), max_count=1024)
        g = srv.data_to_send()
        assert m.ServerGreeting.unpack(g).modes == 2 | FakeAlt1.BIT
        cli.receive_data(g)
        assert cli.mode == 2 | FakeAlt1.BIT
        evs = srv.receive_data(cli.data_to_send())
        if not ok:
            assert isinstance(evs[0], ev.SetupRejected) and evs[0].accept == m.ACCEPT_FAILURE
            continue
        assert isinstance(cli.receive_data(srv.data_to_send())[0], ev.Ready)
        cli.request_tw_session(m.RequestTWSession(lo, lo))
        sid = srv.receive_data(cli.data_to_send())[0].sid
        srv.accept_session(0, 1)
        acc = cli.receive_data(srv.data_to_send())[0]
        assert acc.test_keys == TestKeys(Secret(b"r" * 16), Secret(b"r" * 32)) == srv.test_keys(sid)
    # an unauthenticated mode with a key bit that needs keys: Accept=3
    srv = ControlServer(True, ServerConfig(count=1024, modes=1 | FakeAlt1.BIT), FakeAlt1(b"r" * 32))
    srv.data_to_send()
    evs = srv.receive_data(m.SetUpResponse(1 | FakeAlt1.BIT).pack())
    assert evs[0].accept == m.ACCEPT_NOT_SUPPORTED


def test_announced_key_modes_need_an_announcement_and_forget_is_called() -> None:
    from agent.control import modes as md

    md.register_key_mode(md.KeyMode(0x20000000, "test-announced"))

    class Src(FakeIPsecBinder):
        def __init__(self, extra: bytes | None) -> None:
            super().__init__()
            self.extra = extra
            self.forgotten: list[HandshakeContext] = []

        def greeting_extra(self, ctx):
            return self.extra

        def forget(self, ctx) -> None:
            self.forgotten.append(ctx)

    none = Src(None)
    srv = ControlServer(True, ServerConfig(count=1024, modes=2 | 0x20000000), none)
    assert m.ServerGreeting.unpack(srv.data_to_send()).modes == 2  # no announcement, no key mode
    ann = Src(bytes([0, 0, 1, 0, 50]) + bytes(7))
    srv = ControlServer(True, ServerConfig(count=1024, modes=2 | 0x20000000), ann)
    assert m.ServerGreeting.unpack(srv.data_to_send()).modes == 2 | 0x20000000
    srv.receive_data(b"\x00" * 164)  # Mode 0: the client declines -> closed
    assert srv.closed and len(ann.forgotten) == 1
    srv.release()
    assert len(ann.forgotten) == 1  # once only


def test_client_validate_hook_can_refuse_the_greeting() -> None:
    from agent.control import modes as md

    md.register_key_mode(md.KeyMode(0x10000000, "test-validated", with_unauth=True))

    class Refuser:
        def validate(self, ctx):
            raise RuntimeError("no_sa: spi=0x00000100")

    cli = ControlClient(True, ["unauth+test-validated"], "", Refuser())
    g = m.ServerGreeting(1 | 0x10000000, bytes(16), bytes(16), 1024, bytes([0, 0, 1, 0, 50]) + bytes(7))
    evs = cli.receive_data(g.pack())
    assert isinstance(evs[0], ev.ProtocolFailure) and "no_sa" in evs[0].reason
