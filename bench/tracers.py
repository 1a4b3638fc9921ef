"""Start, watch and stop the tracers under test, the same way for each.

Shared by bench/run.py and bench/memory.py. Each tracer:
  - starts in a controlled environment: PYTHONUNBUFFERED removed (it made tcpstates-bpfcc lose
    far more, PERFORMANCE-NOTES.md), SIGINT reset to default in the child (a process started
    from a script may inherit it ignored), its own session so a Ctrl-C at the terminal is ours;
  - writes stdout to a file in /dev/shm, read after it stops: a live reader would take CPU from
    the storm and the tracer on a 2-core box;
  - is "ready" when its probes are attached and its buffers open: tcptrace writes --ready-file;
    the bcc tools print a header, but with PYTHONUNBUFFERED unset it sits in the stdio buffer, so
    readiness is read from /proc instead (the tracepoint's perf event plus one perf buffer per
    CPU for each of the tool's two output maps are open);
  - is measured from /proc/<pid>/stat (utime+stime) and /proc/<pid>/fdinfo of its BPF program
    fds (run_cnt, run_time_ns, recursion_misses: the kernel's own counters, bpf_prog_info),
    read before SIGINT because the programs go away with the process.
"""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

SUMMARY_RE = re.compile(r"(\d+) events, (\d+) findings, (\d+) lost(?: \((.*?)\))?")
POSSIBLY_LOST_RE = re.compile(rb"Possibly lost (\d+) samples")
RESCUED_RE = re.compile(r"(\d+) hits the kernel skipped \(BPF recursion\) were recovered")
SAMPLER_RE = re.compile(r"sampler (\S+): (\d+) readings, (\d+) ms CPU")


def machine():
    """What a figure measured here depends on: the CPU, its count, the kernel, and the
    mitigations in force (kernel entry costs five times more on some hosts of one kind)."""
    model = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    vdir = "/sys/devices/system/cpu/vulnerabilities"
    vulns = {}
    for name in sorted(os.listdir(vdir)) if os.path.isdir(vdir) else []:
        with open(os.path.join(vdir, name)) as f:
            vulns[name] = f.read().strip()
    return {"cpu": model, "ncpu": NCPU, "kernel": os.uname().release,
            "vulnerabilities": {k: v for k, v in vulns.items() if v != "Not affected"}}


def clean_env():
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    return env


def _child_setup():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def bpf_prog_stats(pid):
    """{prog_id: {run_cnt, run_time_ns, recursion_misses}} for every BPF program fd the process
    holds (fdinfo, kernel/bpf/syscall.c bpf_prog_show_fdinfo; recursion_misses since 5.12)."""
    out = {}
    fddir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fddir)
    except OSError:
        return out
    for fd in fds:
        try:
            if os.readlink(f"{fddir}/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(l.split(":", 1) for l in f if ":" in l)
        except OSError:
            continue
        pid_ = int(info.get("prog_id", "0"))
        out[pid_] = {k: int(info[k]) for k in ("run_cnt", "run_time_ns", "recursion_misses")
                     if k in info}
    return out


def perf_event_fds(pid):
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]":
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


class Tracer:
    """One run of one tracer. Subclasses say how to start it and how to read its output."""
    name = "?"

    def __init__(self, workdir=None):
        self.cwd = ROOT
        self.workdir = workdir or tempfile.mkdtemp(prefix="tcptrace-bench-", dir="/dev/shm")
        self.out_path = os.path.join(self.workdir, f"{self.name}.out")
        self.discard_output = False     # True: stdout to /dev/null (nothing to count)
        self.err_path = os.path.join(self.workdir, f"{self.name}.err")
        self.proc = None
        self.start_s = None

    def argv(self):
        raise NotImplementedError

    def start(self, timeout=60):
        # Only files inside workdir are ever created or removed; /dev/null is passed as
        # subprocess.DEVNULL, never as a path of ours (an earlier version unlinked it).
        out = subprocess.DEVNULL if self.discard_output else open(self.out_path, "wb")
        err = open(self.err_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                     env=clean_env(), cwd=self.cwd, preexec_fn=_child_setup,
                                     start_new_session=True)
        if out is not subprocess.DEVNULL:
            out.close()
        err.close()
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up ({self.proc.returncode}):"
                                   f" {self.stderr()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                self.kill()
                raise RuntimeError(f"{self.name} not ready after {timeout}s")
            time.sleep(0.05)
        self.start_s = time.monotonic() - t0
        time.sleep(0.2)       # the start-up CPU (compiling) is over; let the reader loop settle

    def ready(self):
        raise NotImplementedError

    @property
    def pid(self):
        return self.proc.pid

    def cpu(self):
        return cpu_seconds(self.pid)

    def settle(self, limit=30.0, quiet=0.5):
        """Wait until the tracer has caught up: its CPU time stops growing (it drains what the
        storm left in its buffers). Returns the seconds waited."""
        t0 = time.monotonic()
        last = self.cpu()
        still = time.monotonic()
        while time.monotonic() - t0 < limit:
            time.sleep(0.1)
            c = self.cpu()
            if c - last > 1.5 / CLK_TCK:
                last = c
                still = time.monotonic()
            elif time.monotonic() - still >= quiet:
                break
        return time.monotonic() - t0

    def stop(self, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode(errors="replace")

    def count(self, marker):
        """{"seen": lines of the storm's traffic, "lost": what the tool reported lost, ...}"""
        raise NotImplementedError

    def cleanup(self):
        """Remove the run's directory: output, stderr, the ready file."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def _lines(path, chunk=1 << 22):
    with open(path, "rb") as f:
        rest = b""
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            buf = rest + buf
            cut = buf.rfind(b"\n") + 1
            rest = buf[cut:]
            yield buf[:cut]
        if rest:
            yield rest


class Tcptrace(Tracer):
    name = "tcptrace"

    tree = ROOT      # the source tree `python -m tcptrace` runs from (run.py --commit sets it)

    def __init__(self, workdir=None, extra=()):
        super().__init__(workdir)
        self.ready_path = os.path.join(self.workdir, "ready")
        self.extra = list(extra)
        self.cwd = Tcptrace.tree     # -m puts the cwd first on sys.path: this tree's package runs

    def argv(self):
        py = os.path.join(ROOT, ".venv", "bin", "python")
        if not os.path.exists(py):
            py = sys.executable
        return [py, "-m", "tcptrace", "watch", "--json", "--transitions",
                "--ready-file", self.ready_path] + self.extra

    def ready(self):
        return os.path.exists(self.ready_path)

    def count(self, marker):
        m = marker.encode()
        seen = lost_records = 0
        lost_where = {}
        for buf in _lines(self.out_path):
            if m in buf:
                for line in buf.split(b"\n"):
                    # the kernel's transitions, not those tcptrace infers into and out of
                    # TIME_WAIT (the storm's expected count has no TIME_WAIT)
                    if m in line and b'"type":"transition"' in line \
                            and b'"inferred":true' not in line:
                        seen += 1
            if b'"type":"lost"' in buf:
                for line in buf.split(b"\n"):
                    if b'"type":"lost"' in line:
                        c = int(re.search(rb'"count":(\d+)', line).group(1))
                        w = re.search(rb'"where":"([^"]*)"', line).group(1).decode()
                        lost_records += c
                        lost_where[w] = lost_where.get(w, 0) + c
        return _with_summary({"seen": seen, "lost_where": lost_where}, self.stderr())


def state_losses(where):
    """The losses that can hide a state transition: refused state outputs, recursion misses of
    the inet_sock_set_state program and its hits that ran no program at all (unseen:, counted
    against a tracefs instance), not lost resets, errors or connect() returns."""
    return sum(v for k, v in where.items()
               if k == "bpf:state" or (k.startswith(("recursion:", "unseen:"))
                                       and "inet_sock_set_state" in k))


def _with_summary(res, stderr):
    """Fold in tcptrace's final stderr line, which is authoritative: it includes what the last
    drain found after the final lost record was written."""
    m = RESCUED_RE.search(stderr)
    res["rescued"] = int(m.group(1)) if m else 0
    # tcptrace's samplers' own CPU, measured inside the tracer (kernel/live.py)
    res["sampler_cpu_ms"] = sum(int(g[2]) for g in SAMPLER_RE.findall(stderr)) or None
    m = SUMMARY_RE.search(stderr)
    res["summary"] = None
    if m:
        res["summary"] = {"events": int(m.group(1)), "findings": int(m.group(2)),
                          "lost": int(m.group(3)), "detail": m.group(4)}
        if m.group(4):
            res["lost_where"] = {k.strip(): int(v) for k, v in
                                 (p.rsplit(":", 1) for p in m.group(4).split(", "))}
    res["lost_all"] = sum(res["lost_where"].values())
    res["lost"] = state_losses(res["lost_where"])
    return res


class TcptraceFindings(Tcptrace):
    """`tcptrace watch --json` without --transitions: a line per finding, what most users run.
    Every transition is still shown, as the `path` of the finding that ends its connection
    (close, reset, refused, failed), so `seen` counts those: a path lists the states after
    each transition, plus the first state when the connection was first seen mid-life."""
    name = "tcptrace-findings"

    def argv(self):
        return [a for a in super().argv() if a != "--transitions"]

    def count(self, marker):
        import json
        m = marker.encode()
        seen = 0
        lost_where = {}
        for buf in _lines(self.out_path):
            for line in buf.split(b"\n"):
                if (m in line and b'"path"' in line) or b'"type":"lost"' in line:
                    d = json.loads(line)
                    if d["type"] == "lost":
                        lost_where[d["where"]] = lost_where.get(d["where"], 0) + d["count"]
                    elif marker in (d.get("raddr") or "") or marker in (d.get("laddr") or ""):
                        seen += len(d["path"]) - (1 if d.get("partial") else 0)
        return _with_summary({"seen": seen, "lost_where": lost_where}, self.stderr())


class TcptraceText(Tcptrace):
    """`tcptrace watch`: the default, human output (a line per finding, as tcptrace-findings).
    Its lines name no path, so `seen` is not counted; what it lost is in its final summary."""
    name = "tcptrace-text"

    def argv(self):
        return [a for a in super().argv() if a not in ("--json", "--transitions")]

    def count(self, marker):
        return _with_summary({"seen": None, "lost_where": {}}, self.stderr())


class TcptraceReport(Tcptrace):
    """`tcptrace report --json`: the same pipeline without a line per finding. Not a target of the
    issue; run beside `watch` it splits tcptrace's cost into analysis and output. Its transition
    matrix counts every transition on the box, so `seen` here includes other traffic."""
    name = "tcptrace-report"

    def argv(self):
        return super().argv()[:3] + ["report", "--json", "--ready-file", self.ready_path] \
            + self.extra

    def count(self, marker):
        import json
        res = {"seen": 0, "lost": 0, "lost_where": {}}
        with open(self.out_path, "rb") as f:
            lines = [l for l in f.read().splitlines() if l.strip()]
        if lines:
            d = json.loads(lines[-1])
            res["seen"] = sum(t["count"] for t in d.get("transitions", [])
                              if "TIME_WAIT" not in (t["old"], t["new"]))    # inferred ones
            res["lost"] = d.get("lost", {}).get("total", 0)
            res["lost_where"] = d.get("lost", {}).get("by_source", {})
        return _with_summary(res, self.stderr())


class TcptraceMetrics(Tcptrace):
    """`tcptrace metrics`: a Prometheus endpoint (on a free loopback port, scraped by nobody
    during the run); healthy connections are folded in the kernel. Its output shows no
    transitions, so `seen` is not counted; what it lost is in its final summary."""
    name = "tcptrace-metrics"

    def argv(self):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return super().argv()[:3] + ["metrics", "--listen", f"127.0.0.1:{port}",
                                     "--ready-file", self.ready_path] + self.extra

    def count(self, marker):
        return _with_summary({"seen": None, "lost_where": {}}, self.stderr())


class TcptraceOnly(Tcptrace):
    """`tcptrace watch --json --only refused,failed,reset,stuck`: what goes wrong, one line
    each; healthy connections are folded in the kernel."""
    name = "tcptrace-only"

    def argv(self):
        return [a for a in super().argv() if a != "--transitions"] + [
            "--only", "refused,failed,reset,stuck"]

    def count(self, marker):
        return _with_summary({"seen": None, "lost_where": {}}, self.stderr())


class BccTool(Tracer):
    path = None
    outputs = 2          # perf output maps the tool opens (ipv4_events, ipv6_events)

    def argv(self):
        return [self.path]

    def ready(self):
        return perf_event_fds(self.pid) >= 1 + self.outputs * NCPU

    def count(self, marker):
        m = marker.encode()
        seen = lost = 0
        for buf in _lines(self.out_path):
            seen += buf.count(m)            # one storm address per line (see storm.py)
            if b"Possibly lost" in buf:
                lost += sum(int(x) for x in POSSIBLY_LOST_RE.findall(buf))
        # libbcc's default lost-sample callback (perf_reader.c) writes the line to stderr.
        with open(self.err_path, "rb") as f:
            lost += sum(int(x) for x in POSSIBLY_LOST_RE.findall(f.read()))
        return {"seen": seen, "lost": lost, "lost_where": {"perf": lost} if lost else {}}


class Tcpstates(BccTool):
    name = "tcpstates"
    path = "/usr/sbin/tcpstates-bpfcc"


class Tcplife(BccTool):
    name = "tcplife"
    path = "/usr/sbin/tcplife-bpfcc"


def git_describe(path=ROOT):
    """The commit of the checkout at path (this one by default), "-dirty" with local edits."""
    return subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"],
                          capture_output=True, text=True).stdout.strip() or None


def tree_id(path):
    """What a tcptrace@DIR tool ran: DIR's commit when it is a checkout, and in any case a
    digest of its tcptrace/ and bpf/ sources (a tree made by `git archive` has no commit; the
    digest tells two such trees apart, and matches the same sources extracted again)."""
    h = hashlib.sha256()
    for sub in ("tcptrace", "bpf"):
        for d, dirs, files in sorted(os.walk(os.path.join(path, sub))):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".c", ".h")):
                    full = os.path.join(d, name)
                    h.update(os.path.relpath(full, path).encode() + b"\0")
                    with open(full, "rb") as f:
                        h.update(f.read())
    out = {"dir": os.path.abspath(path), "sources_sha256": h.hexdigest()[:16]}
    if os.path.exists(os.path.join(path, ".git")):
        out["commit"] = git_describe(path)
    return out


def export_commit(rev):
    """Extract tcptrace at `rev` into a fresh directory and return it, so a whole benchmark run
    measures one commit even while others commit to the working tree."""
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    dest = tempfile.mkdtemp(prefix=f"tcptrace-{sha}-")
    archive = subprocess.Popen(["git", "-C", ROOT, "archive", sha, "tcptrace", "bpf"],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, check=True)
    archive.wait()
    return sha, dest


TRACERS = {"tcptrace": Tcptrace, "tcptrace-findings": TcptraceFindings,
           "tcptrace-text": TcptraceText,
           "tcptrace-report": TcptraceReport, "tcptrace-metrics": TcptraceMetrics,
           "tcptrace-only": TcptraceOnly, "tcpstates": Tcpstates,
           "tcplife": Tcplife}
