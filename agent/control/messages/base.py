"""Constants, the one parse error, field helpers and the Type-P descriptor shared by every
O/TWAMP-Control message (RFC 4656 §3, RFC 5357 §3)."""

from __future__ import annotations

import ipaddress
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

BLOCK = 16
HMAC_LEN = 16
SID_LEN = 16
KEYID_LEN = 80
TOKEN_LEN = 64


class ProtocolError(Exception):
    """Malformed or unexpected O/TWAMP-Control input. Never carries key material."""


# Command numbers: RFC 4656 §3.4, RFC 5357 §8.2 (TWAMP registry), RFC 5938 §3.
CMD_REQUEST_SESSION = 1  # OWAMP only; "Forbidden" in TWAMP
CMD_START_SESSIONS = 2
CMD_STOP_SESSIONS = 3
CMD_FETCH_SESSION = 4  # OWAMP only; reserved in TWAMP
CMD_REQUEST_TW_SESSION = 5
CMD_EXPERIMENTATION = 6
CMD_START_N_SESSIONS = 7
CMD_START_N_ACK = 8
CMD_STOP_N_SESSIONS = 9
CMD_STOP_N_ACK = 10

# Accept values: RFC 4656 §3.3, same in RFC 5357.
ACCEPT_OK = 0
ACCEPT_FAILURE = 1
ACCEPT_INTERNAL_ERROR = 2
ACCEPT_NOT_SUPPORTED = 3
ACCEPT_PERMANENT_LIMIT = 4
ACCEPT_TEMPORARY_LIMIT = 5
# RFC 7717 §5.3: "the O/TWAMP Server SHOULD set the Accept field of the Server-Start
# message to the value 6" when it cannot find the IKEv2 SA named by the KeyID's SPIs.
ACCEPT_NO_IKE_SA = 6
ACCEPT_NAMES = {
    0: "OK",
    1: "failure",
    2: "internal error",
    3: "not supported",
    4: "permanent resource limitation",
    5: "temporary resource limitation",
}
# Server-Start only: RFC 7717's 6 (IANA registers no Accept values; 7717 §5.3 defines it
# for this one message).
SERVER_START_ACCEPT_NAMES = {**ACCEPT_NAMES, ACCEPT_NO_IKE_SA: "no IKEv2 SA for the KeyID's SPIs (RFC 7717)"}


def _check_accept(v: int) -> int:
    """For messages we build: only the assigned values."""
    if v not in ACCEPT_NAMES:
        raise ProtocolError(f"invalid Accept value {v}")
    return v


def read_accept(v: int) -> int:
    """For messages we read: RFC 4656 §3.3, "The message receiver MUST interpret all values
    of Accept other than these reserved values as 1" (so future values stay usable)."""
    return v if v in ACCEPT_NAMES else ACCEPT_FAILURE


def _need(data: bytes | memoryview, n: int, what: str) -> bytes:
    if len(data) != n:
        raise ProtocolError(f"{what}: expected {n} octets, got {len(data)}")
    return bytes(data)


def _fixed(b: bytes, n: int, what: str) -> bytes:
    if not isinstance(b, (bytes, bytearray)) or len(b) != n:
        raise ValueError(f"{what} must be {n} octets")
    return bytes(b)


def _u32(v: int, what: str) -> int:
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"{what} out of range")
    return v


def _pad16(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


# --- Type-P descriptor (RFC 4656 §3.5) -------------------------------------------------------
# First two bits 00: the next six bits are the DSCP. 01: the next 16 bits are a PHB ID.


def typep_from_dscp(dscp: int) -> int:
    if not 0 <= dscp < 64:
        raise ValueError("DSCP must be 0..63")
    return dscp << 24


def dscp_from_typep(typep: int) -> int | None:
    """The requested DSCP, or None when the descriptor is not a DSCP one (PHB ID or reserved)."""
    if typep >> 30 != 0:
        return None
    return (typep >> 24) & 0x3F


