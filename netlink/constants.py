"""NETLINK_XFRM numbers, from linux/include/uapi/linux/xfrm.h and linux/netlink.h.

Plain ints, no imports: shared by the fast decoder (netlink.decode) and the
pyroute2 family (netlink.xfrm).
"""

from __future__ import annotations

NETLINK_XFRM = 6

# linux/netlink.h
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10  # the table changed during the dump: restart it
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_NO_ENOBUFS = 5
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1

# xfrm.h: enum { XFRM_MSG_BASE = 0x10, ... }
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ALLOCSPI = 0x16
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_NEWAE = 0x1E
XFRM_MSG_GETAE = 0x1F
XFRM_MSG_REPORT = 0x20
XFRM_MSG_MIGRATE = 0x21
XFRM_MSG_NEWSADINFO = 0x22
XFRM_MSG_GETSADINFO = 0x23
XFRM_MSG_NEWSPDINFO = 0x24
XFRM_MSG_GETSPDINFO = 0x25
XFRM_MSG_MAPPING = 0x26
XFRM_MSG_SETDEFAULT = 0x27
XFRM_MSG_GETDEFAULT = 0x28

# enum xfrm_attr_type_t
XFRMA_UNSPEC = 0
XFRMA_ALG_AUTH = 1  # struct xfrm_algo
XFRMA_ALG_CRYPT = 2  # struct xfrm_algo
XFRMA_ALG_COMP = 3  # struct xfrm_algo
XFRMA_ENCAP = 4  # struct xfrm_encap_tmpl
XFRMA_TMPL = 5  # 1 or more struct xfrm_user_tmpl
XFRMA_SA = 6  # struct xfrm_usersa_info
XFRMA_POLICY = 7  # struct xfrm_userpolicy_info
XFRMA_SEC_CTX = 8  # struct xfrm_user_sec_ctx
XFRMA_LTIME_VAL = 9  # struct xfrm_lifetime_cur
XFRMA_REPLAY_VAL = 10  # struct xfrm_replay_state
XFRMA_REPLAY_THRESH = 11  # __u32
XFRMA_ETIMER_THRESH = 12  # __u32
XFRMA_SRCADDR = 13  # xfrm_address_t
XFRMA_COADDR = 14  # xfrm_address_t
XFRMA_LASTUSED = 15  # __u64
XFRMA_POLICY_TYPE = 16  # struct xfrm_userpolicy_type
XFRMA_MIGRATE = 17  # struct xfrm_user_migrate (repeated)
XFRMA_ALG_AEAD = 18  # struct xfrm_algo_aead
XFRMA_KMADDRESS = 19  # struct xfrm_user_kmaddress
XFRMA_ALG_AUTH_TRUNC = 20  # struct xfrm_algo_auth
XFRMA_MARK = 21  # struct xfrm_mark
XFRMA_TFCPAD = 22  # __u32
XFRMA_REPLAY_ESN_VAL = 23  # struct xfrm_replay_state_esn
XFRMA_SA_EXTRA_FLAGS = 24  # __u32
XFRMA_PROTO = 25  # __u8
XFRMA_ADDRESS_FILTER = 26  # struct xfrm_address_filter
XFRMA_PAD = 27
XFRMA_OFFLOAD_DEV = 28  # struct xfrm_user_offload
XFRMA_SET_MARK = 29  # __u32 (was XFRMA_OUTPUT_MARK)
XFRMA_SET_MARK_MASK = 30  # __u32
XFRMA_IF_ID = 31  # __u32
XFRMA_MTIMER_THRESH = 32  # __u32, seconds, input SA
# Newer kernels (6.10+); older ones never send them.
XFRMA_SA_DIR = 33  # __u8
XFRMA_NAT_KEEPALIVE_INTERVAL = 34  # __u32
XFRMA_SA_PCPU = 35  # __u32
XFRMA_IPTFS_DROP_TIME = 36  # __u32
XFRMA_IPTFS_REORDER_WINDOW = 37  # __u16
XFRMA_IPTFS_DONT_FRAG = 38  # flag
XFRMA_IPTFS_INIT_DELAY = 39  # __u32
XFRMA_IPTFS_MAX_QSIZE = 40  # __u32
XFRMA_IPTFS_PKT_SIZE = 41  # __u32

NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

# enum xfrm_nlgroups (group numbers for NETLINK_ADD_MEMBERSHIP)
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4
XFRMNLGRP_AEVENTS = 5
XFRMNLGRP_REPORT = 6
XFRMNLGRP_MIGRATE = 7
XFRMNLGRP_MAPPING = 8

# xfrm_usersa_info.flags
XFRM_STATE_NOECN = 1
XFRM_STATE_DECAP_DSCP = 2
XFRM_STATE_NOPMTUDISC = 4
XFRM_STATE_WILDRECV = 8
XFRM_STATE_ICMP = 16
XFRM_STATE_AF_UNSPEC = 32
XFRM_STATE_ALIGN4 = 64
XFRM_STATE_ESN = 128

XFRM_INF = (1 << 64) - 1
IPSEC_PROTO_ANY = 255  # xfrm_usersa_flush.proto meaning "every protocol"

AF_INET = 2
AF_INET6 = 10
