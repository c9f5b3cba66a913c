"""The VM builder's pure parts: cpio records and vmlinux extraction from a synthetic bzImage."""

import lzma
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "vm"))
import build  # noqa: E402


def test_newc_record_layout():
    rec = build.newc_entry("init", 0o100755, b"#!x", ino=7)
    assert rec.startswith(b"070701") and len(rec) % 4 == 0
    fields = [int(rec[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    assert fields[0] == 7 and fields[1] == 0o100755 and fields[6] == 3 and fields[11] == 5
    assert b"init\0" in rec and rec.rstrip(b"\0").endswith(b"#!x")


def fake_bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", img, 0x248, 16, len(payload))
    return bytes(img) + b"\0" * 16 + payload + b"trailer"


def test_extract_vmlinux_xz_with_size_suffix():
    elf = b"\x7fELF" + bytes(range(256)) * 20
    comp = lzma.compress(elf, format=lzma.FORMAT_XZ) + struct.pack("<I", len(elf))
    assert build.extract_vmlinux(fake_bzimage(comp)) == elf


def test_extract_rejects_non_bzimage():
    with pytest.raises(SystemExit):
        build.extract_vmlinux(bytes(4096))
