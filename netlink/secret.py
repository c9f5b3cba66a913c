"""A bytes holder for key material that never shows its contents.

Key bytes read from the kernel or derived from it travel in :class:`Secret` so
that ``repr()``, ``str()``, f-strings, logging and exception messages cannot
leak them by accident. Only ``reveal()`` hands the bytes out.
"""

from __future__ import annotations

import hashlib
import hmac


class Secret:
    __slots__ = ("_b",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._b = bytes(data)

    def reveal(self) -> bytes:
        """The raw bytes. Call only where the key is actually used."""
        return self._b

    def __len__(self) -> int:
        return len(self._b)

    def __bool__(self) -> bool:
        return bool(self._b)

    @property
    def is_zero(self) -> bool:
        """True when every octet is 0: what a lockdown kernel hands out instead of keys."""
        return not any(self._b)

    def fingerprint(self) -> str:
        """A short, non-reversible tag that lets logs tell two keys apart."""
        return hashlib.sha256(b"xwamp-fp\0" + self._b).hexdigest()[:12]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return hmac.compare_digest(self._b, other._b)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return f"<Secret {len(self._b)} octets>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self):  # pickling would copy the key to places we do not control
        raise TypeError("Secret cannot be pickled")
