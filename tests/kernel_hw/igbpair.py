"""Two igb NICs, each in its own netns, for the hwstamp tests and bench/timestamps.py --igb.

Used inside ``tools/vm/run --nics igb``. ``setup()`` moves the first NIC into netns
``hwa`` (10.77.0.1/24), the second into ``hwb`` (10.77.0.2/24) and waits for carrier.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NS = ("hwa", "hwb")
ADDRS = ("10.77.0.1", "10.77.0.2")
CLONE_NEWNET = 0x40000000


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextlib.contextmanager
def netns(name: str):
    """Run the body (this thread only) in netns ``name``: sockets made there stay there."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(there)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)
        os.close(there)


@dataclass(frozen=True)
class Nic:
    ns: str
    ifname: str
    addr: str
    pci: Path  # sysfs PCI device dir (resource0 for the test-only RX workaround)
    phc: int  # /dev/ptpN


@dataclass(frozen=True)
class IgbPair:
    a: Nic
    b: Nic


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def igb_nics() -> list[tuple[str, Path]]:
    out = []
    for d in Path("/sys/class/net").iterdir():
        drv = d / "device" / "driver"
        if drv.exists() and drv.resolve().name == "igb":
            out.append((d.name, (d / "device").resolve()))
    return sorted(out, key=lambda x: x[1].name)


def phc_index(ns: str, ifname: str) -> int:
    from agent.engine import ethtool

    with netns(ns):
        return ethtool.ts_info(ifname).phc_index


class SetupError(RuntimeError):
    pass


def setup(carrier_timeout: float = 120.0) -> IgbPair:
    nics = igb_nics()
    deadline = time.monotonic() + 30
    while len(nics) < 2 and Path("/sys/module/igb").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # NICs return to the initial netns asynchronously after a teardown
        nics = igb_nics()
    if len(nics) < 2:
        raise SetupError("two igb NICs needed: run under tools/vm/run --nics igb "
                         f"(QEMU >= 8; found {len(nics)})")
    pair = []
    for (ifname, pci), ns, addr in zip(nics, NS, ADDRS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        _ip("netns", "add", ns)
        _ip("link", "set", ifname, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", ifname, "up")
        idx = phc_index(ns, ifname)
        if idx < 0:
            raise SetupError(f"{ifname}: igb without a PTP clock")
        pair.append(Nic(ns, ifname, addr, pci, idx))
    deadline = time.monotonic() + carrier_timeout
    for n in pair:
        while "LOWER_UP" not in _ip("-n", n.ns, "link", "show", "dev", n.ifname):
            if time.monotonic() > deadline:
                raise SetupError(f"{n.ifname} in {n.ns}: no carrier after {carrier_timeout:g} s")
            time.sleep(0.1)
    # One ping across: ARP resolved before any stamped traffic.
    subprocess.run(["ip", "netns", "exec", NS[0], "ping", "-c", "1", "-W", "30", ADDRS[1]],
                   check=True, capture_output=True, timeout=60)
    return IgbPair(*pair)


def teardown() -> None:
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def rx_workaround(nic: Nic):
    """TEST-ONLY: make ``nic`` hardware-stamp received IPv4 with TOS 0x02 (igb_rx_workaround.py).

    The RX stamping unit must be on first: SIOCSHWTSTAMP with a filter the driver grants
    (ptpv2-event; the engine asked for all/ntp-all, was refused, and left RX at none).
    Returns the mapped registers: ``clear_latch()`` after each stamped packet, ``undo()``."""
    from agent.engine import ethtool

    from .igb_rx_workaround import IgbRegisters

    with netns(nic.ns):
        ethtool.set_hwtstamp(nic.ifname, ethtool.HwTstampConfig(0, ethtool.HWTSTAMP_TX_ON, 12))  # ptpv2-event
    regs = IgbRegisters(str(nic.pci))
    regs.apply()  # after every SIOCSHWTSTAMP: the driver rewrites TSYNCRXCFG
    return regs
