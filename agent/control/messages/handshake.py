"""Connection set-up: Server-Greeting, Set-Up-Response, Server-Start (RFC 4656 §3.1)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from agent.control.messages.base import (
    ACCEPT_NO_IKE_SA,
    KEYID_LEN,
    TOKEN_LEN,
    _check_accept,
    read_accept,
    _fixed,
    _need,
    _u32,
)

# --- Handshake messages (RFC 4656 §3.1) ------------------------------------------------------

_GREETING = struct.Struct("!12sI16s16sI12s")


@dataclass(frozen=True, slots=True)
class ServerGreeting:
    """Server-Greeting, 64 octets. ``unused`` is the 12-octet Unused field: all zero in
    classic modes; xwamp's IPsec-bound modes carry SPI(4) and protocol(1) there
    (see :meth:`with_ipsec_hint`)."""

    SIZE: ClassVar[int] = 64

    modes: int
    challenge: bytes
    salt: bytes
    count: int
    unused: bytes = bytes(12)

    def __post_init__(self) -> None:
        _u32(self.modes, "modes")
        _u32(self.count, "count")
        _fixed(self.challenge, 16, "challenge")
        _fixed(self.salt, 16, "salt")
        _fixed(self.unused, 12, "unused")

    def pack(self) -> bytes:
        return _GREETING.pack(self.unused, self.modes, self.challenge, self.salt, self.count, bytes(12))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "ServerGreeting":
        unused, modes, challenge, salt, count, _mbz = _GREETING.unpack(_need(data, 64, "Server-Greeting"))
        return cls(modes, challenge, salt, count, unused)

    # The IPsec hint: SPI (4 octets, network order) then IP protocol (1 octet, 50 ESP / 51 AH).
    def with_ipsec_hint(self, spi: int, proto: int) -> "ServerGreeting":
        unused = struct.pack("!IB", _u32(spi, "spi"), proto & 0xFF) + bytes(7)
        return ServerGreeting(self.modes, self.challenge, self.salt, self.count, unused)

    @property
    def ipsec_hint(self) -> tuple[int, int] | None:
        """(SPI, proto) if the Unused field carries one, else None."""
        if not any(self.unused):
            return None
        spi, proto = struct.unpack_from("!IB", self.unused)
        return spi, proto


_SETUP = struct.Struct("!I80s64s16s")


@dataclass(frozen=True, slots=True)
class SetUpResponse:
    """Set-Up-Response, 164 octets. KeyID is UTF-8, zero padded (RFC 4656 §3.1), except in
    RFC 7717's mode, where it is binary: SPIi (8) | SPIr (8) | zeros (RFC 7717 §5.3).
    ``key_id_raw`` is the 80-octet field as it goes on the wire; when given to the
    constructor it is sent instead of ``key_id``."""

    SIZE: ClassVar[int] = 164

    mode: int
    key_id: str = ""
    token: bytes = bytes(TOKEN_LEN)
    client_iv: bytes = bytes(16)
    key_id_raw: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        _u32(self.mode, "mode")
        if len(self.key_id_raw or self.key_id.encode("utf-8")) > KEYID_LEN:
            raise ValueError("KeyID longer than 80 octets")
        _fixed(self.token, TOKEN_LEN, "token")
        _fixed(self.client_iv, 16, "client IV")

    def pack(self) -> bytes:
        kid = self.key_id_raw or self.key_id.encode("utf-8")
        return _SETUP.pack(self.mode, kid, self.token, self.client_iv)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "SetUpResponse":
        mode, kid, token, iv = _SETUP.unpack(_need(data, 164, "Set-Up-Response"))
        # A binary KeyID (RFC 7717 §5.3: SPIs) is no error here: the key source reads
        # key_id_raw; as an identity it simply matches no passphrase (Accept=1).
        key_id = kid.rstrip(b"\0").decode("utf-8", "replace")
        return cls(mode, key_id, token, iv, kid)

    def __repr__(self) -> str:  # the token is encrypted key material: keep it out of logs
        return f"SetUpResponse(mode={self.mode}, key_id={self.key_id!r})"


_SSTART = struct.Struct("!15sB16sQ8s")


@dataclass(frozen=True, slots=True)
class ServerStart:
    """Server-Start, 48 octets. The first 32 are always clear; the last block (Start-Time,
    MBZ) is the first block of the server's encrypted stream (RFC 4656 §3.1)."""

    SIZE: ClassVar[int] = 48
    CLEAR: ClassVar[int] = 32

    accept: int
    server_iv: bytes = bytes(16)
    start_time: int = 0  # NTP 64-bit

    def __post_init__(self) -> None:
        if self.accept != ACCEPT_NO_IKE_SA:  # RFC 7717 §5.3's 6 exists for Server-Start
            _check_accept(self.accept)
        _fixed(self.server_iv, 16, "server IV")

    def pack(self) -> bytes:
        return _SSTART.pack(bytes(15), self.accept, self.server_iv, self.start_time, bytes(8))

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "ServerStart":
        _mbz, accept, iv, start, _mbz2 = _SSTART.unpack(_need(data, 48, "Server-Start"))
        # RFC 7717 §5.3's 6 (no IKE SA) exists for Server-Start; any other unknown value reads as 1.
        return cls(accept if accept == ACCEPT_NO_IKE_SA else read_accept(accept), iv, start)


