#!/usr/bin/env python3
"""What the pipeline after the kernel costs, alone: order -> lifecycle -> detectors -> sink
(JSON Lines or text), fed from a recording parsed beforehand, output to /dev/null. No root, no BCC.

Live CPU figures (bench/run.py) on a shared 2-core host move 10-20% between rounds of the same
run; an instruction count does not. So two trees are compared by the instructions one pass
takes under valgrind (the difference between a run of 2 passes and a run of 1, so parsing and
start-up cancel out), and by the best of N timed passes:

    python3 bench/pipeline.py --tree . --tree /tmp/old --mode json,transitions \\
        --recording tests/data/storm-20k.jsonl.xz [--valgrind] [--passes 5]

A tree is a tcptrace source tree (a checkout or `git archive REV tcptrace | tar -x -C DIR`);
trees from before the restructure (da63500, one session.py loop) are driven through their own
replay loop. Results are JSON on stdout.
"""
import argparse
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.abspath(__file__)
# --mode -> the watch options it stands for
MODES = {"json": dict(json=True, transitions=False),             # watch --json
         "transitions": dict(json=True, transitions=True),       # watch --json --transitions
         "text": dict(json=False, transitions=False),            # watch
         "text-transitions": dict(json=False, transitions=True)}  # watch --transitions


def _open(path):
    return lzma.open(path, "rt") if path.endswith(".xz") else open(path)


def _new_api(mode, path):
    from tcptrace.options import Options
    from tcptrace.output import make_sink
    from tcptrace.recording import RecordingSource
    from tcptrace.session import Pipeline, run

    src = RecordingSource(path)
    batches = list(src.batches())

    class Replayed:
        def batches(self):
            return iter(batches)

    def one():
        opts = Options(**MODES[mode])
        with open(os.devnull, "w") as out:
            pipe = Pipeline(opts, make_sink(opts, out, src.wall_offset_ns))
            run(Replayed(), pipe)
        return pipe.emitted
    return one


def _old_api(mode, path):
    """da63500's session: Pipeline(opts, out, wall), feed/feed_scan, as its replay() drove it."""
    from tcptrace import events, session

    ops = []
    with _open(path) as f:
        wall = int(json.loads(f.readline())["wall_offset_ns"])
        newest, batch = 0, []
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            if d["kind"] == "tick":
                newest = max(newest, int(d["ts_ns"]))
                ops.append(("feed", batch, newest))
                batch = []
            elif d["kind"] == "seed":
                ops.append(("seed", d))
            else:
                rec = events.from_json_obj(d)
                if not isinstance(rec, events.Lost) and rec.flags & events.F_SCAN:
                    ops += [("feed", batch, newest), ("scan", [rec], newest)]
                    batch = []
                    continue
                newest = max(newest, rec.ts_ns)
                batch.append(rec)
                if len(batch) >= 1000:
                    ops.append(("feed", batch, newest))
                    batch = []
        ops.append(("feed", batch, newest))

    def one():
        opts = session.Options(**MODES[mode])
        with open(os.devnull, "w") as out:
            pipe = session.Pipeline(opts, out, wall)
            for op in ops:
                if op[0] == "feed":
                    pipe.feed(op[1], op[2])
                elif op[0] == "scan":
                    pipe.feed_scan(op[1], op[2])
                else:
                    d = op[1]
                    pipe.tracker.seed(int(d["family"]), d["laddr"], int(d["lport"]), d["raddr"],
                                      int(d["rport"]), int(d["state"]), int(d["ts_ns"]),
                                      (d["pid"], d["comm"], d["fd"]) if d.get("pid") else None)
            pipe.finish()
        return pipe.emitted
    return one


def passes_here(tree, mode, path, passes):
    """Run in this process (the tree's tcptrace first on the path): [seconds per pass], lines."""
    import time
    sys.path.insert(0, os.path.abspath(tree))
    if os.path.exists(os.path.join(tree, "tcptrace", "recording.py")):
        tmp = None
        if path.endswith(".xz"):        # RecordingSource reads plain files
            fd, tmp = tempfile.mkstemp(suffix=".jsonl")
            with os.fdopen(fd, "w") as out, _open(path) as f:
                out.write(f.read())
            path = tmp
        one = _new_api(mode, path)
        if tmp:
            os.unlink(tmp)
    else:
        one = _old_api(mode, path)
    from tcptrace import session
    session._tune_gc()                   # the collector as the tree's tracer runs it
    times, lines = [], 0
    for _ in range(passes):
        t0 = time.thread_time()
        lines = one()
        times.append(time.thread_time() - t0)
    return times, lines


def instructions(tree, mode, path, passes):
    """Instructions of `passes` passes under valgrind, less those of one pass: per pass."""
    def run(n):
        with tempfile.NamedTemporaryFile() as log:
            subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                            f"--log-file={log.name}", sys.executable, HERE, "--tree", tree,
                            "--mode", mode, "--recording", path, "--passes", str(n), "--here"],
                           check=True, stdout=subprocess.DEVNULL)
            m = re.search(rb"refs:\s+([\d,]+)", log.read())
            return int(m.group(1).replace(b",", b""))
    one, more = run(1), run(1 + passes)
    return (more - one) // passes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True)
    ap.add_argument("--mode", default="json,transitions",
                    help="comma separated: " + ", ".join(MODES))
    ap.add_argument("--recording", default=os.path.join(os.path.dirname(os.path.dirname(HERE)),
                                                        "tests", "data", "storm-20k.jsonl.xz"))
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--valgrind", action="store_true",
                    help="count instructions too (about a minute a tree and mode)")
    ap.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    unknown = [m for m in a.mode.split(",") if m not in MODES]
    if unknown:
        ap.error(f"unknown --mode {', '.join(unknown)}: one of {', '.join(MODES)}")
    if a.here:          # one tree, one mode, in this process (what --valgrind measures)
        print(json.dumps(passes_here(a.tree[0], a.mode, a.recording, a.passes)))
        return
    out = []
    for mode in a.mode.split(","):
        for tree in a.tree:
            # Each tree in a process of its own: they share the package name
            r = subprocess.run([sys.executable, HERE, "--tree", tree, "--mode", mode,
                                "--recording", a.recording, "--passes", str(a.passes),
                                "--here"], check=True, capture_output=True, text=True)
            times, lines = json.loads(r.stdout)
            row = {"tree": tree, "mode": mode, "lines": lines,
                   "best_s": round(min(times), 4), "passes_s": [round(t, 4) for t in times]}
            if a.valgrind:
                row["instructions_per_pass"] = instructions(tree, mode, a.recording, 1)
            out.append(row)
            print(json.dumps(row), file=sys.stderr)
    json.dump({"recording": a.recording, "results": out}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
