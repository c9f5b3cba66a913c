"""Base of the test plane's per-session counter records (sender, reflector, receiver)."""

from __future__ import annotations

from dataclasses import fields


class Counters:
    """Mixin for ``@dataclass(slots=True)`` counter records: ``as_dict()`` for logs, JSON
    and the exporters."""

    __slots__ = ()

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
