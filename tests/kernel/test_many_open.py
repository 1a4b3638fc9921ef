"""Issue 17 item 2: with thousands of connections opened at once by several processes, each
connect and accept is reported while the connection is open (its opening is held in the
kernel, bpf/hold.c, and sent early after the hold time), once.

Under a burst the transport can be full when an early copy is due; such a copy was dropped,
and its connection then reported only when it closed (17-40 s late in the issue's run). The
test makes the ring small (TCPTRACE_TEST_RING_PAGES) so that refusals happen for certain, and
checks that every opening still arrives before the close. TCPTRACE_STRESS=1 runs the issue's
scale instead: 100,000 connections from several processes, each finding within 1 s of its event.
"""
import collections
import datetime
import json
import os
import resource
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.kernel
HERE = os.path.dirname(os.path.abspath(__file__))
STRESS = os.environ.get("TCPTRACE_STRESS") == "1"


def _stress_scale(total=100_000):
    """(processes, connections each) for `total` connections: a holder keeps both ends of each
    (2 descriptors), within the hard RLIMIT_NOFILE a process may raise itself to (20,000 where
    CAP_SYS_RESOURCE is not there to raise it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    each = min(25_000, (hard - 100) // 2) if hard != resource.RLIM_INFINITY else 25_000
    procs = -(-total // each)
    return procs, -(-total // procs)


# (processes, connections each, ring pages): a burst the small ring cannot take whole; or the
# issue's 100k with the default ring
SCALE = _stress_scale() + (None,) if STRESS else (3, 2_000, 16)
# Opened at up to 10,000 connections a second in all. Small scale: the burst then lasts
# several hold times (50 ms), so that early copies fall due while it fills the ring, and are
# refused (flat out it could be over before the first was due, with none refused, and nothing
# shown). Stress: 20,000 findings a second, what one core of Python follows with room to
# spare, in 10 s. Flat out the holders open 50,000 a second; the ring buffer then overflows
# within the burst (lost records, counted), which the benchmarks measure (docs/bench.md), and
# is not what this checks: the held openings of 100,000 connections open at once.
RATE = 10_000
PORTS = [31_950 + i for i in range(SCALE[0])]      # clear of the storms' 20000-21000


def wall(rfc3339):
    return datetime.datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def test_every_opening_is_reported_while_open_and_once(tmp_path, request):
    procs, each, pages = SCALE
    # How long to hold them open waiting for their reports: emulated, three tracers alive
    # (this one and the session's) take seconds to follow thousands of connections; the
    # small scale scales with the machine's pace (conftest.py: Pace), the stress scale asks
    # for 1 s and gets a minute.
    hold_s = 60 if STRESS else request.getfixturevalue("pace").deadline(procs * each, factor=3)
    ready = tmp_path / "ready"
    env = dict(os.environ)
    if pages:
        env["TCPTRACE_TEST_RING_PAGES"] = str(pages)
    tracer = subprocess.Popen(
        [sys.executable, "-m", "tcptrace", "watch", "--json", "--ready-file", str(ready)]
        + [a for p in PORTS for a in ("--port", str(p))],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "err", "w"), text=True, env=env)
    got = []

    def read():
        for line in tracer.stdout:
            got.append((time.time(), json.loads(line)))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not ready.exists():
        assert tracer.poll() is None, (tmp_path / "err").read_text()
        time.sleep(0.05)        # polling the readiness file itself
    holders = []
    for i, port in enumerate(PORTS):
        h = subprocess.Popen([sys.executable, os.path.join(HERE, "holders.py"), f"127.0.{70 + i}.1",
                              str(port), str(each), "0",
                              str(RATE / procs)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert json.loads(h.stdout.readline())["listening"] == port
        holders.append(h)
    for h in holders:
        h.stdin.write("go\n")
        h.stdin.flush()
    opened = [json.loads(h.stdout.readline()) for h in holders]
    # Hold until every opening has been reported (or a long while): then close
    deadline = time.monotonic() + hold_s
    while sum(1 for _, r in got if r["type"] in ("connect", "accept")) < 2 * procs * each \
            and time.monotonic() < deadline:
        time.sleep(0.1)         # polling what the tracer wrote: the signal itself
    closed_at = time.time()
    for h in holders:
        h.stdin.close()                     # holders.py: hold 0 s once told to go, then close
        assert json.loads(h.stdout.readline())["closed"] == each
        h.wait(60)
    tracer.terminate()
    tracer.wait(60)
    reader.join(10)
    err = (tmp_path / "err").read_text()
    assert tracer.returncode == 0, err
    mine = [(t, r) for t, r in got if r["type"] in ("connect", "accept")
            and r["laddr"] != "0.0.0.0" and (r["lport"] in PORTS or r["rport"] in PORTS)]
    kinds = collections.Counter(r["type"] for _, r in mine)
    ends = collections.Counter((r["type"], r["laddr"], r["lport"], r["raddr"], r["rport"])
                               for _, r in mine)
    lags = sorted(t - wall(r["time"]) for t, r in mine)
    print(f"\n{procs}x{each} connections opened in "
          f"{max(o['t1'] for o in opened) - min(o['t0'] for o in opened):.1f} s; lag p50 "
          f"{lags[len(lags) // 2]:.3f} s, p99 {lags[int(len(lags) * 0.99)]:.3f} s, max "
          f"{lags[-1]:.3f} s; {[l for l in err.splitlines() if 'early copies' in l]}")
    # the tracer's closing lines say what it lost and why, if it knows
    assert kinds == {"connect": procs * each, "accept": procs * each}, (kinds, err[-1500:])
    assert max(ends.values()) == 1                          # none twice
    assert all(t < closed_at for t, _ in mine)              # every one while open
    if pages:
        assert "early copies of held openings were refused" in err   # the case was made
    if STRESS:
        assert lags[-1] <= 1.0
