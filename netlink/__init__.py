"""Kernel XFRM (IPsec SA/SP) database access over NETLINK_XFRM, built on pyroute2.

Modules (import what you need; this package imports nothing eagerly):

* records   — the typed, immutable SA/Policy records (the contract).
* secret    — Secret, key bytes that never show in repr/logs.
* table     — SATable: in-memory SA database, O(1) lookups, rekey-aware pairing.
* events    — XfrmEvent / EventKind: what notifications say.
* decode    — pure, fast bytes -> records decoding; raises only XfrmDecodeError.
* xfrm      — the NETLINK_XFRM family for pyroute2 (nlmsg classes, MarshalXfrm, XfrmSocket).
* client    — XfrmClient(netns): dump_sas(), dump_policies(), get_sa().
* monitor   — XfrmMonitor, watch(), TableFollower.
* netns     — sockets created inside a named network namespace.
* errors    — XfrmError and friends (permission, unavailable, decode, netns).
* constants — XFRM_MSG_*, XFRMA_*, XFRMNLGRP_* from linux/xfrm.h.
* fake      — make_sa(): plausible SA records for tests.

May import pyroute2 and the standard library only: it is the bottom of the import graph.
"""
