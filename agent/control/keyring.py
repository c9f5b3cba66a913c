"""Where O/TWAMP shared secrets come from: the key seam.

The control plane never reads key files or the kernel itself. It asks a
:class:`KeySource`, passing a :class:`HandshakeContext` that describes the
connection being set up:

    class KeySource(Protocol):
        def shared_secret(self, key_id: str, ctx: HandshakeContext) -> Secret | None

``shared_secret`` returns the *passphrase* for ``key_id`` (None = unknown
identity, which the server answers with Server-Start Accept=1). The control
layer then derives the 16-octet Token key with PBKDF2(passphrase, Salt, Count)
as RFC 4656 §3.1 says.

Optional hooks, discovered with ``getattr`` so a plain passphrase source needs none:

``token_key(key_id, ctx) -> Secret | None``
    Return the 16-octet Token key directly; PBKDF2 is then skipped entirely.
    This is how IPsec-derived keys plug in: the binder looks at
    ``ctx.ipsec_hint`` (SPI, protocol carried in the Server-Greeting's Unused
    field) and ``ctx.local`` / ``ctx.peer`` (the control connection's
    addresses), finds the SA pair and derives the key from it.

``greeting_extra(ctx) -> bytes | None``    (server side)
    12 octets for the Server-Greeting's Unused field (e.g. SPI(4) proto(1) MBZ(7)),
    chosen once the server knows the connection's addresses.

``test_keys(sid, ctx) -> TestKeys | None``
    Per-session test keys, replacing the RFC 4656 §4.1.2 derivation from the
    control session keys and SID (for modes whose test keys come from the SA).

``make_token(key_id, ctx, challenge) -> (token, keys) | None``    (client side)
``open_token(key_id, ctx, challenge, token) -> keys | None``      (server side)
    Replace the whole Token exchange, for modes where the control session keys
    are derived rather than carried (docs/wire-format.md §4.2 ALT1 / §4.3 ALT2).
    ``keys`` is any object with ``aes_key`` (16) and ``hmac_key`` (32) Secrets,
    e.g. agent.binder.keys.ControlKeys. ``open_token`` raises
    :class:`TokenRejected` to refuse (Accept=1); None means "not mine, use
    the RFC 4656 Token".

``ctx.mode`` is the selected Mode, so a source sees which key mode
(RFC 7717, IPSEC_BOUND, ALT1, ALT2: agent.control.modes.register_key_mode)
the client picked and answers only for that.

``key_id_octets(ctx) -> bytes | None``    (client side)
    The KeyID octets to send instead of the UTF-8 identity, for key modes whose KeyID is
    binary (RFC 7717 §5.3: SPIi | SPIr | zeros).

``filter_offer(ctx, modes) -> int``    (client side, before the mode is chosen)
    Drop offered key-mode bits this source cannot serve on this connection, e.g. RFC 7717
    with no IKE SA for the peer: the client then "proceeds with the modes defined in
    [RFC4656], [RFC5357], and [RFC5618]" (RFC 7717 §5.1).

``serves_key_mode(bit, protocol) -> bool``    (server side)
    Whether this source keys that key-mode bit; a key mode needing no greeting
    announcement (RFC 7717) is offered only when some source says yes.

A hook may raise :class:`SetupRefused` to answer Server-Start with a given Accept value
(RFC 7717 §5.3: Accept=6 when the KeyID's IKE SA is unknown).

``validate(ctx)`` (client) / ``forget(ctx)``
    Check the greeting once the mode is chosen (raise to refuse it, e.g. the binder's
    check of the announced SA pair against our kernel); drop per-connection state.

Sources are composed with :class:`ChainedKeySource` (first answer wins; ``validate``
and ``forget`` go to every source).

Key files
---------
* xwamp format: one ``identity passphrase`` per line; ``#`` starts a comment;
  the passphrase is the rest of the line after the first run of white space.
* perfSONAR pfstore (``pfstore -f FILE user``): ``identity hex-passphrase`` per
  line; select with ``fmt="pfs"`` or a ``.pfs`` file name.

Passphrases are held in :class:`Secret` from the moment they are read.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, Union, runtime_checkable

from agent.control.messages import ProtocolError
from agent.control.security import (
    SessionKeys,
    check_count,
    decrypt_token,
    encrypt_token,
    pbkdf2_key,
)
from agent.engine.keys import TestKeys
from netlink.secret import Secret

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True, slots=True)
class HandshakeContext:
    """What a key source may look at when asked for a key."""

    role: Literal["client", "server"]
    protocol: Literal["owamp", "twamp"]
    local: tuple[IPAddress, int] | None = None
    peer: tuple[IPAddress, int] | None = None
    mode: int = 0  # the selected Mode (0 while the server builds its greeting)
    salt: bytes = b""
    count: int = 0
    greeting_unused: bytes = bytes(12)  # the Server-Greeting's Unused field as sent/received
    key_id_raw: bytes = b""  # server: the Set-Up-Response's 80 KeyID octets, as received

    @property
    def ipsec_hint(self) -> tuple[int, int] | None:
        """(SPI, IP protocol) from the greeting's Unused field, if any."""
        u = self.greeting_unused
        if len(u) < 5 or not any(u):
            return None
        return int.from_bytes(u[:4], "big"), u[4]


@runtime_checkable
class KeySource(Protocol):
    def shared_secret(self, key_id: str, ctx: HandshakeContext) -> Secret | None: ...


class TokenRejected(Exception):
    """Raised by an ``open_token`` hook: the Token does not prove key possession."""


class SetupRefused(Exception):
    """Raised by a key-source hook on the server: answer Server-Start with ``accept``."""

    def __init__(self, accept: int, reason: str) -> None:
        super().__init__(reason)
        self.accept = accept


class KeyFileError(ValueError):
    """A key file could not be parsed. Messages name the line, never its content."""


@dataclass
class StaticKeySource:
    """An in-memory identity -> passphrase map (tests, --passphrase-from-env)."""

    entries: dict[str, Secret] = field(default_factory=dict)

    def shared_secret(self, key_id: str, ctx: HandshakeContext) -> Secret | None:
        return self.entries.get(key_id)

    def __repr__(self) -> str:
        return f"<StaticKeySource {len(self.entries)} identities>"


def check_secret_file(path: str | os.PathLike[str]) -> os.stat_result:
    """The stat of a file holding secrets, refused (KeyFileError, one line) unless it is a
    regular file that others cannot read or write. Like ssh with private keys: a secret
    others could read is already lost, and an operator should hear it at once. Group access
    is refused too when the file is our own (the grant serves nobody), and allowed when it
    is another user's: root:xwamp 0640 is how packaging/xwamp.service shares key files with
    the agent's user."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise KeyFileError(f"{os.fspath(path)}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{os.fspath(path)}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007 or (mode & 0o070 and st.st_uid == os.geteuid()):
        who = "others" if mode & 0o007 else "its group"
        raise KeyFileError(f"{os.fspath(path)}: permissions {mode:04o} are too open (readable or writable "
                           f"by {who}); chmod 600 (or chown root:GROUP and chmod 640 to share it with a group)")
    return st


def read_secret_file(path: str | os.PathLike[str], strict_perms: bool = True) -> bytes:
    """The bytes of a secret file, after :func:`check_secret_file`; OSError as KeyFileError."""
    if strict_perms:
        check_secret_file(path)
    try:
        with open(path, "rb") as f:
            return f.read(MAX_KEYFILE + 1)
    except OSError as e:
        raise KeyFileError(f"{os.fspath(path)}: {e.strerror or e}") from None


MAX_KEYFILE = 1 << 20  # octets: a key file is a few lines; refuse to slurp a device or a log


def parse_hmac_key(raw: bytes, name: str = "<key file>") -> bytes:
    """A test-plane HMAC key file (authenticated STAMP): hex (whitespace and an optional 0x
    ignored) or, failing that, raw bytes. KeyFileError when empty."""
    text = raw.strip()
    if text.lower().startswith(b"0x"):
        text = text[2:]
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = raw
    if not key:
        raise KeyFileError(f"{name}: empty key")
    return key


def read_hmac_key(path: str | os.PathLike[str]) -> bytes:
    """The HMAC key of ``path``, refused like a passphrase file when others may read it or it
    is not a regular file (:func:`check_secret_file`)."""
    return parse_hmac_key(read_secret_file(path), os.fspath(path))


def parse_passphrases(data: bytes, name: str = "<keyfile>", fmt: Literal["xwamp", "pfs"] = "xwamp") -> dict[str, Secret]:
    """The identity -> passphrase map of a key file's bytes (module doc). KeyFileError names
    the line, never its content."""
    if len(data) > MAX_KEYFILE:
        raise KeyFileError(f"{name}: larger than {MAX_KEYFILE} octets")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise KeyFileError(f"{name}:{line}: not UTF-8") from None
    entries: dict[str, Secret] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise KeyFileError(f"{name}:{n}: expected 'identity passphrase'")
        ident, pw = parts
        if len(ident.encode("utf-8")) > 80:
            raise KeyFileError(f"{name}:{n}: identity longer than 80 octets")
        if fmt == "pfs":
            try:
                secret = Secret(bytes.fromhex(pw.strip()))
            except ValueError:
                raise KeyFileError(f"{name}:{n}: passphrase is not hex") from None
        else:
            secret = Secret(pw.encode("utf-8"))
        entries[ident] = secret
    return entries


class PassphraseFile:
    """A key file (see module doc). Re-read when its mtime changes, so operators can
    add identities without restarting the server. Refused (KeyFileError) when it is not a
    regular file or others may read it (``strict_perms``, :func:`check_secret_file`);
    a broken rewrite keeps the last good content."""

    def __init__(self, path: str | os.PathLike[str], fmt: Literal["auto", "xwamp", "pfs"] = "auto",
                 strict_perms: bool = True) -> None:
        self.path = Path(path)
        if fmt == "auto":
            fmt = "pfs" if self.path.suffix == ".pfs" else "xwamp"
        self.fmt = fmt
        self.strict_perms = strict_perms
        self._mtime: float | None = None
        self._entries: dict[str, Secret] = {}
        self._load()

    def _load(self) -> None:
        try:
            st = check_secret_file(self.path) if self.strict_perms else self.path.stat()
        except OSError as e:
            raise KeyFileError(f"{self.path}: {e.strerror or e}") from None
        if self._mtime == st.st_mtime:
            return
        data = read_secret_file(self.path, strict_perms=False)
        self._entries = parse_passphrases(data, str(self.path), self.fmt)  # type: ignore[arg-type]
        self._mtime = st.st_mtime

    def shared_secret(self, key_id: str, ctx: HandshakeContext) -> Secret | None:
        try:
            self._load()
        except (OSError, KeyFileError):
            pass  # keep serving with what we had
        return self._entries.get(key_id)

    def identities(self) -> list[str]:
        return sorted(self._entries)

    def __repr__(self) -> str:
        return f"<PassphraseFile {self.path} ({self.fmt}, {len(self._entries)} identities)>"


class ChainedKeySource:
    """Ask several sources in order; the first non-None answer wins, hook by hook."""

    def __init__(self, *sources: object) -> None:
        self.sources = sources

    def shared_secret(self, key_id: str, ctx: HandshakeContext) -> Secret | None:
        for s in self.sources:
            f = getattr(s, "shared_secret", None)
            if f is not None and (v := f(key_id, ctx)) is not None:
                return v
        return None

    def token_key(self, key_id: str, ctx: HandshakeContext) -> Secret | None:
        for s in self.sources:
            f = getattr(s, "token_key", None)
            if f is not None and (v := f(key_id, ctx)) is not None:
                return v
        return None

    def greeting_extra(self, ctx: HandshakeContext) -> bytes | None:
        for s in self.sources:
            f = getattr(s, "greeting_extra", None)
            if f is not None and (v := f(ctx)) is not None:
                return v
        return None

    def test_keys(self, sid: bytes, ctx: HandshakeContext) -> TestKeys | None:
        for s in self.sources:
            f = getattr(s, "test_keys", None)
            if f is not None and (v := f(sid, ctx)) is not None:
                return v
        return None

    def make_token(self, key_id: str, ctx: HandshakeContext, challenge: bytes):
        for s in self.sources:
            f = getattr(s, "make_token", None)
            if f is not None and (v := f(key_id, ctx, challenge)) is not None:
                return v
        return None

    def open_token(self, key_id: str, ctx: HandshakeContext, challenge: bytes, token: bytes):
        for s in self.sources:
            f = getattr(s, "open_token", None)
            if f is not None and (v := f(key_id, ctx, challenge, token)) is not None:
                return v
        return None

    def serves_key_mode(self, bit: int, protocol: str) -> bool:
        return any(f(bit, protocol) for s in self.sources
                   if (f := getattr(s, "serves_key_mode", None)) is not None)

    def key_id_octets(self, ctx: HandshakeContext) -> bytes | None:
        for s in self.sources:
            f = getattr(s, "key_id_octets", None)
            if f is not None and (v := f(ctx)) is not None:
                return v
        return None

    def filter_offer(self, ctx: HandshakeContext, modes: int) -> int:
        for s in self.sources:
            f = getattr(s, "filter_offer", None)
            if f is not None:
                modes = f(ctx, modes)
        return modes

    def validate(self, ctx: HandshakeContext) -> object | None:
        """Client: every source that checks greetings does (each answers only for its own
        key modes); the first to raise refuses the greeting."""
        out = None
        for s in self.sources:
            f = getattr(s, "validate", None)
            if f is not None and (v := f(ctx)) is not None and out is None:
                out = v
        return out

    def forget(self, ctx: HandshakeContext) -> None:
        """The connection is over: tell every source that keeps per-connection state."""
        for s in self.sources:
            f = getattr(s, "forget", None)
            if f is not None:
                f(ctx)


@dataclass(frozen=True, slots=True)
class Pbkdf2Job:
    """A pending PBKDF2 (RFC 4656 §3.1): a pure function of its fields, so the I/O adapter
    may run it in a worker thread (``cryptography`` releases the GIL) while the event loop
    serves other connections. Calling it returns the 16-octet Token key."""

    passphrase: Secret = field(repr=False)
    salt: bytes
    count: int

    def __call__(self) -> Secret:
        return pbkdf2_key(self.passphrase, self.salt, self.count)

    def __repr__(self) -> str:
        return f"Pbkdf2Job(count={self.count})"


def token_key_or_job(source: object, key_id: str, ctx: HandshakeContext,
                     max_count: int | None = None) -> Secret | Pbkdf2Job | None:
    """The 16-octet Token key for ``key_id`` if the source's own ``token_key`` answers, else
    the PBKDF2 of its passphrase with the greeting's Salt and Count still to run, else None
    (unknown identity). Key-source hooks run here, on the caller's thread; only the pure
    derivation is left for later."""
    direct = getattr(source, "token_key", None)
    if direct is not None:
        k = direct(key_id, ctx)
        if k is not None:
            if len(k) != 16:
                raise ValueError("token_key must return 16 octets")
            return k
    pw = source.shared_secret(key_id, ctx)  # type: ignore[attr-defined]
    if pw is None:
        return None
    if max_count is not None:
        check_count(ctx.count, max_count)  # before spending PBKDF2 time on it
    return Pbkdf2Job(pw, ctx.salt, ctx.count)


def resolve_token_key(source: object, key_id: str, ctx: HandshakeContext,
                      max_count: int | None = None) -> Secret | None:
    """The 16-octet Token key for ``key_id``, derived at once (see :func:`token_key_or_job`)."""
    k = token_key_or_job(source, key_id, ctx, max_count)
    return k() if isinstance(k, Pbkdf2Job) else k


def _as_session_keys(k: object) -> SessionKeys:
    aes, hk = getattr(k, "aes_key"), getattr(k, "hmac_key")
    if len(aes) != 16 or len(hk) != 32:
        raise ValueError("control keys must be 16 + 32 octets")
    return SessionKeys(aes, hk)


def client_token(source: object, key_id: str, ctx: HandshakeContext, challenge: bytes,
                 max_count: int) -> tuple[bytes, SessionKeys] | None:
    """Client side of RFC 4656 §3.1: (Token, session keys), or None if no key for key_id.
    Raises ProtocolError if the server's Count exceeds ``max_count``."""
    made = hooked_client_token(source, key_id, ctx, challenge)
    if made is not None:
        return made
    key = resolve_token_key(source, key_id, ctx, max_count)
    if key is None:
        return None
    return make_client_token(key, challenge)


def make_client_token(key: Secret, challenge: bytes) -> tuple[bytes, SessionKeys]:
    """RFC 4656 §3.1: fresh random session keys and the Token carrying them under ``key``."""
    keys = SessionKeys.random()
    return encrypt_token(key, challenge, keys), keys


def hooked_client_token(source: object, key_id: str, ctx: HandshakeContext,
                        challenge: bytes) -> tuple[bytes, SessionKeys] | None:
    """The source's ``make_token`` answer (derived-key modes), or None to use the RFC Token."""
    hook = getattr(source, "make_token", None)
    if hook is None:
        return None
    made = hook(key_id, ctx, challenge)
    if made is None:
        return None
    token, keys = made
    if len(token) != 64:
        raise ValueError("make_token must return a 64-octet token")
    return bytes(token), _as_session_keys(keys)


def hooked_open_token(source: object, key_id: str, ctx: HandshakeContext, challenge: bytes,
                      token: bytes) -> SessionKeys | None:
    """The source's ``open_token`` answer, or None to use the RFC Token (may raise TokenRejected)."""
    hook = getattr(source, "open_token", None)
    if hook is None:
        return None
    keys = hook(key_id, ctx, challenge, token)
    return None if keys is None else _as_session_keys(keys)


def open_client_token(key: Secret, challenge: bytes, token: bytes) -> SessionKeys:
    """Server side of RFC 4656 §3.1 once the Token key is known; TokenRejected if wrong."""
    try:
        return decrypt_token(key, token, challenge)
    except ProtocolError:
        raise TokenRejected("token does not decrypt to the challenge") from None


def server_open_token(source: object, key_id: str, ctx: HandshakeContext, challenge: bytes,
                      token: bytes) -> SessionKeys | None:
    """Server side: the client's session keys, None for an unknown identity; raises
    TokenRejected when the Token does not prove possession of the key."""
    keys = hooked_open_token(source, key_id, ctx, challenge, token)
    if keys is not None:
        return keys
    key = resolve_token_key(source, key_id, ctx)
    if key is None:
        return None
    return open_client_token(key, challenge, token)
