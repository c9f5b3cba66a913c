"""An event overrun (ENOBUFS on the notification socket) costs exactly one full re-dump,
after which the followed table equals the kernel's (issue 17). The socket is a fake that
replays recorded kernel datagrams (tests/data/xfrm/recorded.json) and raises ENOBUFS
where the kernel would; tests/kernel/test_xfrm_overrun.py overruns a real one."""

from __future__ import annotations

import errno
import json
import struct
from collections import deque
from pathlib import Path

import pytest

from netlink import constants as C
from netlink import monitor as mon_mod
from netlink.decode import DumpResult, decode_messages, feed_dump
from netlink.events import EventKind
from netlink.monitor import TableFollower, XfrmMonitor

REC = json.loads((Path(__file__).parent / "data" / "xfrm" / "recorded.json").read_text())
DGRAMS = [(d["label"], bytes.fromhex(d["hex"])) for d in REC["datagrams"]]
ENOBUFS = OSError(errno.ENOBUFS, "No buffer space available")


def by_label(label: str) -> list[bytes]:
    return [raw for lab, raw in DGRAMS if lab == label]


def kernel_sas() -> list:
    """What a dump would say now: the recorded dump's SAs."""
    result = DumpResult()
    for raw in by_label("dump:sa"):
        feed_dump(raw, 77, C.XFRM_MSG_NEWSA, result)
    return list(result.items)


def with_spi(raw: bytes, spi: int) -> bytes:
    """A recorded one-message NEWSA notification, for another SPI (xfrm_usersa_info.id.spi,
    __be32 at offset 56 + 16 of the body)."""
    buf = bytearray(raw)
    assert struct.unpack_from("=H", buf, 4)[0] == C.XFRM_MSG_NEWSA and struct.unpack_from("=I", buf)[0] == len(buf)
    struct.pack_into(">I", buf, 16 + 56 + 16, spi)
    return bytes(buf)


class FakeSocket:
    """recv() replays a script of datagrams and OSErrors, then would block."""

    def __init__(self, script: list) -> None:
        self.script = deque(script)

    def recv(self, n: int) -> bytes:
        if not self.script:
            raise BlockingIOError
        item = self.script.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


def fake_monitor(script: list) -> XfrmMonitor:
    m = object.__new__(XfrmMonitor)
    m.netns = None
    m._sock = FakeSocket(script)  # type: ignore[assignment]
    m._pending = deque()
    m.overruns = 0
    return m


class FakeClient:
    dumps = 0

    def __init__(self, netns: str | None = None) -> None:
        pass

    def __enter__(self) -> "FakeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def dump_sas(self) -> list:
        FakeClient.dumps += 1
        return kernel_sas()


def test_an_overrun_is_one_overflow_event_and_drops_the_stale_queue() -> None:
    newsa = by_label("event:newsa")
    m = fake_monitor([newsa[0], ENOBUFS, newsa[1], ENOBUFS, ENOBUFS, newsa[2]])
    kinds = [e.kind for e in m.read_nowait()]
    # What was queued behind the overrun predates the re-dump: dropped, not applied.
    assert kinds == [EventKind.NEW_SA, EventKind.OVERFLOW]
    assert m.overruns == 3  # every ENOBUFS is counted, one re-dump is asked for
    assert m.read_nowait() == [] and not m._sock.script  # type: ignore[attr-defined]


def test_overrun_triggers_one_redump_and_the_table_converges(monkeypatch: pytest.MonkeyPatch) -> None:
    # Queued behind the overrun: NEW_SAs of SAs whose DEL_SAs were then lost (the
    # kernel's dump no longer has them). Applied after the re-dump they would resurrect.
    gone = [with_spi(raw, 0xDEAD0000 + i) for i, raw in enumerate(by_label("event:newsa"))]
    stale = [m.event.sa for raw in gone for m in decode_messages(raw) if m.event is not None]
    script: list = [ENOBUFS, *gone, ENOBUFS]
    monitors = [fake_monitor([])]
    monkeypatch.setattr(mon_mod, "XfrmMonitor", lambda netns=None, rcvbuf=0: monitors[0])
    monkeypatch.setattr(mon_mod, "XfrmClient", FakeClient)
    FakeClient.dumps = 0
    seen: list = []
    f = TableFollower(on_event=lambda ev: seen.append(ev.kind))
    f.start()
    assert FakeClient.dumps == 1 and f.redumps == 1
    # The kernel moves on; the socket overflows; more reads.
    monitors[0]._sock.script.extend(script)  # type: ignore[attr-defined]
    f.poll()
    f.poll()
    f.poll()
    assert FakeClient.dumps == 2 and f.resyncs == 1 and f.redumps == 2 and f.overruns == 2
    assert seen.count(EventKind.OVERFLOW) == 1
    # After the re-dump the table is the kernel's: exactly the dumped SAs.
    truth = sorted((sa.key_id for sa in kernel_sas()), key=repr)
    assert sorted((sa.key_id for sa in f.table), key=repr) == truth
    assert all(f.table.get(*sa.key_id) == sa for sa in kernel_sas())
    assert stale and not any(sa.key_id in f.table for sa in stale)
    f.close()
    assert f.overruns == 2
