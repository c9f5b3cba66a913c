#!/usr/bin/env python3
"""TEST-ONLY: make QEMU's emulated Intel 82576 (``-device igb``) hardware-stamp received UDP.

    python -m tests.kernel_hw.igb_rx_workaround IFACE|PCI-DEVICE-PATH {apply|clear|undo|dump}

Never run this against real hardware: it pokes NIC registers behind the
driver's back. It exists so the VM tests can exercise the RX hardware-stamp
code path, which QEMU 10.0's igb model does not offer as shipped:

* The 82576 driver grants only PTP filters (``HWTSTAMP_FILTER_ALL`` and
  ``NTP_ALL`` give ERANGE), and QEMU's model stamps only frames matched by an
  EtherType filter (ETQF) with its 1588 bit, whose payload looks like a PTPv2
  header: byte 0 == TSYNCRXCFG[15:8] (messageId/transportSpecific) and
  (byte 1 & 0x0f) == 2 (versionPTP).
* It latches one stamp (TSYNCRXCTL.VALID) and only a read of RXSATRH clears
  the latch; the igb driver reads RXSTMPL/H but never RXSATRH, so after the
  first stamp no further frame is stamped.

The workaround, applied *after every SIOCSHWTSTAMP* (the driver rewrites
TSYNCRXCFG then; it leaves ETQF0 alone):

* ETQF0 (0x5CB0) = 0x44000800: filter enable (bit 26) + 1588 time stamp
  (bit 30) for EtherType 0x0800, so every IPv4 frame is a candidate;
* TSYNCRXCFG (0x5F50) = 0x4500: "PTP messageId" 0x45, the first octet of
  an IPv4 header without options (version 4, IHL 5);
* the sender sets IP TOS 0x02, which makes the second octet look like
  versionPTP 2;
* the receiver reads RXSATRH (0xB630) after each received probe to clear
  the latch (``clear``).

BAR0 is mapped through sysfs ``resource0``; with a driver bound, the stock
kernel (CONFIG_IO_STRICT_DEVMEM) allows that only when booted with
``iomem=relaxed``. Register accesses are single aligned 32-bit loads/stores.
Python 3.11 stdlib only.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path
from typing import Self

# 82576 register offsets (Intel 82576 datasheet, section 8; Linux e1000_regs.h).
ETQF0 = 0x5CB0        # EtherType queue filter 0
TSYNCRXCTL = 0xB620   # RX time sync control (bit 0: VALID latch, bit 4: enable)
RXSTMPL = 0xB624      # RX timestamp low
RXSTMPH = 0xB628      # RX timestamp high
RXSATRL = 0xB62C      # RX timestamp attributes low
RXSATRH = 0xB630      # RX timestamp attributes high: reading it clears the latch in QEMU
TSYNCRXCFG = 0x5F50   # RX time sync configuration (PTP message type to stamp)
TSYNCTXCTL = 0xB614   # TX time sync control

ETQF_IPV4_1588 = 0x44000800   # bit 30 (1588 stamp) | bit 26 (enable) | EtherType 0x0800
TSYNCRXCFG_IPV4 = 0x4500      # messageId 0x45 in bits 15:8: an IPv4 header's first octet
PROBE_TOS = 0x02              # sender's IP TOS: second octet & 0x0f == 2 ("PTPv2")


def pci_device_dir(dev: str) -> Path:
    """An interface name (looked up in this netns's /sys/class/net) or a sysfs PCI device path."""
    p = Path(dev)
    if not p.is_absolute():
        p = Path("/sys/class/net") / dev / "device"
    p = p.resolve()
    if not (p / "resource0").exists():
        raise SystemExit(f"igb_rx_workaround: {dev}: no PCI resource0 at {p}")
    return p


class IgbRegisters:
    """BAR0 of one 82576, mapped read-write. Use as a context manager."""

    def __init__(self, dev: str):
        self.dir = pci_device_dir(dev)
        path = self.dir / "resource0"
        size = path.stat().st_size
        fd = os.open(path, os.O_RDWR | os.O_SYNC)
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise SystemExit(f"igb_rx_workaround: cannot map {path}: {e.strerror} "
                             "(boot the guest with iomem=relaxed)") from None
        finally:
            os.close(fd)
        # A 'I' (uint32) view: indexing it is one aligned 32-bit MMIO access,
        # unlike slicing the mmap (memcpy may split or merge accesses).
        self._regs = memoryview(self._map).cast("I")

    def read(self, off: int) -> int:
        return self._regs[off // 4]

    def write(self, off: int, val: int) -> None:
        self._regs[off // 4] = val & 0xFFFFFFFF

    def close(self) -> None:
        self._regs.release()
        self._map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the workaround --------------------------------------------------
    def apply(self) -> None:
        """Stamp IPv4 frames whose TOS is PROBE_TOS. Call after every SIOCSHWTSTAMP.

        Also re-arms the latch: SIOCSHWTSTAMP reads RXSTMPH "to clear" it, which
        QEMU ignores, so a stamp latched earlier would swallow the next probe's.
        """
        self.write(ETQF0, ETQF_IPV4_1588)
        self.write(TSYNCRXCFG, TSYNCRXCFG_IPV4)
        self.clear_latch()

    def clear_latch(self) -> None:
        """Re-arm RX stamping after a stamped frame (QEMU clears VALID on this read)."""
        self.read(RXSATRH)

    def undo(self) -> None:
        """Disable the IPv4 EtherType filter again (TSYNCRXCFG is rewritten by the next SIOCSHWTSTAMP)."""
        self.write(ETQF0, 0)
        self.clear_latch()

    def dump(self) -> dict[str, int]:
        names = ("ETQF0", "TSYNCRXCFG", "TSYNCRXCTL", "TSYNCTXCTL", "RXSTMPL", "RXSTMPH", "RXSATRL")
        # RXSATRH is left out on purpose: reading it has a side effect.
        return {n: self.read(globals()[n]) for n in names}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[2] not in ("apply", "clear", "undo", "dump"):
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    with IgbRegisters(argv[1]) as regs:
        if argv[2] == "dump":
            for k, v in regs.dump().items():
                print(f"{k:11s} 0x{v:08x}")
        else:
            getattr(regs, {"apply": "apply", "clear": "clear_latch", "undo": "undo"}[argv[2]])()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
