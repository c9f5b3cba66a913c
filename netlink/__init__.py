"""Kernel XFRM (IPsec SA/SP) database access over NETLINK_XFRM, built on pyroute2."""
