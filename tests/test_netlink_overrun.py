"""An event overrun (ENOBUFS on the notification socket) costs exactly one full re-dump,
after which the followed table equals the kernel's (issue 17). The socket is a fake that
replays recorded kernel datagrams (tests/data/xfrm/recorded.json) and raises ENOBUFS
where the kernel would; tests/kernel/test_xfrm_overrun.py overruns a real one."""

from __future__ import annotations

import errno
import json
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


def test_consecutive_enobufs_are_one_overflow_event() -> None:
    newsa = by_label("event:newsa")
    m = fake_monitor([newsa[0], ENOBUFS, ENOBUFS, ENOBUFS, newsa[1]])
    kinds = [e.kind for e in m.read_nowait()]
    assert kinds == [EventKind.NEW_SA, EventKind.OVERFLOW, EventKind.NEW_SA]
    assert m.overruns == 3  # every ENOBUFS is counted, one re-dump is asked for


def test_overrun_triggers_one_redump_and_the_table_converges(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before the overrun: events for SAs that the lost notifications later deleted.
    before = [raw for raw in by_label("event:newsa")]
    stale = [m.event.sa for raw in before for m in decode_messages(raw) if m.event is not None]
    script: list = [*before, ENOBUFS, ENOBUFS]
    monitors = [fake_monitor([])]
    monkeypatch.setattr(mon_mod, "XfrmMonitor", lambda netns=None: monitors[0])
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
    assert stale  # the events did insert SAs, now superseded by the dump
    f.close()
    assert f.overruns == 2
