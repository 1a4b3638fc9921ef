"""Healthy short connections folded in the kernel (bpf/aggregate.c) give the same report as
every record sent one by one: three tracers at once on one storm (bench/storm.py: connects
that close at once, half-closes, refused connects, in a namespace of its own), `report --json`
folding, `report --json --full-stream`, and `watch --only refused,...`. Counts must be equal,
exactly, to each other and to the storm's /proc/net/snmp deltas, and times close (see below
for why not equal)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.kernel
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORTS = [20000, 20001, 20002, 20010, 20011, 20012]      # bench/storm.py's, 2 workers x 3 dests
FEW = 20       # connections to a destination below which its median is one connection's time


def start(tmp_path, name, args):
    ready = tmp_path / f"{name}.ready"
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    p = subprocess.Popen([sys.executable, "-m", "tcptrace"] + args +
                         ["--ready-file", str(ready)] +
                         [a for port in PORTS for a in ("--port", str(port))],
                         cwd=ROOT, stdout=open(out, "w"), stderr=open(err, "w"))
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert p.poll() is None, err.read_text()
        assert time.monotonic() < deadline, "tracer never became ready"
        time.sleep(0.05)       # polling the file the tracer writes: the readiness signal itself
    return p, out, err


def stop(p, err):
    p.send_signal(signal.SIGINT)
    assert p.wait(120) == 0, err.read_text()
    assert "Traceback" not in err.read_text()


def folded_count(err):
    text = err.read_text()
    for part in text.replace("\n", ", ").split(", "):
        if "healthy sockets folded" in part:
            return int(part.split()[0])
    return 0


def test_folded_report_equals_the_full_stream_and_the_kernels_counts(tmp_path, pace):
    fold = start(tmp_path, "fold", ["report", "--json"])
    full = start(tmp_path, "full", ["report", "--json", "--full-stream"])
    only = start(tmp_path, "only", ["watch", "--json", "--only", "refused,failed,reset,stuck"])
    rate = max(200, min(1000, int(0.2 / pace.per_conn_s)))     # a fifth of what this host keeps
    try:
        storm = json.loads(subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "storm.py"), "--rate", str(rate),
             "--duration", "2", "--workers", "2", "--dests", "3"], capture_output=True,
            text=True, check=True).stdout)
    finally:
        for p, _, err in (fold, full, only):
            stop(p, err)
    snmp = storm["snmp"]
    a = json.loads(fold[1].read_text())
    b = json.loads(full[1].read_text())
    assert snmp["PassiveOpens"] > 200 and snmp["AttemptFails"] > 0

    # sockets were folded (a healthy connection is two), and the full stream's tracer folded
    # none. Only a life shorter than half the hold time folds (bpf/aggregate.c): on a host
    # most do; in the emulated guest about half the storm's sockets live longer (306 folded
    # of 326 connections' 652 sockets, seen), so the bar is a quarter.
    n_folded = folded_count(fold[2])
    assert n_folded >= snmp["PassiveOpens"] // 2, fold[2].read_text()
    assert folded_count(full[2]) == 0
    # counts: equal to each other and to the kernel's
    assert a["counts"].get("connect") == b["counts"].get("connect") \
        == snmp["ActiveOpens"] - snmp["AttemptFails"]
    assert a["counts"].get("accept") == b["counts"].get("accept") == snmp["PassiveOpens"]
    assert a["counts"].get("refused") == b["counts"].get("refused") == snmp["AttemptFails"]
    assert a["counts"].get("close") == b["counts"].get("close")
    same = lambda v: sorted(json.dumps(x, sort_keys=True) for x in v) \
        if isinstance(v, list) else v           # rows of equal counts come in any order
    for k in ("closes", "accepts", "failures", "resets"):
        assert same(a[k]) == same(b[k]), k
    # TIME_WAIT -> CLOSE: the storm's namespace died with it, and a dump said so for the
    # sockets the full stream knew one by one; folded ones leave by the 60 s rule
    steps = lambda s: {(t["old"], t["new"]): t["count"] for t in s["transitions"]
                       if (t["old"], t["new"]) != ("TIME_WAIT", "CLOSE")}
    assert steps(a) == steps(b)
    # TIME_WAIT rows with entries: the connections', which both see whole. A row without
    # entries is only what a dump of the sampler happened to find (each tracer dumps at its
    # own moments: in the 6.1 VM the full stream's caught a passing 127.0.0.1 destination that
    # the other's never did)
    tw = lambda s: sorted((r["side"], r["addr"], r["port"], r["entries"]) for r in s["time_wait"]
                          if r["entries"])
    assert tw(a) == tw(b) and tw(a)
    # per destination: counts exact; times close. Each tracer's programs stamp a hit with
    # their own clock reading, after the programs attached before them ran, so the same
    # handshake measures a few microseconds apart in two tracers (up to 15% of a 25 us
    # loopback handshake here): that, not the histogram (within 4.5%: test_histogram_kernel.py
    # and tests/unit/test_histogram.py), bounds the difference. And the connect() that makes
    # the SYN_SENT step runs in process context: it can be preempted between the folding
    # tracer's program (attached first) and the other's, for up to a scheduler slice, and that
    # connection's handshake is then longer by as much for the folding tracer (seen: a 125 us
    # handshake measured 257 us, on a 2-CPU host while the tracers drained). The ESTABLISHED
    # step's two programs can be as far apart the other way: in a VM the host can stop the
    # vCPU between them (seen in the TCG guest: 456 us for the folding tracer, 1,184 us for
    # the other). A tail value is one connection's when a destination has few, so it gets
    # that allowance either way; so does the median of a destination with few connections
    # (seen in the TCG guest: 450 us folding, 707 us the other, for a destination with 7).
    rows = {(r["raddr"], r["rport"], r["comm"]): r for r in b["connects"]}
    assert len(a["connects"]) == len(rows)
    assert any(r["count"] >= FEW for r in a["connects"])    # some medians are checked strictly
    hist = {h["low"]: h["count"] for h in b["handshake_histogram_us"]}
    slice_ns = 5_000_000
    for r in a["connects"]:
        e = rows[(r["raddr"], r["rport"], r["comm"])]
        assert r["count"] == e["count"]
        few = ("p50_ns",) if r["count"] < FEW else ()
        if not few:
            assert e["p50_ns"] / 1.5 <= r["p50_ns"] <= e["p50_ns"] * 1.5, (r, e)
        for p in few + ("p90_ns", "p99_ns", "max_ns"):
            assert e[p] / 1.5 - slice_ns <= r[p] <= e[p] * 1.5 + slice_ns, (p, r, e)
    assert sum(h["count"] for h in a["handshake_histogram_us"]) == sum(hist.values())
    # watch --only: exactly the refused connects, folding the rest
    lines = [json.loads(line) for line in only[1].read_text().splitlines()]
    assert sorted({r["type"] for r in lines}) == ["refused"]
    assert len(lines) == snmp["AttemptFails"]
    # Each tracer's programs decide to fold on their own clock readings (bpf/aggregate.c: a
    # life shorter than half the hold time, no early copy sent), so a socket whose life is
    # at that edge can be folded by one and sent by the other (in the TCG VM: 692 and 693 of
    # about 700). Both fold nearly all; the reports' exact counts above show nothing was lost.
    n_only = folded_count(only[2])
    assert n_only >= snmp["PassiveOpens"], only[2].read_text()
    assert abs(n_only - n_folded) <= max(2, n_folded // 100), (n_only, n_folded)
