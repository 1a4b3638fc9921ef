"""What this machine can do, asked without BCC: privileges, BCC, headers, tracefs, each hook.

Every probe answers supported / unsupported / unknown and names the minimum kernel it needs, so
`tcptrace doctor` can explain a refusal before anything is compiled. `plan()` turns the answers
into the attach plan the tracer uses; nothing here imports bcc.
"""
import ctypes
import functools
import importlib.util
import os
import platform
from dataclasses import dataclass, field, asdict

from tcptrace import errors
from tcptrace.kernel.bpfsys import BPF_MAP_CREATE, NR_BPF, bpf

SUPPORTED, UNSUPPORTED, UNKNOWN = "supported", "unsupported", "unknown"
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""
    min_kernel: str = ""
    required: bool = False


# (name, tracefs event path, minimum kernel, required, why we want it) -- options as data.
TRACEPOINTS = (
    ("sock:inet_sock_set_state", "sock/inet_sock_set_state", "4.16", True,
     "every TCP state transition"),
    ("tcp:tcp_receive_reset", "tcp/tcp_receive_reset", "4.16", False,
     "tells refused connects and remote resets"),
    ("sock:inet_sk_error_report", "sock/inet_sk_error_report", "5.15", False,
     "the errno of failed connects (timeout, unreachable)"),
    ("tcp:tcp_retransmit_skb", "tcp/tcp_retransmit_skb", "4.15", False,
     "SYN retransmissions"),
    ("syscalls:sys_exit_connect", "syscalls/sys_exit_connect", "4.x (CONFIG_FTRACE_SYSCALLS)",
     False, "connects that fail before a SYN, where kprobes are missing"),
)
RAW_TRACEPOINTS = (
    ("raw:tcp_send_reset", "tcp/tcp_send_reset", "4.17", False, "tells resets we sent"),
)

# The kernel struct members the recursion rescue reads (bpf/rescue.c): the struct sock ones as
# the tracepoints' own TP_fast_assign reads them, then what tells a hit's level (task or
# interrupt) apart, task_struct.stack and pt_regs.sp: (macro suffix, struct, member path, size).
RESCUE_FIELDS = (
    ("FAMILY", "sock", "__sk_common.skc_family", 2),
    ("STATE", "sock", "__sk_common.skc_state", 1),
    ("DPORT", "sock", "__sk_common.skc_dport", 2),
    ("DADDR", "sock", "__sk_common.skc_daddr", 4),
    ("V6_DADDR", "sock", "__sk_common.skc_v6_daddr", 16),
    ("V6_SADDR", "sock", "__sk_common.skc_v6_rcv_saddr", 16),
    ("PROTOCOL", "sock", "sk_protocol", 2),
    ("ERR", "sock", "sk_err", 4),
    ("SPORT", "inet_sock", "inet_sport", 2),
    ("SADDR", "inet_sock", "inet_saddr", 4),
    ("TASK_STACK", "task_struct", "stack", 8),
    ("REGS_SP", "pt_regs", "sp", 8),
)


def tracefs_dir():
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def ensure_tracefs():
    """Mount tracefs when it is missing (root only). Returns (dir or None, note or None)."""
    d = tracefs_dir()
    if d:
        return d, None
    if os.geteuid() != 0:
        return None, None
    rc = os.system("mount -t tracefs tracefs /sys/kernel/tracing >/dev/null 2>&1")
    d = tracefs_dir()
    return d, ("mounted tracefs on /sys/kernel/tracing" if d and rc == 0 else None)


def privileged():
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    # CAP_SYS_ADMIN (21), or CAP_BPF (39) + CAP_PERFMON (38)
                    return bool(caps >> 21 & 1) or (bool(caps >> 39 & 1) and bool(caps >> 38 & 1))
    except OSError:
        pass
    return False


def bcc_available():
    return importlib.util.find_spec("bcc") is not None


def headers_dir():
    base = f"/lib/modules/{platform.release()}"
    for d in (f"{base}/build", f"{base}/source"):
        if os.path.isdir(os.path.join(d, "include")):
            return d
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"
    return None


def headers_version(d):
    """The kernel version the headers belong to, when it can be read."""
    try:
        real = os.path.realpath(d)
        name = os.path.basename(real)
        if name.startswith("linux-headers-"):
            return name[len("linux-headers-"):]
    except OSError:
        pass
    return None


def _kprobes():
    td = tracefs_dir()
    if os.path.exists("/sys/bus/event_source/devices/kprobe/type") or \
            (td and os.path.exists(os.path.join(td, "kprobe_events"))):
        try:
            with open("/proc/kallsyms") as f:
                syms = {line.split()[2] for line in f if line.rstrip().endswith(("tcp_v4_connect", "tcp_v6_connect"))}
        except OSError:
            return Check("kprobes", UNKNOWN, "kprobes present but /proc/kallsyms unreadable", "any")
        missing = {"tcp_v4_connect", "tcp_v6_connect"} - syms
        if missing:
            return Check("kprobes", UNSUPPORTED, f"no symbol {', '.join(sorted(missing))}", "any")
        return Check("kprobes", SUPPORTED, "tcp_v4_connect and tcp_v6_connect can be probed", "any")
    if td is None:
        return Check("kprobes", UNKNOWN, "tracefs not mounted", "any")
    return Check("kprobes", UNSUPPORTED,
                 "kernel built without CONFIG_KPROBES (no kprobe PMU, no kprobe_events)", "any")


def _map_type(name, map_type, key_size, value_size, max_entries, works, minver):
    """Create (and close) a map of the given type: the kernel's own answer."""
    if NR_BPF is None:
        return Check(name, UNKNOWN, f"no bpf() syscall number for {platform.machine()}", minver)
    if os.geteuid() != 0:
        return Check(name, UNKNOWN, "needs root to ask the kernel", minver)

    class MapAttr(ctypes.Structure):
        _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                    ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                    ("pad", ctypes.c_uint8 * 112)]
    fd, err = bpf(BPF_MAP_CREATE, MapAttr(map_type, key_size, value_size, max_entries))
    if fd >= 0:
        os.close(fd)
        return Check(name, SUPPORTED, works, minver)
    if err == 22:
        return Check(name, UNSUPPORTED, f"kernel rejects map type {map_type}", minver)
    return Check(name, UNKNOWN, f"map creation failed: {os.strerror(err)}", minver)


def _ringbuf():
    # BPF_MAP_TYPE_RINGBUF = 27
    return _map_type("ringbuf", 27, 0, 0, os.sysconf("SC_PAGE_SIZE"),
                     "BPF ring buffer maps can be created", "5.8")


def _queue():
    # BPF_MAP_TYPE_QUEUE = 22, a 16-byte value as held_q's (bpf/hold.c)
    return _map_type("queue map", 22, 0, 16, 1, "ESTABLISHED sockets' steps are held briefly, "
                     "so a short connection is one record per socket", "4.20")


@functools.lru_cache(maxsize=4)
def rescue_offsets(path=None):
    """(Check, {macro: offset}) for the recursion rescue, from the running kernel's BTF."""
    from tcptrace.kernel import btf
    name, minver = "recursion rescue", "5.5"
    try:
        b = btf.BTF.load(path or btf.VMLINUX)
        if b.offset("inet_sock", "sk")[0] != 0:
            raise btf.BTFError("struct inet_sock does not begin with its sock")
        offs = {}
        for macro, struct_, member, size in RESCUE_FIELDS:
            off, got = b.offset(struct_, member)
            if got != size:
                raise btf.BTFError(f"{struct_}.{member} is {got} bytes, not {size}")
            offs[macro] = off
        # THREAD_SIZE, to tell a task's stack from an interrupt stack (bpf/rescue.c: tt_level).
        # BTF has no constants; x86_64 sizes its IRQ stacks the same, and arm64 (no such struct)
        # uses 16 KiB with 4 KiB pages.
        offs["SZ_STACK"] = b.struct_size("irq_stack") or 16384
    except btf.BTFError as e:
        return Check(name, UNSUPPORTED, f"{e}: tracepoint hits the kernel skips while another "
                     "BPF program runs on the CPU are reported as lost, not recovered", minver), {}
    return Check(name, SUPPORTED, "struct offsets from BTF: hits the kernel skips while one "
                 "of our programs runs on the CPU are handled by raw tracepoint twins", minver), offs


@dataclass(frozen=True)
class Option:
    """One value a switch of the plan can take: the check it needs ("" for none), the -D
    switches bpf/ is compiled with for it, and what to say when it is taken instead of the best
    option (formatted with that option's check: {name}, {status}, {detail})."""
    value: object
    needs: str = ""
    cflags: tuple = ()
    note: str = ""


@dataclass(frozen=True)
class Switch:
    name: str               # a Plan field, or (hook) an optional tracepoint in Plan.tracepoints
    options: tuple          # best first; the last needs no check
    hook: bool = False

    def option(self, value):
        return next(o for o in self.options if o.value == value)


def _hook(name, macro):
    return Switch(name, (Option(True, name, (f"-D{macro}=1",)),
                         Option(False, note="{name} {status}: {detail}")), hook=True)


# Every choice the planner makes, as data. plan() takes each switch's first option whose check
# passed; the loader compiles the taken options' -D switches; tests/kernel/test_plans.py
# compiles and attaches a covering set of all the options, so a switch added here is built by
# the tests without more work.
SWITCHES = (
    Switch("transport", (
        Option("ringbuf", "ringbuf", ("-DTT_RINGBUF=1",)),
        Option("perf", note="ring buffer {status}: using the perf buffer"))),
    _hook("tcp:tcp_receive_reset", "TT_HOOK_RECV_RESET"),
    _hook("sock:inet_sk_error_report", "TT_HOOK_SOCK_ERROR"),
    _hook("tcp:tcp_retransmit_skb", "TT_HOOK_RETRANS"),
    _hook("raw:tcp_send_reset", "TT_HOOK_SEND_RESET"),
    Switch("rescue", (
        Option(True, "recursion rescue", ("-DTT_RESCUE=1",)),
        Option(False, note="recursion rescue {status}: {detail}"))),
    Switch("hold", (
        Option(True, "queue map", ("-DTT_HOLD=1",)),
        Option(False, note="queue map {status}: {detail}; each socket's opening steps are sent "
                           "at ESTABLISHED (two records per connection end, not one)"))),
    Switch("connect_hook", (
        Option("kprobe", "kprobes", ("-DTT_KPROBES=1",)),
        Option("syscall", "syscalls:sys_exit_connect", ("-DTT_SYSCALL_CONNECT=1",),
               "kprobes {status}: connect errors before the SYN come from "
               "syscalls:sys_exit_connect instead of tcp_v{{4,6}}_connect"),
        Option("none", note="no kprobes and no syscall tracepoints: connects that fail before "
                            "the SYN are not seen"))),
)


@dataclass
class Plan:
    """What the tracer will attach, and how events reach user space."""
    transport: str = "perf"
    tracepoints: list = field(default_factory=list)     # names from TRACEPOINTS / RAW_TRACEPOINTS
    connect_hook: str = "none"                           # kprobe | syscall | none
    rescue: dict = field(default_factory=dict)           # BTF offsets and sizes, or {}: no rescue
    hold: bool = False                                   # bpf/hold.c (queue maps)
    notes: list = field(default_factory=list)

    def choice(self, switch):
        """The value this plan took for a Switch."""
        if switch.hook:
            return switch.name in self.tracepoints
        v = getattr(self, switch.name)
        return bool(v) if switch.name == "rescue" else v

    def take(self, switch, value, offsets=None):
        if switch.hook:
            if value:
                self.tracepoints.append(switch.name)
        elif switch.name == "rescue":
            self.rescue = dict(offsets) if value else {}
        else:
            setattr(self, switch.name, value)

    def describe(self):
        hook = {"kprobe": "kprobes on tcp_v4_connect/tcp_v6_connect",
                "syscall": "syscalls:sys_{enter,exit}_connect (kprobes unavailable)",
                "none": "none"}[self.connect_hook]
        return (f"transport {self.transport}; tracepoints {', '.join(self.tracepoints)}; "
                f"connect errors via {hook}; recursion rescue {'on' if self.rescue else 'off'}; "
                f"held opens {'on' if self.hold else 'off'}")


def checks():
    out = [Check("privileges", SUPPORTED if privileged() else UNSUPPORTED,
                 "root" if os.geteuid() == 0 else "not root: need root or CAP_BPF+CAP_PERFMON",
                 required=True)]
    out.append(Check("bcc", SUPPORTED if bcc_available() else UNSUPPORTED,
                     "python3 module 'bcc' found" if bcc_available() else
                     "python3 module 'bcc' missing: apt-get install python3-bpfcc "
                     "(Fedora: dnf install python3-bcc)", required=True))
    h = headers_dir()
    kver = platform.release()
    if h:
        hv = headers_version(h)
        note = f"{h}" + (f" (headers of {hv}, running {kver}: safe, only tracepoint fields are read)"
                         if hv and hv != kver else "")
        out.append(Check("kernel headers", SUPPORTED, note, required=True))
    else:
        out.append(Check("kernel headers", UNSUPPORTED,
                         f"none for {kver}: run scripts/setup.sh or apt-get install linux-headers-{kver}",
                         required=True))
    td = tracefs_dir()
    out.append(Check("tracefs", SUPPORTED if td else UNSUPPORTED,
                     td or "not mounted: mount -t tracefs tracefs /sys/kernel/tracing", required=True))
    for name, path, minver, required, why in TRACEPOINTS + RAW_TRACEPOINTS:
        if td is None:
            st, detail = UNKNOWN, "tracefs not mounted"
        elif os.path.isdir(os.path.join(td, "events", path)):
            st, detail = SUPPORTED, why
        else:
            st, detail = UNSUPPORTED, f"missing: {why} is lost"
        out.append(Check(name, st, detail, minver, required))
    out.append(_kprobes())
    out.append(rescue_offsets()[0])
    if td is None:
        out.append(Check("transition tally", UNKNOWN, "tracefs not mounted", "3.10"))
    elif os.path.isdir(os.path.join(td, "instances")):
        out.append(Check("transition tally", SUPPORTED, "a tracefs instance counts every "
                         "inet_sock_set_state hit: transitions no BPF program ran for are "
                         "reported lost (unseen:)", "3.10"))
    else:
        out.append(Check("transition tally", UNSUPPORTED, "no tracefs instances: transitions "
                         "no BPF program ran for would go uncounted", "3.10"))
    out.append(_ringbuf())
    out.append(_queue())
    out.append(Check("perf buffer", SUPPORTED, "BPF_PERF_OUTPUT", "4.4"))
    return out


def plan(transport="auto", checks_=None, offsets=None):
    """The plan for this machine: for each switch, the best option whose check passed, and a
    note where that is not the best there is. `checks_` and the rescue's `offsets` are read
    from the machine unless given (tests give them)."""
    cs = {c.name: c for c in (checks_ or checks())}
    p = Plan()
    for name, *_, required, _why in TRACEPOINTS + RAW_TRACEPOINTS:
        if required and cs[name].status == SUPPORTED:
            p.tracepoints.append(name)
        elif required:
            p.notes.append(f"{name} {cs[name].status}: {cs[name].detail}")
    for sw in SWITCHES:
        if sw.name == "transport" and transport != "auto":
            p.take(sw, transport)
            continue
        taken = next(o for o in sw.options if not o.needs or _passed(cs, o.needs))
        best = sw.options[0]
        if taken is not best and taken.note:
            check = cs.get(best.needs) or Check(best.needs, UNKNOWN, "not checked")
            p.notes.append(taken.note.format(**asdict(check)))
        if sw.name == "rescue" and taken.value and offsets is None:
            offsets = rescue_offsets()[1]
        p.take(sw, taken.value, offsets)
    return p


def _passed(cs, name):
    return name in cs and cs[name].status == SUPPORTED


def require(checks_):
    """Raise the documented error for the first required check that fails."""
    cs = {c.name: c for c in checks_}
    if cs["privileges"].status != SUPPORTED:
        raise errors.NotPrivileged("tracing needs root (or CAP_BPF and CAP_PERFMON); "
                                   "try: sudo tcptrace ...")
    if cs["bcc"].status != SUPPORTED:
        raise errors.Unavailable(cs["bcc"].detail)
    if cs["kernel headers"].status != SUPPORTED:
        raise errors.Unavailable("no kernel headers: " + cs["kernel headers"].detail)
    if cs["tracefs"].status != SUPPORTED:
        raise errors.Unavailable("tracefs " + cs["tracefs"].detail)
    for c in checks_:
        if c.required and c.status != SUPPORTED:
            raise errors.Unavailable(f"{c.name} {c.status}: {c.detail} (needs kernel {c.min_kernel}+)")


def as_dict(checks_, plan_):
    return {"checks": [asdict(c) for c in checks_], "plan": asdict(plan_),
            "plan_summary": plan_.describe(), "kernel": platform.release()}
