"""Exceptions raised by netlink/. Messages never contain key material."""

from __future__ import annotations

import errno


class XfrmError(Exception):
    """Base class of every error netlink/ raises on purpose."""


class XfrmDecodeError(XfrmError, ValueError):
    """Bytes that are not a well-formed NETLINK_XFRM message.

    The only exception the decoders (netlink.decode) raise, whatever the input.
    """


class XfrmPermissionError(XfrmError, PermissionError):
    """The kernel refused: XFRM dumps and queries need CAP_NET_ADMIN."""


class XfrmUnavailableError(XfrmError, OSError):
    """No NETLINK_XFRM in this kernel (CONFIG_XFRM_USER off / xfrm_user not loaded)."""


class NetnsNotFoundError(XfrmError, FileNotFoundError):
    """The named network namespace does not exist."""


class XfrmKernelError(XfrmError, OSError):
    """Any other error the kernel answered with (errno in ``.errno``)."""


def kernel_error(code: int, what: str, ext_msg: str | None = None) -> XfrmError:
    """Map an errno from an NLMSG_ERROR reply (or socket call) to our exceptions."""
    code = abs(code)
    detail = f" ({ext_msg})" if ext_msg else ""
    if code == errno.EPERM or code == errno.EACCES:
        return XfrmPermissionError(
            code,
            f"{what}: permission denied{detail}; reading the kernel's IPsec SAs needs "
            "CAP_NET_ADMIN in the network namespace (run xwamp as root or grant the capability)",
        )
    if code in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
        return XfrmUnavailableError(
            code,
            f"{what}: the kernel has no NETLINK_XFRM{detail}; load the xfrm_user module "
            "(modprobe xfrm_user) or use a kernel with CONFIG_XFRM_USER",
        )
    import os

    return XfrmKernelError(code, f"{what}: {os.strerror(code)}{detail}")
