"""XfrmClient / XfrmMonitor against this host's kernel: what works without ESP/AH
(policies, empty SA dumps, namespaces, errors). SA traffic is in tests/kernel/."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from netlink.client import XfrmClient
from netlink.errors import NetnsNotFoundError, XfrmPermissionError
from netlink.events import EventKind
from netlink.monitor import TableFollower, XfrmMonitor


def _xfrm_available() -> bool:
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6).close()
        return os.geteuid() == 0
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _xfrm_available(), reason="needs root and NETLINK_XFRM")

POLICY = "src 10.9.0.0/24 dst 10.9.1.0/24 dir out"
TMPL = "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 42 mode tunnel"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"xwtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ip(ns: str, cmd: str) -> None:
    subprocess.run(["ip", "-n", ns, *cmd.split()], check=True)


def test_dumps_and_monitor_inside_a_namespace(netns: str) -> None:
    with XfrmMonitor(netns) as mon, XfrmClient(netns) as xc:
        assert xc.dump_sas() == [] and xc.dump_policies() == []
        ip(netns, f"xfrm policy add {POLICY} {TMPL}")
        (pol,) = xc.dump_policies()
        assert pol.templates[0].reqid == 42 and str(pol.selector.daddr) == "10.9.1.0"
        events = mon.events(timeout=5)
        assert [e.kind for e in events] == [EventKind.NEW_POLICY] and events[0].policy == pol
        ip(netns, f"xfrm policy delete {POLICY}")
        assert [e.kind for e in mon.events(timeout=5)] == [EventKind.DEL_POLICY]
    # The root namespace saw none of it.
    with XfrmClient() as root:
        assert all(p.templates[:1] == () or p.templates[0].reqid != 42 for p in root.dump_policies())


def test_table_follower_starts_on_an_empty_namespace(netns: str) -> None:
    with TableFollower(netns) as f:
        assert len(f.table) == 0 and f.poll() == 0


def test_missing_namespace_is_a_clear_error() -> None:
    with pytest.raises(NetnsNotFoundError, match="not found"):
        XfrmClient(netns=f"xw-missing-{uuid.uuid4().hex[:6]}")
    assert not os.path.exists("/run/netns/xw-missing")  # never created on the way


def test_without_cap_net_admin_the_error_says_so() -> None:
    code = "from netlink.client import XfrmClient\nXfrmClient().dump_sas()"
    proc = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", code],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode != 0
    assert "XfrmPermissionError" in proc.stderr and "CAP_NET_ADMIN" in proc.stderr
    assert issubclass(XfrmPermissionError, PermissionError)


def test_pyroute2_xfrm_socket_in_a_namespace(netns: str) -> None:
    from netlink.xfrm import XfrmSocket

    ip(netns, f"xfrm policy add {POLICY} {TMPL}")
    with XfrmSocket(netns=netns) as xs:
        msgs = [m for m in xs.dump_policy() if m["header"]["type"] == 0x13]  # XFRM_MSG_NEWPOLICY
        assert xs.dump_sa() == [] or all(m["header"]["type"] != 0x10 for m in xs.dump_sa())
    assert len(msgs) == 1
    (tmpl,) = msgs[0].get_attr("XFRMA_TMPL")
    assert tmpl["reqid"] == 42 and tmpl["proto"] == 50 and msgs[0]["dir"] == 1


def test_table_follower_runs_on_asyncio(netns: str) -> None:
    import asyncio

    from netlink.events import XfrmEvent

    seen: list[XfrmEvent] = []

    async def main() -> None:
        follower = TableFollower(netns, on_event=seen.append)
        task = asyncio.create_task(follower.run())
        await asyncio.sleep(0.3)  # subscribed and dumped
        proc = await asyncio.create_subprocess_exec("ip", "-n", netns, "xfrm", "policy", "add", *POLICY.split(), *TMPL.split())
        assert await proc.wait() == 0
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        follower.close()

    asyncio.run(main())
    assert [e.kind for e in seen] == [EventKind.NEW_POLICY]


def test_get_sas_answers_each_lookup_by_sequence_number(netns: str) -> None:
    """Targeted GETSA for many SAs at once (more than one batch in flight): every SA gets
    its answer, None where the kernel has no such SA (ESRCH); the SA-carrying replies
    are exercised against a kernel with ESP in tests/kernel/test_agent_privileges.py."""
    from netlink.fake import make_sa

    sas = [make_sa("192.0.2.1", "192.0.2.2", spi=0x100 + i) for i in range(150)]
    sas.append(make_sa("2001:db8::1", "2001:db8::2", spi=0x9))
    with XfrmClient(netns) as xc:
        got = xc.get_sas(sas)
        assert got == {sa.key_id: None for sa in sas}
        assert xc.dump_sas() == []  # the socket is still in step after the batch
