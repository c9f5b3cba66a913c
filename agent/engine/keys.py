"""The keys of one test session: the seam between Control (which derives them) and Test (which uses them)."""

from __future__ import annotations

from dataclasses import dataclass

from netlink.secret import Secret


@dataclass(frozen=True, slots=True)
class TestKeys:
    """RFC 4656 §4.1.1 / RFC 5357 §4.1.1: per-session AES-128 key and 32-octet HMAC key.

    Classic modes derive them from the control session keys and the SID; the
    IPsec-bound modes (docs/wire-format.md) derive them from the SA.
    """

    __test__ = False  # not a pytest class

    aes_key: Secret  # 16 octets
    hmac_key: Secret  # 32 octets

    def __post_init__(self) -> None:
        if len(self.aes_key) != 16 or len(self.hmac_key) != 32:
            raise ValueError("test keys must be a 16-octet AES key and a 32-octet HMAC key")
