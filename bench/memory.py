#!/usr/bin/env python3
"""tcptrace's memory: RSS while it tracks 100k simultaneously open loopback connections, and RSS
drift over a long storm.

    sudo .venv/bin/python bench/memory.py --conns 100000   # open, hold, measure, close
    sudo .venv/bin/python bench/memory.py --soak 30     # 30 min at 5k conn/s, RSS every 10 s

Open connections: a holder process enters a fresh network namespace (as bench/storm.py does) and
forks one child per ~9,900 connections, because the per-process descriptor limit may not be
raisable (a container's root can lack CAP_SYS_RESOURCE; here the hard limit is 20,000) and each
connection costs two descriptors (client and accepted end). Child i listens on its own port and
connects to 127.O.i.D (O a random octet as in storm.py, D = 1..--dests) from 127.0.0.1, so no
(address, port) pair needs more than a few thousand ephemeral ports and 100k tuples fit easily.
Connections are opened at --open-rate so the tracer keeps up (a lost transition would mean a
connection it does not track). Both ends of each connection are sockets the tracer tracks: 100k
connections are 200k tracked sockets (below tcptrace's default --max-conns of 262,144).

Reported: tcptrace RSS (VmRSS, and VmHWM, the peak) at readiness, with every connection open and
the tracer caught up, and after closing them all; the tracer's own event/loss summary; and how many
connect/accept findings with a storm address it printed (each open connection should give one of
each).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import storm     # noqa: E402
import tracers   # noqa: E402

PER_CHILD = 9_900
BASE_PORT = 30000


def _hold_child(i, n, rate, dests, octet, ready_w, go_close_r):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", BASE_PORT + i))
    l.listen(65535)
    fds = []
    errors = 0
    t0 = time.monotonic()
    for k in range(n):
        if rate:
            wait = t0 + k / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        s = socket.socket()
        try:
            s.connect((f"127.{octet}.{i}.{k % dests + 1}", BASE_PORT + i))
        except OSError:
            errors += 1
            s.close()
            continue
        fds.append(s.detach())
        cfd, _ = l._accept()
        fds.append(cfd)
    os.write(ready_w, (json.dumps({"child": i, "open": len(fds) // 2, "errors": errors}) + "\n")
             .encode())
    os.read(go_close_r, 1)
    for fd in fds:
        os.close(fd)
    l.close()


def hold(total, rate, dests, octet):
    """Runs in its own process: open `total` connections, print one JSON line, hold them until
    stdin closes, close them all, print a second line."""
    storm.enter_fresh_netns()
    nchild = (total + PER_CHILD - 1) // PER_CHILD
    ready_r, ready_w = os.pipe()
    close_r, close_w = os.pipe()
    pids = []
    for i in range(nchild):
        n = min(PER_CHILD, total - i * PER_CHILD)
        def child(i=i, n=n):
            os.close(ready_r)
            os.close(close_w)
            storm.raise_nofile(2 * PER_CHILD + 100)
            _hold_child(i, n, rate / nchild if rate else 0, dests, octet, ready_w, close_r)
        pids.append(storm.fork_child(child))
    os.close(ready_w)
    os.close(close_r)
    t0 = time.monotonic()
    got, buf = [], b""
    while len(got) < nchild:
        chunk = os.read(ready_r, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        got += [json.loads(l) for l in lines if l.strip()]
    est = 0
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                est = int(line.split()[2])
    print(json.dumps({"open": sum(g["open"] for g in got), "errors": sum(g["errors"] for g in got),
                      "children": nchild, "open_s": round(time.monotonic() - t0, 2),
                      "sockstat_inuse": est}), flush=True)
    sys.stdin.read()                      # the parent closes our stdin when it has measured
    os.write(close_w, b"c" * nchild)
    for pid in pids:
        os.waitpid(pid, 0)
    print(json.dumps({"closed": True}), flush=True)


def sample(tr):
    r = tracers.rss_kb(tr.pid)
    return {"t": round(time.monotonic(), 2), "rss_mb": round(r["VmRSS"] / 1024, 1),
            "hwm_mb": round(r["VmHWM"] / 1024, 1), "cpu_s": round(tr.cpu(), 2)}


def open_conns(a):
    tr = tracers.Tcptrace()
    tr.start()
    octet = storm.pick_octet()
    marker = f"127.{octet}."
    out = {"marker": marker, "conns_target": a.conns, "open_rate": a.open_rate,
           "at_ready": sample(tr)}
    holder = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hold", str(a.conns),
                               "--open-rate", str(a.open_rate), "--dests", str(a.dests),
                               "--octet", str(octet)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=tracers.clean_env())
    try:
        out["holder"] = json.loads(holder.stdout.readline())
        out["settle_s"] = round(tr.settle(limit=120, quiet=1.0), 1)
        samples = []
        for _ in range(a.hold_samples):
            samples.append(sample(tr))
            time.sleep(2)
        out["all_open"] = samples
        holder.stdin.close()
        holder.stdout.readline()
        holder.wait(120)
        tr.settle(limit=120)
        out["after_close"] = sample(tr)
    finally:
        if holder.poll() is None:
            holder.kill()
        tr.stop()
    counts = tr.count(marker)
    n_connect = n_accept = 0
    m = marker.encode()
    for buf in tracers._lines(tr.out_path):
        for line in buf.split(b"\n"):
            if m in line:
                if b'"type":"connect"' in line:
                    n_connect += 1
                elif b'"type":"accept"' in line:
                    n_accept += 1
    out["tracer"] = {"summary": counts["summary"], "lost_where": counts["lost_where"],
                     "stderr_tail": tr.stderr().strip().splitlines()[-2:],
                     "connect_findings": n_connect, "accept_findings": n_accept}
    peak = max(s["rss_mb"] for s in out["all_open"])
    out["rss_mb_all_open"] = peak
    out["rss_mb_growth"] = round(peak - out["at_ready"]["rss_mb"], 1)
    out["bytes_per_tracked_socket"] = round(
        (peak - out["at_ready"]["rss_mb"]) * 1024 * 1024 / max(1, 2 * out["holder"]["open"]))
    out["target_mb"] = 200
    out["meets_target"] = peak < 200
    tr.cleanup()
    return out


def soak(a):
    tr = tracers.Tcptrace(extra=a.tcptrace_arg)
    tr.discard_output = True          # minutes of JSON Lines: nothing to count, keep tmpfs free
    tr.start()
    dur = a.soak * 60
    st = subprocess.Popen([sys.executable, os.path.join(HERE, "storm.py"), "--rate",
                           str(a.rate), "--duration", str(dur)], stdout=subprocess.PIPE,
                          text=True, env=tracers.clean_env())
    samples = [sample(tr)]
    t0 = time.monotonic()
    try:
        while st.poll() is None:
            time.sleep(min(10, max(0.1, t0 + 10 * len(samples) - time.monotonic())))
            samples.append(sample(tr))
        storm_res = json.loads(st.stdout.read())
        tr.settle(limit=120)
        samples.append(sample(tr))
    finally:
        if st.poll() is None:
            st.kill()
        tr.stop()
    summary = tracers._with_summary({"seen": 0, "lost_where": {}}, tr.stderr())
    stderr_tail = tr.stderr().strip().splitlines()[-2:]     # the summary: lost, evicted, late
    t_first = samples[0]["t"]
    for s in samples:
        s["t"] = round(s["t"] - t_first, 1)
    xs = [s["t"] / 60 for s in samples]
    ys = [s["rss_mb"] for s in samples]
    half = len(xs) // 2
    slope = None
    if len(xs) - half >= 2:
        # Drift: the least-squares slope over the second half, after warm-up (dicts and the
        # allocator reach their working size in the first minutes).
        x2, y2 = xs[half:], ys[half:]
        mx, my = sum(x2) / len(x2), sum(y2) / len(y2)
        den = sum((x - mx) ** 2 for x in x2)
        slope = round(sum((x - mx) * (y - my) for x, y in zip(x2, y2)) / den, 3) if den else None
    tr.cleanup()
    return {"soak_minutes": a.soak, "rate": a.rate, "storm": storm_res, "samples": samples,
            "rss_mb_first": ys[0], "rss_mb_max": max(ys), "rss_mb_last": ys[-1],
            "drift_mb_per_min_second_half": slope, "tracer": summary["summary"],
            "tracer_stderr_tail": stderr_tail}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=100_000, help="connections to hold open")
    ap.add_argument("--open-rate", type=float, default=5000,
                    help="connections/s while opening (0 = as fast as possible)")
    ap.add_argument("--dests", type=int, default=8)
    ap.add_argument("--hold-samples", type=int, default=5, help="RSS samples, 2 s apart")
    ap.add_argument("--soak", type=float, metavar="MINUTES",
                    help="instead: a storm at --rate for MINUTES, RSS sampled every 10 s")
    ap.add_argument("--rate", type=float, default=5000, help="--soak storm rate")
    ap.add_argument("--tcptrace-arg", action="append", default=[],
                    help="extra tcptrace argument for --soak (repeatable)")
    ap.add_argument("--commit", default="HEAD",
                    help="tcptrace commit to measure (as in run.py); 'worktree' = the checkout")
    ap.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--octet", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help="result file (default bench/results/memory-<UTC>.json)")
    a = ap.parse_args()
    if a.hold:
        hold(a.hold, a.open_rate, a.dests, a.octet)
        return
    if os.geteuid() != 0:
        sys.exit("memory.py needs root")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tree = None
    commit = tracers.git_describe() if a.commit == "worktree" else None
    if commit is None:
        commit, tree = tracers.export_commit(a.commit)
        tracers.Tcptrace.tree = tree
    try:
        res = soak(a) if a.soak else open_conns(a)
    finally:
        if tree:
            shutil.rmtree(tree, ignore_errors=True)
    res["tcptrace_commit"] = commit
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = a.out or os.path.join(HERE, "results",
                                 f"{'soak' if a.soak else 'memory'}-{stamp}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
