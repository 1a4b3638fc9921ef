#!/usr/bin/env python3
"""What one reading of the listen sampler (tcptrace/host/samplers.py: Listeners) costs, with
many sockets on the host, against the other ways to read the same tables.

    sudo .venv/bin/python bench/sampler.py --sockets 30000 --repeat 20

In a fresh network namespace it opens a listener and --sockets/2 loopback connections (both
ends in the namespace, so --sockets sockets, all ESTABLISHED), then times, --repeat times each:
  sampler      Listeners.sample(), a reading of every namespace with a listener, where nothing
               moves: the namespace walk, per namespace its TcpExt counters and a LISTEN dump,
               and at every tenth reading a SYN_RECV dump filtered by port in the kernel and
               the settings (the owners are looked up once)
  listen dump  one namespace's LISTEN dump
  listen+request dumps  and its SYN_RECV dump
  proc         reading /proc/<pid>/net/tcp and tcp6 whole (what owners.py does to seed)
  ss           `ss -tanH state syn-recv` (a process per reading)
  new listener a reading that walks the namespaces again and looks a listener's owner up
  new listener, loop busy   the same while another thread runs Python flat out
               (the tracer's poll loop in a storm), at Python's default switch interval and at
               the one a live run sets: the reading's many short system calls each give up the
               GIL and wait for it (tcptrace/kernel/live.py, SWITCH_INTERVAL_S)
and the same again with no connections open, so the growth is what the sockets cost. The
sockets live in the sampled namespace: the kernel walks its whole socket hash (every
namespace's sockets) for a SYN_RECV dump and skips the others', so this is the worst case.
Prints a table and writes JSON to bench/results/sampler-<UTC time>.json.
"""
import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import tracers  # noqa: E402

from tcptrace.host import samplers  # noqa: E402
from tcptrace.host.diag import Diag  # noqa: E402
from tcptrace.host.samplers import _dumps  # noqa: E402
from tcptrace.kernel.live import SWITCH_INTERVAL_S  # noqa: E402

DEFAULT_SWITCH_S = 0.005        # Python's

CLONE_NEWNET = 0x40000000


def fresh_netns():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit("unshare(CLONE_NEWNET) failed: run as root")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def connections(n, per_process=8000):
    """n loopback connections (2n sockets), both ends held open by child processes of up to
    `per_process` sockets each (a process may hold only so many descriptors here: 20,000 on
    the development guest, and root cannot raise it). Returns their pids."""
    pids = []
    done = 0
    while done < n:
        k = min(per_process // 2, n - done)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_NOFILE, (2 * k + 64, 2 * k + 64))
            lsn = socket.socket()
            lsn.bind(("127.0.0.1", 0))
            lsn.listen(4096)
            port = lsn.getsockname()[1]
            keep = []
            for _ in range(k):
                c = socket.create_connection(("127.0.0.1", port))
                a, _ = lsn.accept()
                keep += [c, a]
            lsn.close()
            os.write(w, b"x")
            time.sleep(3600)
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.close(r)
        pids.append(pid)
        done += k
    return pids


def timed(fn, repeat):
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return {"mean_ms": round(statistics.mean(out), 3),
            "median_ms": round(statistics.median(out), 3), "max_ms": round(max(out), 3)}


def new_listener(s):
    """A reading that finds a listener it has not seen (as in a storm's first second): the
    namespaces walked again and the owner looked up."""
    s._owners.clear()
    s.namespaces._at = None
    s.sample(time.monotonic_ns())


def busy(fn, repeat, interval_s):
    """timed(fn) while another thread keeps the GIL busy, with this switch interval."""
    stop = threading.Event()

    def burn():
        while not stop.is_set():
            sum(range(1000))
    was = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    t = threading.Thread(target=burn, daemon=True)
    t.start()
    try:
        return timed(fn, repeat)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(was)


def measure(repeat):
    s = samplers.Listeners()
    s.sample(time.monotonic_ns())          # owners and settings read once, as in a run
    d = Diag()
    ways = {
        # a reading a second, as in a run where nothing moves: request socks are counted at
        # every refresh_every-th (10th) reading only, so the mean is what a second costs
        "sampler": lambda: s.sample(time.monotonic_ns()),
        "new listener": lambda: new_listener(s),
        "listen dump": lambda: _dumps(d, s.families, (), False),
        "listen+request dumps": lambda: _dumps(d, s.families, (), True),
        "proc": lambda: [open(f"/proc/self/net/{n}").read() for n in ("tcp", "tcp6")],
        "ss": lambda: subprocess.run(["ss", "-tanH", "state", "syn-recv"],
                                     capture_output=True, check=True),
    }
    try:
        got = {k: timed(fn, repeat) for k, fn in ways.items()}
        # the tracer's poll loop busy on another thread (a storm), at Python's default switch
        # interval and at the one a live run sets (tcptrace/kernel/live.py)
        for iv in (DEFAULT_SWITCH_S, SWITCH_INTERVAL_S):
            got[f"new listener, loop busy, {iv * 1e3:g} ms switch"] = \
                busy(lambda: new_listener(s), min(repeat, 5), iv)
        return got
    finally:
        d.close()
        s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sockets", type=int, default=30000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", help="result file (default bench/results/sampler-<time>.json)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("sampler.py needs root (a network namespace, sock_diag of every namespace)")
    fresh_netns()
    res = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "sockets": a.sockets, "repeat": a.repeat, "cpu": tracers.machine()}
    lsn = socket.socket()       # the listener the sampler reads this namespace for
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(128)
    res["namespaces"] = len(samplers.Listeners().sample(time.monotonic_ns()))
    res["empty"] = measure(a.repeat)
    pids = connections(a.sockets // 2)
    try:
        with open("/proc/self/net/sockstat") as f:
            res["sockstat"] = next(l.strip() for l in f if l.startswith("TCP:"))
        res["full"] = measure(a.repeat)
    finally:
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    rows = [(k, res["empty"][k]["mean_ms"], res["full"][k]["mean_ms"],
             res["full"][k]["median_ms"], res["full"][k]["max_ms"]) for k in res["full"]]
    from tabulate import tabulate
    print(tabulate(rows, headers=["one reading, of", "mean ms (no sockets)",
                                  f"mean ms ({a.sockets} sockets)", "median", "max"]))
    print(f"namespaces read by the sampler: {res['namespaces']}")
    out = a.out or os.path.join(HERE, "results", "sampler-" + datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + ".json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
