"""XFRM change notifications, as delivered on the XFRMNLGRP_* multicast groups.

An :class:`XfrmEvent` is what :mod:`netlink.monitor` yields and what
:meth:`netlink.table.SATable.apply` consumes. Pure data, no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from netlink.records import SA, IPAddress, Policy

# (spi, proto, daddr): how the kernel identifies an SA (struct xfrm_usersa_id).
SAId = tuple[int, int, IPAddress]


class EventKind(enum.Enum):
    NEW_SA = "new_sa"  # XFRM_MSG_NEWSA
    UPD_SA = "upd_sa"  # XFRM_MSG_UPDSA
    DEL_SA = "del_sa"  # XFRM_MSG_DELSA
    EXPIRE = "expire"  # XFRM_MSG_EXPIRE (soft or hard, see XfrmEvent.hard)
    NEW_POLICY = "new_policy"  # XFRM_MSG_NEWPOLICY
    DEL_POLICY = "del_policy"  # XFRM_MSG_DELPOLICY
    UPD_POLICY = "upd_policy"  # XFRM_MSG_UPDPOLICY
    POLICY_EXPIRE = "policy_expire"  # XFRM_MSG_POLEXPIRE (see XfrmEvent.hard)
    FLUSH_SA = "flush_sa"  # XFRM_MSG_FLUSHSA: every SA of XfrmEvent.proto is gone
    FLUSH_POLICY = "flush_policy"  # XFRM_MSG_FLUSHPOLICY
    # Not from the kernel: the socket overflowed (ENOBUFS) and notifications
    # were lost. Whoever mirrors kernel state must re-dump.
    OVERFLOW = "overflow"


@dataclass(frozen=True, slots=True)
class XfrmEvent:
    """One notification.

    * NEW_SA / UPD_SA: ``sa`` is the full state.
    * DEL_SA: ``sa_id`` is always set; ``sa`` too when the kernel attached the
      full state (it does, in XFRMA_SA, for deletions it reports itself).
    * EXPIRE: ``sa`` is the state at expiry, ``hard`` tells hard from soft.
      A hard expiry is followed by the SA's removal.
    * *_POLICY, POLICY_EXPIRE: ``policy`` (for DEL_POLICY possibly only the
      selector/index/direction part).
    * FLUSH_SA: ``proto`` is the flushed protocol (255 = IPSEC_PROTO_ANY, all).
      The kernel sends one FLUSH_SA, not one DEL_SA per SA.
    * OVERFLOW: nothing else set.

    A soft EXPIRE's ``sa`` carries no algorithms (the kernel's expire message
    has none): use it for counters and identity, not keys.
    """

    kind: EventKind
    sa: SA | None = None
    sa_id: SAId | None = None
    hard: bool | None = None
    policy: Policy | None = None
    proto: int | None = None  # FLUSH_SA only

    @property
    def key_id(self) -> SAId | None:
        """The SA this event is about, whichever of ``sa``/``sa_id`` carries it."""
        if self.sa_id is not None:
            return self.sa_id
        if self.sa is not None:
            return self.sa.key_id
        return None

    def __repr__(self) -> str:  # compact and key-free (SA's own repr is key-free too)
        what = self.key_id if self.key_id is not None else self.policy
        if self.kind is EventKind.FLUSH_SA:
            what = f"proto {self.proto}"
        extra = "" if self.hard is None else (" hard" if self.hard else " soft")
        return f"<XfrmEvent {self.kind.name}{extra} {what!r}>"
