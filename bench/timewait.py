#!/usr/bin/env python3
"""What the TIME_WAIT sampler costs with many TIME_WAIT sockets: a lab namespace holding N of
them (client-closed connections to two ports of a server namespace, over veth), then the
sampler's sample() on that namespace alone, and on every namespace of the host as the tracer
runs it; against `ss -tan state time-wait` and a raw sock_diag dump of the same sockets.

    sudo .venv/bin/python bench/timewait.py --sockets 30000 --rounds 10     # JSON on stdout

The sockets live 60 s: everything is measured within 50 s of the last close (checked).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "kernel"))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import tracers  # noqa: E402
from lab import SERVER4, Lab, netns_inode, ss_count  # noqa: E402
from tcptrace.host import netns  # noqa: E402
from tcptrace.host.diag import Diag  # noqa: E402
from tcptrace.host.samplers import Namespaces  # noqa: E402
from tcptrace.host.timewait import CONNECTED, TimeWaitSampler  # noqa: E402


class Only:
    def __init__(self, known):
        self.known = known

    def get(self, now_ns=None):
        return self.known


def timed(fn, rounds):
    """(median wall s, median CPU s of this thread) of fn() over rounds calls."""
    wall, cpu = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.thread_time() - c)
    return round(statistics.median(wall), 4), round(statistics.median(cpu), 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    out = {"sockets": a.sockets, "machine": tracers.machine()}   # CPU, kernel, mitigations
    with Lab() as lab:
        srv, cli = lab.agent(lab.server), lab.agent(lab.client)
        half = a.sockets // 2
        t0 = time.monotonic()
        for _ in range(2):            # two ports: 30,000 exceed one destination's 28,232 ports
            lsn = srv.call("listen", addr=SERVER4, backlog=4096)
            srv.send("serve", fd=lsn["fd"], n=half, close_first=False)
            assert cli.call("churn", addr=SERVER4, port=lsn["port"], n=half, close_first=True,
                            timeout=300) == {"done": half}
            assert srv.answer(300) == {"served": half}
        made = time.monotonic()
        out["make_s"] = round(made - t0, 1)
        ino, base = netns_inode(cli.pid), f"/proc/{cli.pid}"
        out["ss_time_wait"] = ss_count(lab.client, "time-wait", "")
        w = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", lab.client, "ss", "-tanH", "state", "time-wait"],
                       capture_output=True, check=True)
        out["ss_s"] = round(time.perf_counter() - w, 4)
        diag = netns.run_in(base, Diag)
        out["raw_dump_tw_s"] = timed(lambda: diag.dump(["TIME_WAIT"]), a.rounds)
        out["raw_dump_connected_s"] = timed(lambda: diag.dump(CONNECTED), a.rounds)
        diag.close()
        one = TimeWaitSampler(Only({ino: base}))
        one.sample(time.monotonic_ns())               # opens the namespace's socket and files
        out["sample_one_namespace_s"] = timed(lambda: one.sample(time.monotonic_ns()),
                                              a.rounds)
        out["dumps_per_sample_one"] = (one.dumps - 1) / a.rounds
        one.close()
        every = TimeWaitSampler(Namespaces())
        every.sample(time.monotonic_ns())
        n_ns = len(every.open)
        d0 = every.dumps
        out["sample_every_namespace_s"] = timed(lambda: every.sample(time.monotonic_ns()),
                                                a.rounds)
        out["namespaces"] = n_ns
        out["dumps_per_sample_every"] = (every.dumps - d0) / a.rounds
        out["period_s_after"] = every.period_ns / 1e9
        every.close()
        out["measured_within_s"] = round(time.monotonic() - made, 1)
        assert out["measured_within_s"] < 50, "sockets may have begun to expire"
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
