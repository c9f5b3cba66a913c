#!/usr/bin/env python3
"""Fetch and unpack QEMU 10 (Debian bookworm-backports) into a cache, without installing it.

    fetch_qemu10.py [--cache DIR] [--refresh] [--suite SUITE] [--print wrapper|env|json]

Why: the emulated Intel 82576 (``-device igb``, with a PTP hardware clock) first
appeared in QEMU 8.0; bookworm ships 7.2. bookworm-backports has 10.0.

How: a *private* apt configuration (its own sources.list, lists and cache under
DIR/apt; the system's apt sources and state are never touched) runs
``apt-get update`` and ``apt-get download``; ``dpkg -x`` unpacks the packages
into DIR/<version>/root. Packages fetched:

    qemu-system-x86     the binary
    qemu-system-common  loadable modules (QEMU_MODULE_DIR), helpers
    qemu-system-data    option ROMs: pvh.bin, linuxboot_dma.bin, keymaps ...
    seabios             the BIOS (qemu 10 wants >= 1.16.3; bookworm has 1.16.2)
    + any shared-library dependency the host does not satisfy (normally none on
      a bookworm host; they come from the same private apt, bookworm or
      -backports, and are found through LD_LIBRARY_PATH).

ipxe-qemu is not fetched: igb has no option ROM, and the VM never PXE-boots.
Nor are the optional module packages (qemu-system-gui, -modules-opengl,
-modules-spice, qemu-block-extra). Caveat: QEMU searches QEMU_MODULE_DIR first
but then the compiled-in /usr/lib/x86_64-linux-gnu/qemu, so asking for a module
we lack (``-device help`` enumerates all of them, ``-display gtk``, spice, curl
block ...) loads the host 7.2's copy and QEMU aborts ("Only modules from the
same build can be loaded"). The harness's devices (q35, TCG, virtio-9p-pci,
virtio-rng-pci, igb, hub netdev, file chardev) are all built in.

Idempotent and cheap: a finished unpack is keyed by package version
(DIR/<version>/.ready); with one in place nothing touches the network unless
--refresh is given. Safe to run concurrently (flock). Python 3.11 stdlib only.

Prints (default) the path of a wrapper script that sets QEMU_MODULE_DIR (and
LD_LIBRARY_PATH when needed) and adds the -L firmware directories, so callers
just run ``WRAPPER -machine q35 ...``. ``--print env`` prints bash: exports,
QEMU=binary and a QEMU_ARGS array of the -L arguments, ``--print json`` everything. Importable: ``ensure(DIR)``.

Fails with one line on stderr (exit 1) when the package cannot be had.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"]
DEFAULT_SUITE = "bookworm-backports"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MULTIARCH = "x86_64-linux-gnu"


class FetchError(Exception):
    """Anything that stops us; reported as one line."""


@dataclass
class Qemu:
    version: str          # Debian version of qemu-system-x86, e.g. 1:10.0.2+ds-2+deb13u1~bpo12+1
    root: Path            # the dpkg -x tree
    binary: Path          # root/usr/bin/qemu-system-x86_64 (needs env + -L below)
    wrapper: Path         # a script that sets all of it up: use it like qemu-system-x86_64
    env: dict[str, str] = field(default_factory=dict)    # QEMU_MODULE_DIR [, LD_LIBRARY_PATH]
    args: list[str] = field(default_factory=list)        # -L DIR ... (firmware search path)
    extra_packages: list[str] = field(default_factory=list)  # libraries fetched besides PACKAGES


def log(msg: str) -> None:
    print(f"[fetch-qemu10] {msg}", file=sys.stderr, flush=True)


def default_cache() -> Path:
    base = os.environ.get("XWAMP_VM_CACHE") or str(Path(__file__).resolve().parent / ".cache" / "vm")
    return Path(base) / "qemu10"


# ---------------------------------------------------------------- private apt
def host_mirror() -> str:
    """The Debian mirror the system's own apt sources use (not -security), else deb.debian.org."""
    texts: list[str] = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(p.read_text())
        except OSError:
            continue
    for text in texts:
        # deb822 stanzas: URIs + Suites fields
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites and re.search(r"\bbookworm\b(?!-security)", suites.group(1)) \
                    and "security" not in uris.group(1):
                return uris.group(1).rstrip("/")
        # one-line format: deb [opts] URI SUITE COMPONENTS
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(bookworm)\s", line)
            if m and "security" not in m.group(1):
                return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists and archive cache under DIR."""

    def __init__(self, d: Path, suite: str):
        self.d = d
        self.suite = suite
        for sub in ("lists/partial", "cache/archives/partial"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        mirror = host_mirror()
        signed = f"[signed-by={KEYRING}] " if Path(KEYRING).exists() else ""
        base = suite.split("-")[0]  # the base release: libraries missing on the host come from it
        lines = [f"deb {signed}{mirror} {suite} main"]
        if base != suite:
            lines.append(f"deb {signed}{mirror} {base} main")
        (d / "sources.list").write_text("\n".join(lines) + "\n")
        self.opts = [
            "-o", f"Dir::Etc::sourcelist={d / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={d / 'lists'}",
            "-o", f"Dir::Cache={d / 'cache'}",
            "-o", "APT::Sandbox::User=root",  # _apt cannot write into our cache dir
        ]

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        r = subprocess.run([tool, *self.opts, *args], cwd=cwd, text=True, capture_output=True, check=False)
        if r.returncode:
            err = " ".join((r.stderr.strip().splitlines() or ["?"])[-1:])
            raise FetchError(f"{tool} {' '.join(args)} failed: {err}")
        return r.stdout

    def update(self) -> None:
        self._run("apt-get", "-q", "update")

    def versions(self, pkg: str) -> list[tuple[str, str]]:
        """[(version, 'suite/component')] known to the private lists, newest first."""
        out = self._run("apt-cache", "madison", pkg)
        res = []
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 3 and parts[0] == pkg:
                res.append((parts[1], parts[2].split()[1] if len(parts[2].split()) > 1 else ""))
        return res

    def download(self, specs: list[str], dest: Path) -> None:
        self._run("apt-get", "-q", "download", *specs, cwd=dest)


# ---------------------------------------------------------------- dependencies
def version_ok(have: str, op: str | None, want: str | None) -> bool:
    if not op:
        return True
    dpkg_op = {">=": "ge", "<=": "le", ">>": "gt", "<<": "lt", "=": "eq"}[op]
    return subprocess.run(["dpkg", "--compare-versions", have, dpkg_op, want], check=False).returncode == 0


def host_version(pkg: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}|${Version}", pkg],
                       text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False)
    if r.returncode or not r.stdout.startswith("ii"):
        return None
    return r.stdout.split("|", 1)[1]


def parse_depends(field_text: str) -> list[list[tuple[str, str | None, str | None]]]:
    """'a (>= 1) | b, c' -> [[(a,'>=','1'), (b,None,None)], [(c,None,None)]]"""
    groups = []
    for grp in filter(None, (g.strip() for g in field_text.split(","))):
        alts = []
        for alt in grp.split("|"):
            m = re.match(r"\s*([^\s(:]+)(?::\S+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?", alt)
            if m:
                alts.append((m.group(1), m.group(2), m.group(3)))
        groups.append(alts)
    return groups


def missing_libraries(debs: list[Path], known: set[str]) -> list[tuple[str, str | None, str | None]]:
    """Shared-library Depends of the unpacked debs that the host does not satisfy.

    Only lib* packages are considered: the rest (ipxe-qemu, the qemu-* siblings,
    seabios) is either fetched on purpose or not needed for a -kernel boot.
    """
    need = []
    for deb in debs:
        dep = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], text=True,
                             stdout=subprocess.PIPE, check=True).stdout
        for alts in parse_depends(dep):
            if not alts[0][0].startswith("lib") or any(a[0] in known for a in alts):
                continue
            if any((hv := host_version(n)) and version_ok(hv, op, v) for n, op, v in alts):
                continue
            need.append(alts[0])
    return need


# ---------------------------------------------------------------- the fetch
def _key(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def _load(vdir: Path) -> Qemu:
    meta = json.loads((vdir / ".ready").read_text())
    return Qemu(version=meta["version"], root=Path(meta["root"]), binary=Path(meta["binary"]),
                wrapper=Path(meta["wrapper"]), env=meta["env"], args=meta["args"],
                extra_packages=meta.get("extra_packages", []))


def _unpack(apt: PrivateApt, version: str, vdir: Path) -> Qemu:
    tmp = vdir.with_name(vdir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    debs_dir, root = tmp / "debs", tmp / "root"
    debs_dir.mkdir(parents=True)
    # qemu-system-* must all carry exactly this version; seabios the suite's newest.
    specs = [f"{p}={version}" if p.startswith("qemu-") else f"{p}/{apt.suite}" for p in PACKAGES]
    log(f"downloading {' '.join(specs)}")
    apt.download(specs, debs_dir)
    debs = sorted(debs_dir.glob("*.deb"))
    extra: list[str] = []
    # Libraries the host lacks (or has too old), resolved two levels deep: enough
    # for QEMU's direct needs and what those newer libraries pull in.
    for _ in range(2):
        need = missing_libraries(debs, set(PACKAGES) | {e.split("=")[0] for e in extra})
        if not need:
            break
        wants: dict[str, list[tuple[str | None, str | None]]] = {}
        for name, op, want in need:  # several debs may constrain one library
            wants.setdefault(name, []).append((op, want))
        new = []
        for name, cons in wants.items():
            # Like apt's candidate: the base release (priority 500) before -backports (100).
            ok = sorted(((s_.startswith(apt.suite + "/"), v) for v, s_ in apt.versions(name)
                         if all(version_ok(v, op, want) for op, want in cons)), key=lambda x: x[0])
            if not ok:
                raise FetchError(f"dependency {name} {cons} is not available")
            new.append(f"{name}={ok[0][1]}")
        log(f"host lacks libraries, fetching {' '.join(new)}")
        before = set(debs_dir.glob("*.deb"))
        apt.download(new, debs_dir)
        debs = sorted(set(debs_dir.glob("*.deb")) - before)
        extra += new
    for deb in sorted(debs_dir.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    shutil.rmtree(debs_dir)

    final_root = vdir / "root"  # paths below are where the tree lives after the rename
    env = {"QEMU_MODULE_DIR": str(final_root / "usr/lib" / MULTIARCH / "qemu")}
    libdirs = [d for d in (f"usr/lib/{MULTIARCH}", f"lib/{MULTIARCH}") if extra and (root / d).is_dir()]
    if libdirs:
        env["LD_LIBRARY_PATH"] = ":".join(str(final_root / d) for d in libdirs)
    # Our own ROM and BIOS directories first; QEMU still falls back to its built-in
    # (host) firmware path afterwards, which is harmless.
    args = ["-L", str(final_root / "usr/share/qemu"), "-L", str(final_root / "usr/share/seabios")]
    binary = final_root / "usr/bin/qemu-system-x86_64"

    # Every shared library must resolve (checked in the temporary tree).
    chk_env = dict(os.environ)
    if libdirs:
        chk_env["LD_LIBRARY_PATH"] = ":".join(str(root / d) for d in libdirs)
    ldd = subprocess.run(["ldd", str(root / "usr/bin/qemu-system-x86_64")], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=chk_env, check=False).stdout
    missing = sorted({ln.split()[0] for ln in ldd.splitlines() if "not found" in ln})
    if missing:
        raise FetchError(f"qemu-system-x86_64 {version} lacks shared libraries: {' '.join(missing)}")

    wrapper = vdir / "qemu-system-x86_64"
    (tmp / wrapper.name).write_text(
        "#!/bin/sh\n"
        f"# Generated by fetch_qemu10.py: QEMU {version} unpacked from Debian {apt.suite}.\n"
        "# Its modules and ROMs, not the host's QEMU 7.2 ones.\n"
        + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        + f"exec {shlex.quote(str(binary))} {shlex.join(args)} \"$@\"\n")
    (tmp / wrapper.name).chmod(0o755)
    q = Qemu(version=version, root=final_root, binary=binary, wrapper=wrapper, env=env, args=args,
             extra_packages=extra)
    meta = {**q.__dict__, "root": str(q.root), "binary": str(q.binary), "wrapper": str(q.wrapper)}
    (tmp / ".ready").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(vdir, ignore_errors=True)
    tmp.rename(vdir)
    # Smoke test: the binary starts, is the version we asked for, and has igb.
    out = subprocess.run([str(wrapper), "--version"], text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, check=False).stdout
    # NB not "-device help": that loads every module, and those we do not fetch
    # (opengl, spice, block-extra ...) fall back to the host 7.2's, which aborts QEMU.
    devs = subprocess.run([str(wrapper), "-device", "igb,help"], text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, check=False).stdout
    if "QEMU emulator version 10." not in out or not devs.startswith("igb options:"):
        shutil.rmtree(vdir, ignore_errors=True)
        raise FetchError(f"unpacked QEMU does not run or lacks igb: {out.strip().splitlines()[:1]}")
    return q


def ensure(cache: Path | None = None, refresh: bool = False, suite: str = DEFAULT_SUITE) -> Qemu:
    """Return a ready QEMU 10, fetching it only when no unpacked one is cached (or refresh)."""
    cache = (cache or default_cache()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        current = cache / "current"
        if not refresh and (current / ".ready").exists():
            return _load(current.resolve())
        apt = PrivateApt(cache / "apt", suite)
        log(f"apt-get update ({suite}, private lists in {apt.d})")
        apt.update()
        cands = [v for v, s in apt.versions("qemu-system-x86") if s.startswith(suite + "/")]
        cands = [v for v in cands if re.match(r"(\d+:)?(\d+)\.", v) and
                 int(re.match(r"(\d+:)?(\d+)\.", v).group(2)) >= 10]
        if not cands:
            raise FetchError(f"qemu-system-x86 >= 10 not found in {suite} at {host_mirror()}")
        version = cands[0]
        vdir = cache / _key(version)
        q = _load(vdir) if (vdir / ".ready").exists() else _unpack(apt, version, vdir)
        tmp_link = cache / "current.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(vdir.name)
        tmp_link.replace(current)
        # Prune the archive cache: the unpacked tree is what we keep.
        for deb in (apt.d / "cache" / "archives").glob("*.deb"):
            deb.unlink()
        return q


GUEST_TOOLS = ("linuxptp", "ethtool")  # phc2sys/phc_ctl/ptp4l, ethtool -T: for the hwstamp tests' guest


def ensure_guest_tools(cache: Path, suite: str = "bookworm") -> Path:
    """linuxptp and ethtool unpacked (dpkg -x, nothing installed) under CACHE/root; returns
    the root (binaries in root/usr/sbin). Cached: fetched once, like QEMU."""
    cache = cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / "root"
    with open(cache / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if (root / ".ready").exists():
            return root
        apt = PrivateApt(cache / "apt", suite)
        log(f"apt-get update ({suite}) for guest tools {', '.join(GUEST_TOOLS)}")
        apt.update()
        debs = cache / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        debs.mkdir()
        apt.download(list(GUEST_TOOLS), debs)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        for deb in sorted(debs.glob("*.deb")):
            r = subprocess.run(["dpkg", "-x", str(deb), str(root)], capture_output=True, text=True, check=False)
            if r.returncode:
                raise FetchError(f"dpkg -x {deb.name}: {r.stderr.strip()}")
        shutil.rmtree(debs, ignore_errors=True)
        (root / ".ready").write_text(" ".join(GUEST_TOOLS) + "\n")
        return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache directory (default $XWAMP_VM_CACHE/qemu10 or ./.cache/vm/qemu10)")
    ap.add_argument("--refresh", action="store_true", help="re-run apt-get update, fetch a newer version")
    ap.add_argument("--suite", default=DEFAULT_SUITE)
    ap.add_argument("--print", dest="what", choices=("wrapper", "env", "json"), default="wrapper")
    a = ap.parse_args()
    t0 = time.monotonic()
    try:
        q = ensure(a.cache, a.refresh, a.suite)
    except FetchError as e:
        print(f"fetch_qemu10: error: {e}", file=sys.stderr)
        return 1
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"fetch_qemu10: error: {e}", file=sys.stderr)
        return 1
    log(f"QEMU {q.version} ready in {time.monotonic() - t0:.1f} s")
    if a.what == "wrapper":
        print(q.wrapper)
    elif a.what == "env":
        for k, v in q.env.items():
            print(f"export {k}={shlex.quote(v)}")
        print(f"QEMU={shlex.quote(str(q.binary))}")
        print(f"QEMU_ARGS=({shlex.join(q.args)})  # bash array: \"$QEMU\" \"${{QEMU_ARGS[@]}}\" ...")
    else:
        print(json.dumps({**q.__dict__, "root": str(q.root), "binary": str(q.binary),
                          "wrapper": str(q.wrapper)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
