#!/usr/bin/env python3
"""Prepare the real-kernel test VM: Debian's stock kernel, unpacked, and a tiny initramfs.

Nothing is installed on the host: the kernel package is downloaded with apt and
unpacked into the cache. Everything is keyed by the kernel version, so a cache
is reused until Debian ships a new kernel. Safe to run concurrently (flock).
"""

from __future__ import annotations

import fcntl
import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# Modules the initramfs needs to reach the host filesystem (dependencies resolved by modprobe).
BOOT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]


def cache_dir() -> Path:
    return Path(os.environ.get("XWAMP_VM_CACHE", REPO / ".cache" / "vm")).resolve()


def log(msg: str) -> None:
    print(f"[vm-build] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def resolve_kernel_package() -> str:
    """linux-image-amd64 is a metapackage; its Depends names the versioned image (issue #2)."""
    pinned = os.environ.get("XWAMP_VM_KERNEL_PKG")
    if pinned:
        return pinned
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        for line in out.splitlines():
            m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
            if m and "amd64" in m.group(1):
                return m.group(1)
        if attempt == 0:  # a machine whose package lists were never fetched
            log("linux-image-amd64 unknown to apt: running apt-get update")
            subprocess.run(["apt-get", "update", "-qq"], check=False)
    raise SystemExit("vm-build: cannot resolve linux-image-amd64 (is this Debian/Ubuntu with apt sources?)")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Pull the uncompressed ELF vmlinux out of a bzImage so QEMU can boot it through PVH.

    Booting the ELF skips ~6 s of in-guest decompression under TCG. The x86 boot
    protocol header gives setup_sects (0x1f1), payload_offset (0x248) and
    payload_length (0x24c); the payload is the compressed vmlinux.
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise SystemExit("vm-build: not a bzImage (no HdrS boot header)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        # The kernel appends the uncompressed size (4 octets) after the xz stream;
        # the decompressor stops at the stream end and leaves it in unused_data.
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        out = dec.decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise SystemExit(f"vm-build: unsupported kernel compression (magic {payload[:6].hex()})")
    if not out.startswith(b"\x7fELF"):
        raise SystemExit("vm-build: decompressed payload is not an ELF vmlinux")
    return out


def newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One cpio 'newc' record (the format the kernel unpacks into its initramfs)."""
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join(
        f"{v:08x}"
        for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0)
    )
    rec = hdr.encode() + nb
    rec += b"\0" * (-len(rec) % 4) + data
    return rec + b"\0" * (-len(rec) % 4)


def build_initramfs(root: Path, kver: str, dest: Path) -> None:
    deps = run(["modprobe", "-a", "-d", str(root), "-S", kver, "--show-depends", *BOOT_MODULES])
    mods: list[Path] = []
    for line in deps.splitlines():
        parts = line.split()
        if parts and parts[0] == "insmod":
            p = Path(parts[1])
            p = p if str(p).startswith(str(root)) else root / p.relative_to("/")
            if p not in mods:
                mods.append(p)
    # busybox-static's binary: the initramfs has no libc to link against.
    busybox = shutil.which("busybox") or "/bin/busybox"
    entries: list[bytes] = []
    ino = 1

    def add(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal ino
        entries.append(newc_entry(name, mode, data, ino, rdev))
        ino += 1

    for d in ("bin", "dev", "proc", "sys", "mnt", "lower", "upper", "newroot", "modules"):
        add(d, 0o040755)
    add("dev/console", 0o020600, rdev=(5, 1))  # init's stdio before devtmpfs is mounted
    add("bin/busybox", 0o100755, Path(busybox).read_bytes())
    add("init", 0o100755, (HERE / "initramfs-init").read_bytes())
    order = []
    for i, m in enumerate(mods):
        name = f"modules/{i:02d}-{m.name}"
        add(name, 0o100644, m.read_bytes())
        order.append("/" + name)
    add("modules/order", 0o100644, ("\n".join(order) + "\n").encode())
    entries.append(newc_entry("TRAILER!!!", 0))
    dest.write_bytes(gzip.compress(b"".join(entries), compresslevel=1))


def ensure() -> Path:
    """Build (once) and return the directory holding vmlinux, initramfs and modules."""
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        pkg = resolve_kernel_package()
        kdir = base / pkg
        if not (kdir / "kver").exists():
            prepare_kernel(pkg, kdir)
        # The initramfs is cheap: rebuild it whenever its init or this builder changes.
        init_src = (HERE / "initramfs-init").read_bytes() + Path(__file__).read_bytes()
        stamp = kdir / ".initramfs-src"
        if not stamp.exists() or stamp.read_bytes() != init_src:
            build_initramfs(kdir / "root", (kdir / "kver").read_text().strip(), kdir / "initramfs.gz")
            stamp.write_bytes(init_src)
        return kdir


def prepare_kernel(pkg: str, kdir: Path) -> None:
    log(f"preparing {pkg} in {kdir}")
    if kdir.exists():
        shutil.rmtree(kdir)
    (kdir / "deb").mkdir(parents=True)
    subprocess.run(["apt-get", "download", pkg], cwd=kdir / "deb", check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deb = next((kdir / "deb").glob("*.deb"))
    root = kdir / "root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    deb.unlink()
    moddir = next(p for p in (root / "lib/modules", root / "usr/lib/modules") if p.is_dir())
    kver = next(moddir.iterdir()).name
    if moddir != root / "lib/modules":  # modprobe -d expects DIR/lib/modules/KVER
        (root / "lib").mkdir(exist_ok=True)
        (root / "lib/modules").symlink_to(moddir)
    subprocess.run(["depmod", "-b", str(root), kver], check=True)
    (kdir / "vmlinux").write_bytes(extract_vmlinux((root / "boot" / f"vmlinuz-{kver}").read_bytes()))
    (kdir / "modules").symlink_to(moddir / kver)
    (kdir / "kver").write_text(kver + "\n")  # written last: marks the kernel as ready
    log("kernel ready")


if __name__ == "__main__":
    print(ensure())
