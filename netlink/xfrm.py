"""The NETLINK_XFRM family for pyroute2: message classes, marshal, socket.

pyroute2 0.9 ships only the NETLINK_XFRM constant. This module describes the
family the pyroute2 way (nlmsg ``fields`` + ``nla_map``), from
linux/include/uapi/linux/xfrm.h, so pyroute2's generic machinery can encode
requests and decode any XFRM message into its dict-like nlmsg objects.

The generic decoder is convenient but slow (a Python object per field and per
attribute); bulk dumps go through the fast decoder in netlink.decode, which
reads the same layouts. See netlink.client for the record-level API.

C struct padding is spelled out with explicit ``x`` fields: pyroute2 unpacks
field by field, without the C compiler's alignment. Key bytes are wrapped in
Secret even here, so printing a decoded pyroute2 message never shows keys.
"""

from __future__ import annotations

import socket as _socket
import struct
from typing import Any

from pyroute2.netlink import nla, nlmsg
from pyroute2.netlink.marshal import Marshal
from pyroute2.netlink.nlsocket import AsyncNetlinkSocket, NetlinkSocket

from netlink import constants as C
from netlink.netns import create_socket
from netlink.secret import Secret

_ZADDR = b"\0" * 16

# struct xfrm_selector (56 octets)
SELECTOR_FIELDS: tuple[tuple[str, str], ...] = (
    ("sel_daddr", "16s"),
    ("sel_saddr", "16s"),
    ("sel_dport", ">H"),
    ("sel_dport_mask", ">H"),
    ("sel_sport", ">H"),
    ("sel_sport_mask", ">H"),
    ("sel_family", "H"),
    ("sel_prefixlen_d", "B"),
    ("sel_prefixlen_s", "B"),
    ("sel_proto", "B"),
    ("__sel_pad", "3x"),
    ("sel_ifindex", "i"),
    ("sel_user", "I"),
)
# struct xfrm_lifetime_cfg (64) and xfrm_lifetime_cur (32)
LIFETIME_CFG_FIELDS = tuple(
    (f"lft_{n}", "Q")
    for n in (
        "soft_byte_limit",
        "hard_byte_limit",
        "soft_packet_limit",
        "hard_packet_limit",
        "soft_add_expires_seconds",
        "hard_add_expires_seconds",
        "soft_use_expires_seconds",
        "hard_use_expires_seconds",
    )
)
LIFETIME_CUR_FIELDS = (("cur_bytes", "Q"), ("cur_packets", "Q"), ("cur_add_time", "Q"), ("cur_use_time", "Q"))
# struct xfrm_usersa_info (224)
USERSA_INFO_FIELDS = (
    SELECTOR_FIELDS
    + (("daddr", "16s"), ("spi", ">I"), ("proto", "B"), ("__id_pad", "3x"), ("saddr", "16s"))
    + LIFETIME_CFG_FIELDS
    + LIFETIME_CUR_FIELDS
    + (
        ("stats_replay_window", "I"),
        ("stats_replay", "I"),
        ("stats_integrity_failed", "I"),
        ("seq", "I"),
        ("reqid", "I"),
        ("family", "H"),
        ("mode", "B"),
        ("replay_window", "B"),
        ("flags", "B"),
        ("__pad", "7x"),
    )
)
# struct xfrm_usersa_id (24)
USERSA_ID_FIELDS = (("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"), ("__pad", "x"))
# struct xfrm_userpolicy_info (168)
USERPOLICY_INFO_FIELDS = (
    SELECTOR_FIELDS
    + LIFETIME_CFG_FIELDS
    + LIFETIME_CUR_FIELDS
    + (
        ("priority", "I"),
        ("index", "I"),
        ("dir", "B"),
        ("action", "B"),
        ("flags", "B"),
        ("share", "B"),
        ("__pad", "4x"),
    )
)
# struct xfrm_userpolicy_id (64)
USERPOLICY_ID_FIELDS = SELECTOR_FIELDS + (("index", "I"), ("dir", "B"), ("__pad", "3x"))

_ADDR_DEFAULTS = {"sel_daddr": _ZADDR, "sel_saddr": _ZADDR, "daddr": _ZADDR, "saddr": _ZADDR}


def _struct_size(fields: tuple[tuple[str, str], ...]) -> int:
    return sum(struct.calcsize(f) for _, f in fields)


assert _struct_size(SELECTOR_FIELDS) == 56
assert _struct_size(USERSA_INFO_FIELDS) == 224
assert _struct_size(USERSA_ID_FIELDS) == 24
assert _struct_size(USERPOLICY_INFO_FIELDS) == 168
assert _struct_size(USERPOLICY_ID_FIELDS) == 64


class xfrm_attrs:
    """Mixin: the XFRMA_* attribute map shared by every XFRM message."""

    class xfrm_algo(nla):
        """struct xfrm_algo (ALG_AUTH/CRYPT/COMP): name[64], key_len in bits, key."""

        fields = (("alg_name", "64s"), ("alg_key_len", "I"))
        _extra: tuple[tuple[str, str], ...] = ()

        def decode(self) -> None:
            nla.decode(self)
            self["alg_name"] = self["alg_name"].split(b"\0", 1)[0].decode("ascii", "replace")
            start = self.offset + 4 + 68 + 4 * len(self._extra)
            nbytes = (self["alg_key_len"] + 7) // 8
            self["alg_key"] = Secret(self.data[start : min(start + nbytes, self.offset + self.length)])

        def encode(self) -> None:
            key = self.get("alg_key", b"")
            raw = key.reveal() if isinstance(key, Secret) else bytes(key)
            self.setdefault("alg_key_len", len(raw) * 8)
            name = self.get("alg_name", "")
            self["alg_name"] = name.encode() if isinstance(name, str) else name
            nla.encode(self)
            # nla.encode wrote the fixed part; append the key, fix the length.
            self.data.extend(raw)
            self.length = self["header"]["length"] = self["header"]["length"] + len(raw)
            struct.pack_into("H", self.data, self.offset, self.length)
            pad = (-self.length) % 4
            self.data.extend(b"\0" * pad)

    class xfrm_algo_auth(xfrm_algo):
        """struct xfrm_algo_auth (ALG_AUTH_TRUNC): adds alg_trunc_len (bits)."""

        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"))
        _extra = (("alg_trunc_len", "I"),)

    class xfrm_algo_aead(xfrm_algo):
        """struct xfrm_algo_aead (ALG_AEAD): adds alg_icv_len (bits)."""

        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))
        _extra = (("alg_icv_len", "I"),)

    class xfrm_encap_tmpl(nla):
        fields = (("encap_type", "H"), ("encap_sport", ">H"), ("encap_dport", ">H"), ("__pad", "2x"), ("encap_oa", "16s"))
        defaults = {"encap_oa": _ZADDR}

    class xfrm_user_tmpl(nla):
        """XFRMA_TMPL: an array of struct xfrm_user_tmpl (64 octets each) in ONE attribute."""

        _one = (
            ("daddr", "16s"),
            ("spi", ">I"),
            ("proto", "B"),
            ("__pad1", "3x"),
            ("family", "H"),
            ("__pad2", "2x"),
            ("saddr", "16s"),
            ("reqid", "I"),
            ("mode", "B"),
            ("share", "B"),
            ("optional", "B"),
            ("__pad3", "x"),
            ("aalgos", "I"),
            ("ealgos", "I"),
            ("calgos", "I"),
        )
        _st = struct.Struct("=" + "".join(f for _, f in _one).replace(">", ""))
        fields = ()

        def decode(self) -> None:
            nla.decode(self)
            names = [n for n, f in self._one if not f.endswith("x")]
            tmpls = []
            start, end = self.offset + 4, self.offset + self.length
            for off in range(start, end - self._st.size + 1, self._st.size):
                rec = dict(zip(names, self._st.unpack_from(self.data, off)))
                rec["spi"] = _socket.ntohl(rec["spi"])  # __be32
                tmpls.append(rec)
            self.value = tmpls

        def encode(self) -> None:
            tmpls = self.value if isinstance(self.value, list) else self.get("value", [])
            body = bytearray()
            for t in tmpls:
                spi = _socket.htonl(int(t.get("spi", 0)))
                body += self._st.pack(
                    t.get("daddr", _ZADDR), spi, t.get("proto", 0), t.get("family", 0),
                    t.get("saddr", _ZADDR), t.get("reqid", 0), t.get("mode", 0), t.get("share", 0),
                    t.get("optional", 0), t.get("aalgos", 0xFFFFFFFF), t.get("ealgos", 0xFFFFFFFF),
                    t.get("calgos", 0xFFFFFFFF),
                )
            self.length = 4 + len(body)
            self.data.extend(struct.pack("HH", self.length, self["header"]["type"]) + bytes(body))

    class xfrm_usersa_info_attr(nla):
        fields = USERSA_INFO_FIELDS
        defaults = _ADDR_DEFAULTS

    class xfrm_userpolicy_info_attr(nla):
        fields = USERPOLICY_INFO_FIELDS
        defaults = _ADDR_DEFAULTS

    class xfrm_user_sec_ctx(nla):
        fields = (("len", "H"), ("exttype", "H"), ("ctx_alg", "B"), ("ctx_doi", "B"), ("ctx_len", "H"))

        def decode(self) -> None:
            nla.decode(self)
            start = self.offset + 4 + 8
            self["ctx_str"] = bytes(self.data[start : start + self["ctx_len"]]).split(b"\0", 1)[0].decode("utf-8", "replace")

    class xfrm_lifetime_cur(nla):
        fields = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))

    class xfrm_replay_state(nla):
        fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))

    class xfrm_replay_state_esn(nla):
        fields = (("bmp_len", "I"), ("oseq", "I"), ("seq", "I"), ("oseq_hi", "I"), ("seq_hi", "I"), ("replay_window", "I"))

        def decode(self) -> None:
            nla.decode(self)
            start = self.offset + 4 + 24
            n = min(self["bmp_len"], max(0, (self.length - 28) // 4))
            self["bmp"] = list(struct.unpack_from(f"{n}I", self.data, start))

    class xfrm_address(nla):
        fields = (("addr", "16s"),)
        defaults = {"addr": _ZADDR}

    class xfrm_userpolicy_type(nla):
        fields = (("type", "B"), ("__pad1", "x"), ("reserved1", "H"), ("reserved2", "B"), ("__pad2", "x"))

    class xfrm_user_migrate(nla):
        fields = (
            ("old_daddr", "16s"),
            ("old_saddr", "16s"),
            ("new_daddr", "16s"),
            ("new_saddr", "16s"),
            ("proto", "B"),
            ("mode", "B"),
            ("reserved", "H"),
            ("reqid", "I"),
            ("old_family", "H"),
            ("new_family", "H"),
        )

    class xfrm_user_kmaddress(nla):
        fields = (("local", "16s"), ("remote", "16s"), ("reserved", "I"), ("family", "H"), ("__pad", "2x"))

    class xfrm_mark(nla):
        fields = (("v", "I"), ("m", "I"))  # struct xfrm_mark { __u32 v; __u32 m; }

    class xfrm_address_filter(nla):
        fields = (("saddr", "16s"), ("daddr", "16s"), ("family", "H"), ("splen", "B"), ("dplen", "B"))
        defaults = {"saddr": _ZADDR, "daddr": _ZADDR}

    class xfrm_user_offload(nla):
        fields = (("ifindex", "i"), ("flags", "B"), ("__pad", "3x"))

    nla_map = (
        (C.XFRMA_UNSPEC, "XFRMA_UNSPEC", "none"),
        (C.XFRMA_ALG_AUTH, "XFRMA_ALG_AUTH", "xfrm_algo"),
        (C.XFRMA_ALG_CRYPT, "XFRMA_ALG_CRYPT", "xfrm_algo"),
        (C.XFRMA_ALG_COMP, "XFRMA_ALG_COMP", "xfrm_algo"),
        (C.XFRMA_ENCAP, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
        (C.XFRMA_TMPL, "XFRMA_TMPL", "xfrm_user_tmpl"),
        (C.XFRMA_SA, "XFRMA_SA", "xfrm_usersa_info_attr"),
        (C.XFRMA_POLICY, "XFRMA_POLICY", "xfrm_userpolicy_info_attr"),
        (C.XFRMA_SEC_CTX, "XFRMA_SEC_CTX", "xfrm_user_sec_ctx"),
        (C.XFRMA_LTIME_VAL, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        (C.XFRMA_REPLAY_VAL, "XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        (C.XFRMA_REPLAY_THRESH, "XFRMA_REPLAY_THRESH", "uint32"),
        (C.XFRMA_ETIMER_THRESH, "XFRMA_ETIMER_THRESH", "uint32"),
        (C.XFRMA_SRCADDR, "XFRMA_SRCADDR", "xfrm_address"),
        (C.XFRMA_COADDR, "XFRMA_COADDR", "xfrm_address"),
        (C.XFRMA_LASTUSED, "XFRMA_LASTUSED", "uint64"),
        (C.XFRMA_POLICY_TYPE, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        (C.XFRMA_MIGRATE, "XFRMA_MIGRATE", "xfrm_user_migrate"),
        (C.XFRMA_ALG_AEAD, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        (C.XFRMA_KMADDRESS, "XFRMA_KMADDRESS", "xfrm_user_kmaddress"),
        (C.XFRMA_ALG_AUTH_TRUNC, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        (C.XFRMA_MARK, "XFRMA_MARK", "xfrm_mark"),
        (C.XFRMA_TFCPAD, "XFRMA_TFCPAD", "uint32"),
        (C.XFRMA_REPLAY_ESN_VAL, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        (C.XFRMA_SA_EXTRA_FLAGS, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (C.XFRMA_PROTO, "XFRMA_PROTO", "uint8"),
        (C.XFRMA_ADDRESS_FILTER, "XFRMA_ADDRESS_FILTER", "xfrm_address_filter"),
        (C.XFRMA_PAD, "XFRMA_PAD", "none"),
        (C.XFRMA_OFFLOAD_DEV, "XFRMA_OFFLOAD_DEV", "xfrm_user_offload"),
        (C.XFRMA_SET_MARK, "XFRMA_SET_MARK", "uint32"),
        (C.XFRMA_SET_MARK_MASK, "XFRMA_SET_MARK_MASK", "uint32"),
        (C.XFRMA_IF_ID, "XFRMA_IF_ID", "uint32"),
        (C.XFRMA_MTIMER_THRESH, "XFRMA_MTIMER_THRESH", "uint32"),
        (C.XFRMA_SA_DIR, "XFRMA_SA_DIR", "uint8"),
        (C.XFRMA_NAT_KEEPALIVE_INTERVAL, "XFRMA_NAT_KEEPALIVE_INTERVAL", "uint32"),
        (C.XFRMA_SA_PCPU, "XFRMA_SA_PCPU", "uint32"),
        (C.XFRMA_IPTFS_DROP_TIME, "XFRMA_IPTFS_DROP_TIME", "uint32"),
        (C.XFRMA_IPTFS_REORDER_WINDOW, "XFRMA_IPTFS_REORDER_WINDOW", "uint16"),
        (C.XFRMA_IPTFS_DONT_FRAG, "XFRMA_IPTFS_DONT_FRAG", "flag"),
        (C.XFRMA_IPTFS_INIT_DELAY, "XFRMA_IPTFS_INIT_DELAY", "uint32"),
        (C.XFRMA_IPTFS_MAX_QSIZE, "XFRMA_IPTFS_MAX_QSIZE", "uint32"),
        (C.XFRMA_IPTFS_PKT_SIZE, "XFRMA_IPTFS_PKT_SIZE", "uint32"),
    )


class xfrm_usersa_info(xfrm_attrs, nlmsg):
    """XFRM_MSG_NEWSA / UPDSA (and dump replies): struct xfrm_usersa_info + XFRMA_*."""

    fields = USERSA_INFO_FIELDS
    defaults = _ADDR_DEFAULTS


class xfrm_usersa_id(xfrm_attrs, nlmsg):
    """XFRM_MSG_GETSA / DELSA: struct xfrm_usersa_id (+ XFRMA_SA in notifications)."""

    fields = USERSA_ID_FIELDS
    defaults = _ADDR_DEFAULTS


class xfrm_user_expire(xfrm_attrs, nlmsg):
    """XFRM_MSG_EXPIRE: struct xfrm_user_expire (usersa_info + hard, 232 octets)."""

    fields = USERSA_INFO_FIELDS + (("hard", "B"), ("__hard_pad", "7x"))
    defaults = _ADDR_DEFAULTS


class xfrm_userpolicy_info(xfrm_attrs, nlmsg):
    """XFRM_MSG_NEWPOLICY / UPDPOLICY (and dump replies)."""

    fields = USERPOLICY_INFO_FIELDS
    defaults = _ADDR_DEFAULTS


class xfrm_userpolicy_id(xfrm_attrs, nlmsg):
    """XFRM_MSG_GETPOLICY / DELPOLICY (+ XFRMA_POLICY in notifications)."""

    fields = USERPOLICY_ID_FIELDS
    defaults = _ADDR_DEFAULTS


class xfrm_user_polexpire(xfrm_attrs, nlmsg):
    """XFRM_MSG_POLEXPIRE: struct xfrm_user_polexpire (176 octets)."""

    fields = USERPOLICY_INFO_FIELDS + (("hard", "B"), ("__hard_pad", "7x"))
    defaults = _ADDR_DEFAULTS


class xfrm_usersa_flush(nlmsg):
    """XFRM_MSG_FLUSHSA: struct xfrm_usersa_flush { __u8 proto; }."""

    fields = (("proto", "B"), ("__pad", "3x"))


class xfrm_dump_request(xfrm_attrs, nlmsg):
    """Body of a GETSA/GETPOLICY dump request: no struct, optional filter
    attributes (XFRMA_ADDRESS_FILTER, XFRMA_PROTO) right after the header."""

    fields = ()


class MarshalXfrm(Marshal):
    """Message type -> message class, for pyroute2's parser."""

    msg_map = {
        C.XFRM_MSG_NEWSA: xfrm_usersa_info,
        C.XFRM_MSG_UPDSA: xfrm_usersa_info,
        C.XFRM_MSG_DELSA: xfrm_usersa_id,
        C.XFRM_MSG_GETSA: xfrm_usersa_id,
        C.XFRM_MSG_EXPIRE: xfrm_user_expire,
        C.XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
        C.XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
        C.XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
        C.XFRM_MSG_GETPOLICY: xfrm_userpolicy_id,
        C.XFRM_MSG_POLEXPIRE: xfrm_user_polexpire,
        C.XFRM_MSG_FLUSHSA: xfrm_usersa_flush,
    }


class AsyncXfrmSocket(AsyncNetlinkSocket):
    marshal_class = MarshalXfrm


class XfrmSocket(NetlinkSocket):
    """A pyroute2 NETLINK_XFRM socket (optionally inside a network namespace).

    Generic and slow: yields pyroute2 nlmsg objects. For SA records and bulk
    dumps use netlink.client.XfrmClient.
    """

    async_class = AsyncXfrmSocket

    def __init__(self, netns: str | None = None, **kwargs: Any) -> None:
        sock = None
        if netns is not None:
            # Our own netns helper: never creates a missing namespace.
            # SOCK_DGRAM: asyncio (pyroute2 0.9 core) insists on it; for netlink it equals SOCK_RAW.
            sock = create_socket(_socket.AF_NETLINK, _socket.SOCK_DGRAM, C.NETLINK_XFRM, netns)
        super().__init__(family=C.NETLINK_XFRM, use_socket=sock, **kwargs)

    def dump_sa(self) -> list[nlmsg]:
        req = xfrm_dump_request()
        return list(self.nlm_request(req, C.XFRM_MSG_GETSA, C.NLM_F_REQUEST | C.NLM_F_DUMP))

    def dump_policy(self) -> list[nlmsg]:
        req = xfrm_dump_request()
        return list(self.nlm_request(req, C.XFRM_MSG_GETPOLICY, C.NLM_F_REQUEST | C.NLM_F_DUMP))


def encode_message(msg: nlmsg, msg_type: int, flags: int, seq: int = 0, pid: int = 0) -> bytes:
    """Encode a pyroute2 message (header filled in) to bytes."""
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = pid
    msg.encode()
    return bytes(msg.data)
