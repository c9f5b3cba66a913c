"""recvmmsg(2) / sendmmsg(2) through ctypes, for a reflector draining a queue of test packets.

Python's socket module has neither call. Per packet, ``socket.recvmsg`` allocates the data,
a list of ancillary tuples and an address tuple (inet_ntop), and ``sendto`` parses the
address back (inet_pton); under load most of that is avoidable: one recvmmsg fills
preallocated buffers with a batch, each reply is copied into a preallocated send slot whose
``msg_name`` points at the raw sockaddr its request came from, and one sendmmsg sends them.

:class:`MmsgBuffers` holds everything, allocated once per socket: per slot a data buffer, a
control buffer, a sockaddr_storage, the receive and send iovecs and mmsghdrs. Layouts come from
ctypes' own struct definitions (``struct msghdr``, ``struct mmsghdr``, ``struct iovec``,
<sys/socket.h>), so the offsets read with ``struct`` follow the platform ABI.

:func:`available` says whether libc has both symbols; a kernel without them (ENOSYS) shows on
the first call, and the caller falls back to recvmsg/sendto.
"""

from __future__ import annotations

import ctypes
import errno
import struct
import sys

_SIZE_T = ctypes.c_size_t
SOCKADDR_SPACE = 128  # sizeof(struct sockaddr_storage)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", _SIZE_T)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", _SIZE_T),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", _SIZE_T),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


HDR = ctypes.sizeof(_MMsgHdr)
_Z = "Q" if ctypes.sizeof(_SIZE_T) == 8 else "I"


def _info_struct() -> struct.Struct:
    """(msg_namelen, msg_controllen, msg_flags, msg_len) of one mmsghdr, in one unpack."""
    fields = [(_MsgHdr.msg_namelen.offset, "I"), (_MsgHdr.msg_controllen.offset, _Z),
              (_MsgHdr.msg_flags.offset, "i"), (_MMsgHdr.msg_len.offset, "I")]
    fmt, at = "=", 0
    for off, code in fields:
        fmt += f"{off - at}x{code}" if off > at else code
        at = off + struct.calcsize("=" + code)
    return struct.Struct(fmt)


INFO = _info_struct()
CTL_LEN_AT = _MsgHdr.msg_controllen.offset
CTL_LEN = struct.Struct("=" + _Z)
CMSG_HDR = struct.Struct("=" + _Z + "ii")  # struct cmsghdr: cmsg_len, cmsg_level, cmsg_type
SEND_CTL = (CMSG_HDR.size + 4 + ctypes.sizeof(_SIZE_T) - 1) & ~(ctypes.sizeof(_SIZE_T) - 1)  # CMSG_SPACE(4)
IOV = ctypes.sizeof(_IoVec)
IOV_LEN_AT = _IoVec.iov_len.offset
IOV_LEN = struct.Struct("=" + _Z)

_libc = None
_recvmmsg = _sendmmsg = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _recvmmsg, _sendmmsg = _libc.recvmmsg, _libc.sendmmsg
    except (OSError, AttributeError):
        _recvmmsg = _sendmmsg = None
    else:
        # int recvmmsg(int, struct mmsghdr *, unsigned int, int, struct timespec *) and
        # int sendmmsg(int, struct mmsghdr *, unsigned int, int): called without argtypes (a third
        # cheaper per call), so every pointer is passed as a c_void_p and every int fits a C int.
        _recvmmsg.restype = _sendmmsg.restype = ctypes.c_int


def available() -> bool:
    """libc has recvmmsg and sendmmsg (the kernel may still answer ENOSYS)."""
    return _recvmmsg is not None and _sendmmsg is not None


MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
MSG_CTRUNC = 0x08


class MmsgBuffers:
    """Receive and send arrays for ``n`` datagrams of at most ``size`` octets, with ``ctl``
    octets of control buffer each; slot i's reply goes back to slot i's source address.

    ``data``, ``names``, ``ctl``, ``info``, ``out``: writable memoryviews over the buffers
    (slot i at ``i * size``, ``i * SOCKADDR_SPACE``, ``i * ctl``, ``i * HDR``, ``i * size``)."""

    def __init__(self, fd: int, n: int, size: int, ctl: int, namelen: int) -> None:
        if not available():
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg not in libc")
        self.fd, self.n, self.size, self.ctl_size = fd, n, size, ctl
        self._data = ctypes.create_string_buffer(n * size)
        self._out = ctypes.create_string_buffer(n * size)
        self._names = ctypes.create_string_buffer(n * SOCKADDR_SPACE)
        self._ctl = ctypes.create_string_buffer(n * ctl)
        self._sctl = ctypes.create_string_buffer(n * SEND_CTL)
        self._riov = (_IoVec * n)()
        self._siov = (_IoVec * n)()
        self._rhdr = (_MMsgHdr * n)()
        self._shdr = (_MMsgHdr * n)()
        a_data, a_out = ctypes.addressof(self._data), ctypes.addressof(self._out)
        a_names, a_ctl = ctypes.addressof(self._names), ctypes.addressof(self._ctl)
        for i in range(n):
            self._riov[i].iov_base, self._riov[i].iov_len = a_data + i * size, size
            self._siov[i].iov_base, self._siov[i].iov_len = a_out + i * size, 0
            r = self._rhdr[i].msg_hdr
            r.msg_name, r.msg_namelen = a_names + i * SOCKADDR_SPACE, SOCKADDR_SPACE
            r.msg_iov, r.msg_iovlen = ctypes.addressof(self._riov[i]), 1
            r.msg_control, r.msg_controllen = a_ctl + i * ctl, ctl
            s = self._shdr[i].msg_hdr
            # The reply goes to the raw sockaddr its request came from: no conversion either way.
            s.msg_name, s.msg_namelen = a_names + i * SOCKADDR_SPACE, namelen
            s.msg_iov, s.msg_iovlen = ctypes.addressof(self._siov[i]), 1
            # A control message of its own (set_send_cmsg), sent when msg_controllen says so.
            s.msg_control, s.msg_controllen = ctypes.addressof(self._sctl) + i * SEND_CTL, 0
        self._rhdr_ptr = ctypes.c_void_p(ctypes.addressof(self._rhdr))
        self._shdr_ptrs = [ctypes.c_void_p(ctypes.addressof(self._shdr) + i * HDR) for i in range(n)]
        self.info = memoryview(self._rhdr).cast("B")
        # recvmmsg overwrites msg_namelen, msg_controllen, msg_flags: put them back in one copy.
        self._fresh = bytes(self.info)
        self.data = memoryview(self._data).cast("B")
        self.out = memoryview(self._out).cast("B")
        self.names = memoryview(self._names).cast("B")
        self.ctl = memoryview(self._ctl).cast("B")
        # Slot i's reply length goes at iov_len_at + i * IOV (set_out_len, or inlined by the caller).
        self.siov = memoryview(self._siov).cast("B")
        # Slot i's send msg_controllen at ctl_len_at + i * HDR: 0, or SEND_CTL to send its cmsg.
        self.sinfo = memoryview(self._shdr).cast("B")
        # Per slot, its offsets: (i, in info, in data and out, in ctl, in names, of its send iov_len),
        # computed once rather than per datagram.
        self.slots = [(i, i * HDR, i * size, i * ctl, i * SOCKADDR_SPACE, i * IOV + IOV_LEN_AT) for i in range(n)]

    def set_send_cmsg(self, level: int, ctype: int, data: bytes) -> None:
        """The control message every send slot carries when its msg_controllen is set
        (e.g. SO_TIMESTAMPING: a TX stamp asked for that one datagram)."""
        if CMSG_HDR.size + len(data) > SEND_CTL:
            raise ValueError("control message too long")
        one = CMSG_HDR.pack(CMSG_HDR.size + len(data), level, ctype) + data
        mv = memoryview(self._sctl).cast("B")
        for i in range(self.n):
            mv[i * SEND_CTL : i * SEND_CTL + len(one)] = one
    def recv(self, vlen: int | None = None) -> int:
        """Datagrams received into slots 0.. (MSG_DONTWAIT); 0 when none is queued.
        Raises OSError for anything else (ENOSYS included)."""
        self.info[:] = self._fresh
        got = _recvmmsg(self.fd, self._rhdr_ptr, vlen or self.n, MSG_DONTWAIT, None)  # type: ignore[misc]
        if got >= 0:
            return got
        e = ctypes.get_errno()
        if e in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise OSError(e, errno.errorcode.get(e, "recvmmsg"))

    def set_out_len(self, i: int, length: int) -> None:
        IOV_LEN.pack_into(self.siov, i * IOV + IOV_LEN_AT, length)

    def send(self, start: int, count: int) -> tuple[int, int]:
        """sendmmsg of slots start..start+count-1: (messages sent, errno of the first unsent
        or 0). Linux sends in order and stops at the first failure (sendmmsg(2))."""
        got = _sendmmsg(self.fd, self._shdr_ptrs[start], count, MSG_DONTWAIT)  # type: ignore[misc]
        if got >= 0:
            return got, 0
        return 0, ctypes.get_errno() or errno.EIO


__all__ = ["CTL_LEN", "CTL_LEN_AT", "HDR", "INFO", "IOV", "IOV_LEN", "IOV_LEN_AT", "MSG_CTRUNC", "MSG_TRUNC", "SEND_CTL", "SOCKADDR_SPACE", "MmsgBuffers", "available"]
