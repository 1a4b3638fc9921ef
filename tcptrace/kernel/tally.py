"""A count of every hit of a tracepoint that needs no BPF (sock:inet_sock_set_state,
tcp:tcp_retransmit_skb): the yardstick for hits the kernel made without running any BPF program
(reported as `unseen:` losses, kernel/losses.py)."""
import contextlib
import os
import re

# The lines of a per-CPU stats file that together count every hit the instance was given
_COUNTED = re.compile(rb"^(?:entries|dropped events|read events): *(\d+)$", re.M)


def _start_time(pid):
    """Field 22 of /proc/<pid>/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])    # fields from 3 on, after the comm


class Tally:
    """Counts every hit of one tracepoint (`event`, "system/name") without BPF, in a tracefs
    instance of our own (one per event: an instance's counts are not per event), so that hits
    the kernel makes without running any BPF program for them (and without counting them as
    recursion misses) are counted too. Such hits exist: on the 6.18 guest this
    was developed on, BPF never runs in softirqs that interrupt a thread of pid 1 (docs/bench.md,
    "Sixth session"); before 6.7 the kernel skips a tracepoint program for recursion without
    counting a miss; and the perf tracepoint path drops a hit uncounted when perf's own
    recursion guard trips.

    The instance's ring buffer is one page per CPU and does not overwrite: once full, each hit
    is refused at once and counted in "dropped events", so entries + dropped is every hit, read
    without a reader and at little cost per hit.

    The instance's probe is registered after the BPF program's, so on each hit BPF runs (or
    misses) first: read this count first and BPF's after, and their difference can only fall
    short of the truth, never report a loss that did not happen."""
    def __init__(self, tracefs, event="sock/inet_sock_set_state", tag=None):
        """`tag` names the instance of a second event: tcptrace-<pid>-<start time>-<tag>."""
        base = os.path.join(tracefs, "instances")
        self._sweep(base)
        self.event = os.path.join("events", event)
        name = self.name(os.getpid())
        self.dir = os.path.join(base, f"{name}-{tag}" if tag else name)
        self._fds = None        # the per-CPU stats files, once count() has opened them
        os.mkdir(self.dir)
        try:
            self._write("options/overwrite", "0")
            self._write("buffer_size_kb", "4")
            self._write(os.path.join(self.event, "enable"), "1")
            self._stats = [os.path.join(self.dir, "per_cpu", d, "stats")
                           for d in os.listdir(os.path.join(self.dir, "per_cpu"))]
            self.count()
        except Exception:
            self.close()
            raise

    @staticmethod
    def name(pid):
        """tcptrace-<pid>-<start time>: with the process's start time (clock ticks since boot),
        an instance left by a dead process is told from a live one's even after its pid has
        been reused. None if the process is gone."""
        start = _start_time(pid)
        return None if start is None else f"tcptrace-{pid}-{start}"

    @staticmethod
    def stale(names):
        """Which of these instance names a tcptrace that died without closing its instance
        left: its process is gone, or its pid now belongs to a process started since. Names
        without a start time (tcptrace-<pid>, as older versions named them) go by the pid
        alone; a tagged one (tcptrace-<pid>-<start time>-<tag>) by its first three parts."""
        out = []
        for name in names:
            parts = name.split("-")
            if parts[0] != "tcptrace" or len(parts) not in (2, 3, 4) \
                    or not all(p.isdigit() for p in parts[1:3]) \
                    or (len(parts) == 4 and not parts[3].isalpha()):
                continue
            if len(parts) == 2:
                if not os.path.exists(f"/proc/{parts[1]}"):
                    out.append(name)
            elif Tally.name(int(parts[1])) != "-".join(parts[:3]):
                out.append(name)
        return out

    @staticmethod
    def leftovers(tracefs):
        """Instances left by tcptrace processes that died without closing theirs (SIGKILL):
        each still counts every transition into its buffer until removed."""
        try:
            return Tally.stale(os.listdir(os.path.join(tracefs, "instances")))
        except OSError:
            return []

    @staticmethod
    def _sweep(base):
        """Remove instances left by tcptrace processes that died without closing theirs.
        Returns the names removed."""
        gone = []
        for name in Tally.stale(os.listdir(base)):
            with contextlib.suppress(OSError):
                with open(os.path.join(base, name, "events", "enable"), "w") as f:
                    f.write("0")        # every event of the instance, whichever it counts
                os.rmdir(os.path.join(base, name))
                gone.append(name)
        return gone

    @staticmethod
    def sweep(tracefs):
        return Tally._sweep(os.path.join(tracefs, "instances"))

    def _write(self, rel, value):
        with open(os.path.join(self.dir, rel), "w") as f:
            f.write(value)

    def count(self):
        """Every hit so far: entries + dropped + read events, over the CPUs. The stats files
        are kept open and re-read from offset 0 (the kernel writes them anew on each read):
        this runs on every drain, and opening them each time was most of its cost."""
        if self._fds is None:
            self._fds = [os.open(p, os.O_RDONLY) for p in self._stats]
        n = 0
        for fd in self._fds:
            n += sum(map(int, _COUNTED.findall(os.pread(fd, 4096, 0))))
        return n

    def close(self):
        for fd in self._fds or ():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = None
        with contextlib.suppress(OSError):
            self._write(os.path.join(self.event, "enable"), "0")
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)
