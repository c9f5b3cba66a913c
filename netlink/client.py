"""Read the kernel's SA and policy databases as netlink.records.

    with XfrmClient(netns="vrf-red") as xc:
        sas = xc.dump_sas()
        sa = xc.get_sa(ipaddress.ip_address("192.0.2.2"), 0x1234, Proto.ESP)

Requests are encoded with the pyroute2 family (netlink.xfrm); replies are read
from a plain blocking NETLINK_XFRM socket and decoded by the fast decoder
(netlink.decode), which is what keeps a 50k-SA dump affordable.
"""

from __future__ import annotations

import errno
import gc
import logging
import socket
import threading
from collections.abc import Iterable

from netlink import constants as C
from netlink.decode import DumpResult, decode_messages, feed_dump
from netlink.errors import XfrmDecodeError, XfrmError, XfrmKernelError, kernel_error
from netlink.netns import create_socket
from netlink.records import SA, IPAddress, Policy

log = logging.getLogger(__name__)

_RECV_BUF = 1 << 16  # a dump datagram is at most 32 KiB (netlink_dump's skb)
_GETSA_BATCH = 64  # GETSA requests in flight at once (replies ~0.5 KiB each, well under rcvbuf)
_DUMP_RETRIES = 5  # restarts after NLM_F_DUMP_INTR before giving up
_redaction_warned = False
_redaction_lock = threading.Lock()


def open_xfrm_socket(netns: str | None = None, rcvbuf: int = 1 << 20) -> socket.socket:
    """A NETLINK_XFRM socket in ``netns``, with a clear error if the kernel has none."""
    try:
        sock = create_socket(socket.AF_NETLINK, socket.SOCK_RAW, C.NETLINK_XFRM, netns)
    except XfrmError:
        raise
    except OSError as exc:
        if exc.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
            raise kernel_error(exc.errno, "opening NETLINK_XFRM socket") from None
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:  # extended ack: the kernel then says *why* a request failed
            sock.setsockopt(C.SOL_NETLINK, C.NETLINK_EXT_ACK, 1)
        except OSError:
            pass
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def warn_if_redacted(sas: Iterable[SA]) -> None:
    """Log once per process when the kernel hands out zeroed keys (lockdown=confidentiality).

    Lockdown zeroes *every* key, so one SA with real key bytes clears the
    suspicion (a hand-made SA may well have an all-zero test key)."""
    global _redaction_warned
    if _redaction_warned:
        return
    keyed = False
    for sa in sas:
        if any(a is not None and len(a.key) for a in (sa.crypt, sa.auth, sa.aead)):
            if not sa.keys_redacted:
                return
            keyed = True
    if keyed:
        with _redaction_lock:
            if not _redaction_warned:
                _redaction_warned = True
                log.warning(
                    "the kernel returns zeroed IPsec keys (kernel lockdown=confidentiality?): "
                    "SAs are readable but O/TWAMP keys cannot be derived from them"
                )


class XfrmClient:
    """Synchronous queries over one NETLINK_XFRM socket. Thread-safe (one request at a time)."""

    def __init__(self, netns: str | None = None, timeout: float = 30.0) -> None:
        from netlink import xfrm  # pyroute2 is imported here, not by decode-only users

        self._xfrm = xfrm
        self.netns = netns
        self._sock = open_xfrm_socket(netns)
        self._sock.settimeout(timeout)
        self._lock = threading.Lock()
        self._seq = 0
        self._buf = bytearray(_RECV_BUF)

    # --- lifecycle ---
    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "XfrmClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    # --- plumbing ---
    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _send(self, data: bytes, what: str) -> None:
        try:
            self._sock.send(data)
        except OSError as exc:
            raise kernel_error(exc.errno or errno.EIO, what) from None

    def _recv(self, what: str) -> bytes:
        try:
            n = self._sock.recv_into(self._buf, 0)
        except socket.timeout:
            raise XfrmKernelError(errno.ETIMEDOUT, f"{what}: no answer from the kernel") from None
        except OSError as exc:
            raise kernel_error(exc.errno or errno.EIO, what) from None
        return bytes(self._buf[:n])

    def _dump(self, msg_type: int, reply_type: int, what: str) -> list:
        x = self._xfrm
        with self._lock:
            for _attempt in range(_DUMP_RETRIES):
                seq = self._next_seq()
                req = x.encode_message(x.xfrm_dump_request(), msg_type, C.NLM_F_REQUEST | C.NLM_F_DUMP, seq)
                self._send(req, what)
                result = DumpResult()
                # A dump creates ~15 GC-tracked objects per SA and no cycles; the
                # cyclic collector re-scanning a growing list of them costs up to
                # a quarter of the decode time at 50k SAs. Pause it meanwhile.
                gc_was_on = gc.isenabled()
                gc.disable()
                try:
                    while not result.done:
                        feed_dump(self._recv(what), seq, reply_type, result)
                finally:
                    if gc_was_on:
                        gc.enable()
                if result.error:
                    raise kernel_error(result.error, what, result.error_msg)
                if not result.interrupted:
                    return result.items
                log.debug("%s: table changed during the dump (NLM_F_DUMP_INTR), restarting", what)
            raise XfrmKernelError(errno.EAGAIN, f"{what}: the table kept changing during {_DUMP_RETRIES} dumps")

    # --- API ---
    def dump_sas(self) -> list[SA]:
        """Every SA of the namespace. Raises XfrmPermissionError without CAP_NET_ADMIN."""
        sas: list[SA] = self._dump(C.XFRM_MSG_GETSA, C.XFRM_MSG_NEWSA, "dumping IPsec SAs")
        warn_if_redacted(sas)
        return sas

    def dump_policies(self) -> list[Policy]:
        return self._dump(C.XFRM_MSG_GETPOLICY, C.XFRM_MSG_NEWPOLICY, "dumping IPsec policies")

    def _getsa_request(self, daddr: IPAddress, spi: int, proto: int, mark: tuple[int, int] | None, seq: int) -> bytes:
        x = self._xfrm
        msg = x.xfrm_usersa_id()
        msg["daddr"] = daddr.packed.ljust(16, b"\0")
        msg["spi"] = spi
        msg["family"] = C.AF_INET if daddr.version == 4 else C.AF_INET6
        msg["proto"] = int(proto)
        if mark is not None:
            msg["attrs"] = [("XFRMA_MARK", {"v": mark[0], "m": mark[1]})]
        return x.encode_message(msg, C.XFRM_MSG_GETSA, C.NLM_F_REQUEST, seq)

    def get_sas(self, sas: Iterable[SA]) -> dict[tuple[int, int, IPAddress], SA | None]:
        """The kernel's current copy of each of ``sas`` (looked up by spi, proto,
        daddr and mark), or None for those it no longer holds.

        One XFRM_MSG_GETSA per SA, sent in batches and answered by sequence number:
        the cost follows len(sas), not the size of the SA database (a dump is
        O(table)). This is how the agent refreshes the counters of the SAs it measures.
        """
        out: dict[tuple[int, int, IPAddress], SA | None] = {}
        todo = list({sa.key_id: sa for sa in sas}.values())
        what = "refreshing measured SAs"
        with self._lock:
            for i in range(0, len(todo), _GETSA_BATCH):
                pending: dict[int, SA] = {}
                for sa in todo[i : i + _GETSA_BATCH]:
                    seq = self._next_seq()
                    mark = (sa.mark.value, sa.mark.mask) if sa.mark is not None else None
                    pending[seq] = sa
                    self._send(self._getsa_request(sa.daddr, sa.spi, sa.proto, mark, seq), what)
                while pending:
                    for m in decode_messages(self._recv(what)):
                        asked = pending.pop(m.seq, None)
                        if asked is None:
                            continue
                        if m.type == C.NLMSG_ERROR:
                            if m.error in (errno.ESRCH, errno.ENOENT):
                                out[asked.key_id] = None
                                continue
                            raise kernel_error(m.error or errno.EIO, what, m.error_msg)
                        if m.event is None or m.event.sa is None:
                            raise XfrmDecodeError(f"{what}: unexpected reply type {m.type}")
                        out[asked.key_id] = m.event.sa
        return out

    def get_sa(self, daddr: IPAddress, spi: int, proto: int, mark: tuple[int, int] | None = None) -> SA | None:
        """The SA (spi, proto, daddr), or None if the kernel has none.

        ``mark`` (value, mask) is needed to find SAs installed with a mark.
        """
        what = f"looking up SA spi 0x{spi:08x}"
        with self._lock:
            seq = self._next_seq()
            self._send(self._getsa_request(daddr, spi, proto, mark, seq), what)
            while True:
                for m in decode_messages(self._recv(what)):
                    if m.seq != seq:
                        continue
                    if m.type == C.NLMSG_ERROR:
                        if m.error in (errno.ESRCH, errno.ENOENT):
                            return None
                        raise kernel_error(m.error or errno.EIO, what, m.error_msg)
                    if m.event is not None and m.event.sa is not None:
                        warn_if_redacted([m.event.sa])
                        return m.event.sa
                    raise XfrmDecodeError(f"{what}: unexpected reply type {m.type}")
