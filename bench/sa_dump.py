#!/usr/bin/env python3
"""Dump+decode of N SAs with netlink.client.XfrmClient vs `ip xfrm state list`.

Run as root on a kernel with ESP (the VM):
    tools/vm/run -- /work/main/.venv/bin/python /work/main/bench/sa_dump.py [--sizes 1000,10000,50000]

For each size: a throwaway netns, N ESP SAs installed with one `ip -batch`,
then, alternating, `ip -n NS xfrm state list > /dev/null` and
XfrmClient(NS).dump_sas() (best of --repeat wall times each), the ratio, once
more the dump with every SA's algorithms read ("+keys", as a ratio to ip: the decoder leaves
them undecoded until first read, and ip prints them all), and
the peak Python memory of one dump (tracemalloc, separate run: it slows
Python down) plus the process's max RSS. Optionally pyroute2's generic
decoder through netlink.xfrm.XfrmSocket, for scale. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sas import bystander_lines, ip_batch  # noqa: E402
from netlink.client import XfrmClient  # noqa: E402


def install(ns: str, n: int) -> float:
    return ip_batch(ns, bystander_lines(n))


def time_ip(ns: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["ip", "-n", ns, "xfrm", "state", "list"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def time_ours(ns: str, n: int, read_keys: bool = False) -> float:
    t0 = time.perf_counter()
    with XfrmClient(ns) as xc:
        sas = xc.dump_sas()
    if read_keys:
        for sa in sas:
            sa.crypt, sa.auth, sa.aead  # noqa: B018  # decoded on first read
    dt = time.perf_counter() - t0
    assert len(sas) == n, (len(sas), n)
    return dt


def peak_ours(ns: str) -> int:
    tracemalloc.start()
    with XfrmClient(ns) as xc:
        sas = xc.dump_sas()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del sas
    return peak


def time_pyroute2(ns: str, n: int) -> float:
    from netlink.xfrm import XfrmSocket

    t0 = time.perf_counter()
    with XfrmSocket(netns=ns) as xs:
        msgs = [m for m in xs.dump_sa() if m["header"]["type"] == 0x10]
        for m in msgs:  # make pyroute2 actually decode what a caller would read
            m.get_attr("XFRMA_ALG_CRYPT")
            m.get_attr("XFRMA_ALG_AUTH_TRUNC")
    dt = time.perf_counter() - t0
    assert len(msgs) == n, (len(msgs), n)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--pyroute2-max", type=int, default=10000, help="largest size also timed with pyroute2's decoder")
    ap.add_argument("--no-tracemalloc", action="store_true")
    a = ap.parse_args()
    print(f"kernel {os.uname().release}, python {sys.version.split()[0]}")
    print(f"{'SAs':>7} {'install':>9} {'ip list':>9} {'xwamp':>9} {'ratio':>6} {'us/SA':>7} {'+keys':>6} {'pyroute2':>9} {'peak MiB':>9} {'B/SA':>6} {'maxrss MiB':>10}")
    for n in (int(x) for x in a.sizes.split(",")):
        ns = f"xwbench{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            t_inst = install(ns, n)
            ip_t, ours_t = [], []
            for _ in range(a.repeat):
                ip_t.append(time_ip(ns))
                ours_t.append(time_ours(ns, n))
            keys_t = time_ours(ns, n, read_keys=True)
            pr = f"{time_pyroute2(ns, n):9.2f}" if n <= a.pyroute2_max else f"{'-':>9}"
            pk = peak_ours(ns) if not a.no_tracemalloc else None
            peak = f"{pk / 2**20:9.1f} {pk / n:6.0f}" if pk is not None else f"{'-':>9} {'-':>6}"
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            ip_b, ours_b = min(ip_t), min(ours_t)
            print(f"{n:7d} {t_inst:8.1f}s {ip_b:8.2f}s {ours_b:8.2f}s {ours_b / ip_b:6.2f} {ours_b / n * 1e6:7.1f} {keys_t / ip_b:6.2f} {pr} {peak} {rss:10.1f}",
                  flush=True)
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
