#!/usr/bin/env python3
"""Golden outputs: what `tcptrace replay` prints for the committed recordings, in every output
mode, pinned by hash so that a change of layout cannot change a byte unnoticed.

    python tests/golden.py check              # what tests/unit/test_golden.py does
    python tests/golden.py write [--tree DIR] # re-pin after an intended output change (with the
                                              # outputs of the tree at DIR, or of this one)
    python tests/golden.py diff --against DIR # replay with the tree at DIR too, and diff

`diff` is how an intended change is reviewed (and how an unintended one is found): it replays
each recording with both trees and prints the first lines that differ. The manifest keeps
hashes, not the outputs: a 20k conn/s recording gives tens of megabytes of lines.
"""
import argparse
import difflib
import hashlib
import json
import lzma
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
MANIFEST = os.path.join(DATA, "golden.json")

# Every committed recording (plain or xz), each replayed in every mode.
RECORDINGS = ("loopback.jsonl", "kernel-tier.jsonl.xz", "storm-20k.jsonl.xz", "listen.jsonl.xz")
MODES = {
    "text": [],
    "text-transitions": ["--transitions"],
    "json": ["--json"],
    "json-transitions": ["--json", "--transitions"],
    "report": ["--report"],
    "report-json": ["--report", "--json"],
}
COMMON = ["--stuck-after", "1"]


def recording_path(name, tmpdir):
    """A plain file to replay: xz recordings are unpacked into tmpdir once."""
    src = os.path.join(DATA, name)
    if not name.endswith(".xz"):
        return src
    dst = os.path.join(tmpdir, name[:-3])
    if not os.path.exists(dst):
        with lzma.open(src, "rb") as f, open(dst, "wb") as out:
            out.write(f.read())
    return dst


def replay(path, mode, tree=None):
    """(exit code, stdout, stderr) of `tcptrace replay` in that mode, with the tree at `tree`
    (a checkout) or the one this file belongs to."""
    tree = tree or os.path.dirname(HERE)
    env = dict(os.environ, PYTHONPATH=tree, PYTHONHASHSEED="0")
    p = subprocess.run([sys.executable, "-m", "tcptrace", "replay", path] + MODES[mode] + COMMON,
                       capture_output=True, env=env, cwd=tree)
    return p.returncode, p.stdout, p.stderr


def digest(rc, out, err):
    return {"rc": rc, "stdout_sha256": hashlib.sha256(out).hexdigest(),
            "stdout_lines": out.count(b"\n"), "stderr": err.decode(errors="replace")}


def compute(tree=None):
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in RECORDINGS:
            path = recording_path(name, tmp)
            for mode in MODES:
                got[f"{name} {mode}"] = digest(*replay(path, mode, tree))
    return got


def load():
    with open(MANIFEST) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("check", "write", "diff"))
    ap.add_argument("--against", metavar="DIR", help="the other tree, for diff")
    ap.add_argument("--tree", metavar="DIR", help="write: pin the outputs of the tree at DIR")
    a = ap.parse_args()
    if a.what == "write":
        with open(MANIFEST, "w") as f:
            json.dump(compute(a.tree), f, indent=1, sort_keys=True)
            f.write("\n")
        return 0
    if a.what == "check":
        want, got = load(), compute()
        bad = [k for k in want if want[k] != got.get(k)]
        for k in bad:
            print(f"differs: {k}")
        return 1 if bad else 0
    if not a.against:
        ap.error("diff needs --against DIR")
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in RECORDINGS:
            path = recording_path(name, tmp)
            for mode in MODES:
                old, new = replay(path, mode, a.against), replay(path, mode)
                if old == new:
                    continue
                differ += 1
                print(f"=== {name} {mode}: rc {old[0]} -> {new[0]}")
                for stream, i in (("stdout", 1), ("stderr", 2)):
                    lines = list(difflib.unified_diff(
                        old[i].decode(errors="replace").splitlines(),
                        new[i].decode(errors="replace").splitlines(),
                        f"{a.against} {stream}", f"this tree {stream}", lineterm="", n=1))
                    # lines can be one long JSON object: show where they start to differ
                    print("\n".join(line[:300] + ("..." if len(line) > 300 else "")
                                    for line in lines[:40]))
    print(f"{differ} of {len(RECORDINGS) * len(MODES)} outputs differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
