#!/usr/bin/env python3
"""What a syscall tracepoint costs every process, without any BPF: the untraced loopback storm
(bench/storm.py) flat out, with connect()'s entry and exit tracepoints enabled in a tracefs
instance of our own or not, in alternating rounds.

    sudo .venv/bin/python bench/syscall_tracepoints.py --rounds 8 [--out FILE]

Enabling either tracepoint puts every system call of every process on the kernel's slow path
(the probe is called for each, and filters by syscall number), which is why tcptrace traces
connect()'s entry only where it cannot read the call's arguments at its return
(bpf/connect.c). Prints, per mode, the medians of the storm's rate and CPU per connection and
their ratios to the rounds with nothing enabled; writes every round to FILE as JSON.
"""
import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import run  # noqa: E402
import tracers  # noqa: E402
from tcptrace.kernel.probes import tracefs_dir  # noqa: E402

MODES = {"none": (), "enter": ("sys_enter_connect",), "exit": ("sys_exit_connect",),
         "both": ("sys_enter_connect", "sys_exit_connect")}


def storm(duration):
    """The untraced storm flat out, with run.py's default mix: (conn/s, its CPU us a connection)."""
    d = run.run_storm(0, duration, run.MIX, None)
    return d["achieved_rate"], 1e6 * d["cpu_s"] / d["connections"]


def enable(inst, events, on):
    for e in events:
        with open(os.path.join(inst, "events", "syscalls", e, "enable"), "w") as f:
            f.write("1" if on else "0")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    td = tracefs_dir()
    if td is None:
        raise SystemExit("tracefs is not mounted")
    inst = os.path.join(td, "instances", f"tcptrace-bench-{os.getpid()}")
    os.mkdir(inst)
    runs = []
    order = list(MODES)
    try:
        for r in range(args.rounds):
            for mode in order[r % len(order):] + order[:r % len(order)]:
                enable(inst, MODES[mode], True)
                try:
                    rate, cpu = storm(args.duration)
                finally:
                    enable(inst, MODES[mode], False)
                runs.append({"round": r, "mode": mode, "rate": rate, "cpu_us_per_conn": cpu})
    finally:
        os.rmdir(inst)
    med = {m: (statistics.median(x["rate"] for x in runs if x["mode"] == m),
               statistics.median(x["cpu_us_per_conn"] for x in runs if x["mode"] == m))
           for m in MODES}
    for m, (rate, cpu) in med.items():
        print(f"{m:6} rate {rate:9.0f} ({rate / med['none'][0]:.3f})   storm CPU per connection "
              f"{cpu:6.2f} us ({cpu / med['none'][1]:.3f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": tracers.machine(), "runs": runs,
                       "medians": {m: {"rate": r, "cpu_us_per_conn": c}
                                   for m, (r, c) in med.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
