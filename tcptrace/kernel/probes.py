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
from tcptrace.kernel import btf
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
    ("tcp:tcp_retransmit_synack", "tcp/tcp_retransmit_synack", "4.15", False,
     "SYN-ACK retransmits per listener: half-open connections that do not complete"),
)
RAW_TRACEPOINTS = (
    ("raw:tcp_send_reset", "tcp/tcp_send_reset", "4.17", False, "tells resets we sent"),
)

# The kernel struct members the raw tracepoint programs read (bpf/raw.c): the struct sock ones as
# the tracepoints' own TP_fast_assign reads them, then what tells a hit's level (task or
# interrupt) apart, task_struct.stack: (macro, struct, member path, size).
RESCUE_FIELDS = (
    ("OFF_FAMILY", "sock", "__sk_common.skc_family", 2),
    ("OFF_STATE", "sock", "__sk_common.skc_state", 1),
    ("OFF_DPORT", "sock", "__sk_common.skc_dport", 2),
    ("OFF_DADDR", "sock", "__sk_common.skc_daddr", 4),
    ("OFF_V6_DADDR", "sock", "__sk_common.skc_v6_daddr", 16),
    ("OFF_V6_SADDR", "sock", "__sk_common.skc_v6_rcv_saddr", 16),
    ("OFF_PROTOCOL", "sock", "sk_protocol", 2),
    ("OFF_ERR", "sock", "sk_err", 4),
    ("OFF_SPORT", "inet_sock", "inet_sport", 2),
    ("OFF_SADDR", "inet_sock", "inet_saddr", 4),
    ("OFF_TASK_STACK", "task_struct", "stack", 8),
)
# The members bpf/raw.c reads with one probe read per group, as the kernel lays each group out
# close together (sock_common's first 20 bytes; inet_sock's saddr and sport): each probe read
# costs a helper call on every hit. (macro prefix, members by RESCUE_FIELDS macro)
RESCUE_SPANS = (("SPAN_COMMON", ("OFF_DADDR", "OFF_DPORT", "OFF_FAMILY")),
                ("SPAN_INET", ("OFF_SADDR", "OFF_SPORT")))
SPAN_MAX = 32       # bytes, for a group read into the program's stack
# What the listener facts (bpf/listen.c) read of a listening socket: which network namespace
# it is in (its struct net's ns.inum, the inode `ip netns identify` and /proc/<pid>/ns/net
# show), its family and its local port. The same macro names as the rescue's where the member
# is the same.
SOCK_ID_FIELDS = (
    ("OFF_NET", "sock", "__sk_common.skc_net.net", 8),
    ("OFF_NET_INUM", "net", "ns.inum", 4),
    ("OFF_FAMILY", "sock", "__sk_common.skc_family", 2),
    ("OFF_NUM", "sock", "__sk_common.skc_num", 2),
)
# What the syscall hook reads at connect()'s return (bpf/connect.c, TT_CONNECT_REGS): the call's
# descriptor and sockaddr from the user registers saved at entry (x86_64 names: another
# architecture's BTF lacks them, and the hook keeps its entry program there), and the socket
# behind the descriptor, current->files->fdt->fd[fd]->private_data->sk.
CONNECT_REGS_FIELDS = (
    ("OFF_REGS_FD", "pt_regs", "di", 8),
    ("OFF_REGS_ADDR", "pt_regs", "si", 8),
    ("OFF_TASK_FILES", "task_struct", "files", 8),
    ("OFF_FILES_FDT", "files_struct", "fdt", 8),
    ("OFF_FDT_MAX", "fdtable", "max_fds", 4),
    ("OFF_FDT_FD", "fdtable", "fd", 8),
    ("OFF_FILE_DATA", "file", "private_data", 8),
    ("OFF_SOCKET_SK", "socket", "sk", 8),
)
# The drop reason that names an accept queue full at the final ACK, as the running kernel's
# enum spells it (its number differs between kernels: read it, never copy it).
LISTEN_OVERFLOW = "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"


def tracefs_dir():
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def tracefs_mounts(mountinfo="/proc/self/mountinfo"):
    """Where tracefs is mounted, as the kernel says (a mount this user cannot look into is
    still a mount: mode 0700, the default, hides its events from everyone but root)."""
    out = []
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "tracefs":
                    out.append(left.split()[4])
    except OSError:
        pass
    return out


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


# Capability bits (include/uapi/linux/capability.h) and what tcptrace needs them for.
CAPS = {"CAP_DAC_OVERRIDE": 1, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38,
        "CAP_BPF": 39}
# Without root: load BPF programs and maps (CAP_BPF), attach them to tracepoints and read
# kernel memory in them (CAP_PERFMON), read and write tracefs, which is root's, mode 0700, by
# default (CAP_DAC_OVERRIDE). Measured on 6.18 as uid 65534 with exactly these three.
NEEDED = ("CAP_BPF", "CAP_PERFMON", "CAP_DAC_OVERRIDE")


def capabilities(status="/proc/self/status"):
    """The names of CAPS this process has in effect."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
                    return {n for n, bit in CAPS.items() if eff >> bit & 1}
    except OSError:
        pass
    return set()


def perf_event_paranoid():
    """kernel.perf_event_paranoid, or None where it cannot be read."""
    try:
        with open("/proc/sys/kernel/perf_event_paranoid") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def missing_privileges():
    """What this process lacks to trace: [] as root, else the NEEDED capabilities it does not
    have. CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON (kernels before 5.8 have only
    it), and is needed besides them where perf_event_paranoid is 3 or more: Debian's and
    Ubuntu's kernels then open perf events (a tracepoint's, a kprobe's) for CAP_SYS_ADMIN
    only, whatever CAP_PERFMON says (measured on Debian 12's 6.1: EACCES)."""
    if os.geteuid() == 0:
        return []
    have = capabilities()
    if "CAP_SYS_ADMIN" in have:
        have |= {"CAP_BPF", "CAP_PERFMON"}
    out = [c for c in NEEDED if c not in have]
    level = perf_event_paranoid()
    if "CAP_SYS_ADMIN" not in have and level is not None and level >= 3:
        out.append(f"CAP_SYS_ADMIN (kernel.perf_event_paranoid is {level}: this kernel opens "
                   "perf events for it only; or set it to 2)")
    return out


def privileged():
    return not missing_privileges()


def can_use_bpf():
    return os.geteuid() == 0 or bool(capabilities() & {"CAP_BPF", "CAP_SYS_ADMIN"})


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
        return Check("kprobes", UNKNOWN, "tracefs not readable" if tracefs_mounts()
                     else "tracefs not mounted", "any")
    return Check("kprobes", UNSUPPORTED,
                 "kernel built without CONFIG_KPROBES (no kprobe PMU, no kprobe_events)", "any")


def _map_type(name, map_type, key_size, value_size, max_entries, works, minver):
    """Create (and close) a map of the given type: the kernel's own answer."""
    if NR_BPF is None:
        return Check(name, UNKNOWN, f"no bpf() syscall number for {platform.machine()}", minver)
    if not can_use_bpf():
        return Check(name, UNKNOWN, "needs root or CAP_BPF to ask the kernel", minver)

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


def _offsets(b, fields):
    """{macro: byte offset} of each (macro, struct, member, size) in BTF `b`; BTFError if a
    member is missing or of another size than the program reads."""
    offs = {}
    for macro, struct_, member, size in fields:
        off, got = b.offset(struct_, member)
        if got != size:
            raise btf.BTFError(f"{struct_}.{member} is {got} bytes, not {size}")
        offs[macro] = off
    return offs


def _spans(offs, spans):
    """{PREFIX_LO, PREFIX_LEN} of each group of `spans`: the bytes covering its members at their
    offsets `offs`; BTFError if they lie more than SPAN_MAX bytes apart."""
    sizes = {macro: size for macro, _s, _m, size in RESCUE_FIELDS}
    out = {}
    for prefix, members in spans:
        lo = min(offs[m] for m in members)
        n = max(offs[m] + sizes[m] for m in members) - lo
        if n > SPAN_MAX:
            raise btf.BTFError(f"{', '.join(members)} lie {n} bytes apart (expected <= {SPAN_MAX})")
        out[prefix + "_LO"], out[prefix + "_LEN"] = lo, n
    return out


@functools.lru_cache(maxsize=1)
def _vmlinux_btf(path):
    """The kernel's BTF, parsed once for all the checks below (each reads a few types of it; a
    parse takes about 0.2 s of CPU). checks() drops it when they have run: it holds ~20 MB."""
    return btf.BTF.load(path)


@functools.lru_cache(maxsize=4)
def rescue_offsets(path=None):
    """(Check, {macro: value}) for the recursion rescue, from the running kernel's BTF."""
    name, minver = "recursion rescue", "5.5"
    try:
        b = _vmlinux_btf(path or btf.VMLINUX)
        if b.offset("inet_sock", "sk")[0] != 0:
            raise btf.BTFError("struct inet_sock does not begin with its sock")
        offs = _offsets(b, RESCUE_FIELDS)
        offs.update(_spans(offs, RESCUE_SPANS))
        # THREAD_SIZE, to tell a task's stack from an interrupt stack (bpf/raw.c: tt_level).
        # BTF has no constants; x86_64 sizes its IRQ stacks the same, and arm64 (no such struct)
        # uses 16 KiB with 4 KiB pages.
        offs["SZ_STACK"] = b.struct_size("irq_stack") or 16384
    except btf.BTFError as e:
        return Check(name, UNSUPPORTED, f"{e}: regular tracepoint programs instead of raw ones; "
                     "hits the kernel skips while another BPF program runs on the CPU are "
                     "reported as lost, not recovered", minver), {}
    return Check(name, SUPPORTED, "struct offsets from BTF: programs on raw tracepoints, which "
                 "no other BPF program blocks, each with a twin for the hits it is skipped for",
                 minver), offs


# The tracepoints bpf/raw.c's programs take hits from (tcptrace/kernel/loader.py: HOOKS).
RAW_HOOKS = ("inet_sock_set_state", "tcp_receive_reset", "inet_sk_error_report",
             "tcp_retransmit_skb")


@functools.lru_cache(maxsize=4)
def typed_tracepoints(path=None):
    """(Check, {macro: BTF id}) for loading bpf/raw.c's programs as typed tracepoints (tp_btf),
    which read the socket's members directly instead of a probe read (a helper call) each: the
    id of each hook's `btf_trace_<name>` typedef in the running kernel's BTF, as TP_<NAME>.
    Needs what the rescue needs (raw.c) and the typedef of inet_sock_set_state; the kernel's
    verifier has the last word when the loader loads them (it falls back to raw tracepoints)."""
    name, minver = "typed tracepoints", "5.5"
    check, _ = rescue_offsets(path)
    if check.status != SUPPORTED:
        return Check(name, UNSUPPORTED, f"needs the recursion rescue's BTF offsets ({check.detail})",
                     minver), {}
    b = _vmlinux_btf(path or btf.VMLINUX)
    ids = {f"TP_{tp.upper()}": b.tracepoint_id(tp) for tp in RAW_HOOKS}
    ids = {k: v for k, v in ids.items() if v is not None}
    if "TP_INET_SOCK_SET_STATE" not in ids:
        return Check(name, UNSUPPORTED, "BTF has no btf_trace_inet_sock_set_state", minver), {}
    return Check(name, SUPPORTED, "the raw tracepoint programs load as tp_btf and read the "
                 "socket directly (no probe read per member)", minver), ids


@functools.lru_cache(maxsize=4)
def sock_id_offsets(path=None):
    """(Check, {macro: value}): where a socket's network namespace, family and local port are,
    from the running kernel's BTF (bpf/listen.c: tt_sock_id)."""
    name, minver = "socket namespaces", "5.5"
    try:
        offs = _offsets(_vmlinux_btf(path or btf.VMLINUX), SOCK_ID_FIELDS)
    except btf.BTFError as e:
        return Check(name, UNSUPPORTED, f"{e}: listener facts are matched to listeners by "
                     "address and port alone", minver), {}
    return Check(name, SUPPORTED, "a listener's network namespace, family and port read at "
                 "offsets from BTF: SYN-ACK retransmits and overflows name their listener in "
                 "any namespace", minver), offs


@functools.lru_cache(maxsize=4)
def connect_regs(path=None):
    """(Check, {macro: value}): where connect()'s arguments and socket are at its return, from
    the running kernel's BTF, and whether it has bpf_task_pt_regs() to find the registers."""
    name, minver = "connect() at its return", "5.15"
    try:
        b = _vmlinux_btf(path or btf.VMLINUX)
        if "BPF_FUNC_task_pt_regs" not in (b.enum("bpf_func_id") or {}):
            raise btf.BTFError("no bpf_task_pt_regs() helper")
        offs = _offsets(b, CONNECT_REGS_FIELDS)
    except btf.BTFError as e:
        return Check(name, UNSUPPORTED, f"{e}: the syscall hook keeps connect()'s arguments "
                     "from a program on its entry, which slows every system call", minver), {}
    return Check(name, SUPPORTED, "connect()'s arguments and socket read at its return (BTF "
                 "offsets): the syscall hook needs no program on sys_enter_connect, which "
                 "would slow every system call", minver), offs


@functools.lru_cache(maxsize=4)
def overflow_args(path=None):
    """(Check, {macro: value}): which raw argument of skb:kfree_skb is the drop reason and which
    the receiving socket (rx_sk), and the running kernel's number for TCP_LISTEN_OVERFLOW."""
    name, minver = "listen overflow drops", ">6.1"
    try:
        b = _vmlinux_btf(path or btf.VMLINUX)
        args = b.tracepoint_args("kfree_skb")
        reasons = b.enum("skb_drop_reason") or {}
    except btf.BTFError as e:
        return Check(name, UNSUPPORTED, f"{e}: overflows are counted per namespace only "
                     "(ListenOverflows)", minver), {}
    why = None
    if args is None:
        why = "BTF does not describe skb:kfree_skb"
    elif "enum skb_drop_reason" not in args:
        why = "skb:kfree_skb has no drop reason (5.17+)"
    elif "struct sock *" not in args:
        why = "skb:kfree_skb does not name the receiving socket (rx_sk)"
    elif LISTEN_OVERFLOW not in reasons:
        why = "this kernel has no TCP_LISTEN_OVERFLOW drop reason"
    if why:
        return Check(name, UNSUPPORTED, f"{why}: an accept queue full at the final ACK is "
                     "counted per namespace only (ListenOverflows)", minver), {}
    return Check(name, SUPPORTED, "accept queue full at the final ACK, counted per listener "
                 "(skb:kfree_skb reason TCP_LISTEN_OVERFLOW names rx_sk)", minver), {
        "KFREE_REASON_ARG": args.index("enum skb_drop_reason"),
        "KFREE_SK_ARG": args.index("struct sock *"),
        "REASON_LISTEN_OVERFLOW": reasons[LISTEN_OVERFLOW]}


@functools.lru_cache(maxsize=4)
def reset_reasons(path=None):
    """(Check, {macro: value}): which raw argument of tcp_send_reset is its reason (6.10+),
    and {number: name} of the running kernel's reasons (names without SK_RST_REASON_)."""
    name, minver = "reset reasons", ">6.1"
    try:
        b = _vmlinux_btf(path or btf.VMLINUX)
        args = b.tracepoint_args("tcp_send_reset") or []
        values = b.enum("sk_rst_reason") or {}
    except btf.BTFError as e:
        args, values, why = [], {}, str(e)
    else:
        why = "tcp_send_reset carries no reason on this kernel"
    if "enum sk_rst_reason" not in args:
        return Check(name, UNSUPPORTED, f"{why}: resets a listener sends are counted without "
                     "one", minver), {}, {}
    names = {v: k.removeprefix("SK_RST_REASON_") for k, v in values.items()}
    return Check(name, SUPPORTED, "why each reset was sent (enum sk_rst_reason, numbers from "
                 "BTF): e.g. TCP_FLAGS for ACKs a listener has no SYN cookie for", minver), \
        {"RST_REASON_ARG": args.index("enum sk_rst_reason")}, names


# What an Option's `consts` names: (Check, {macro: value}) read from the running kernel, which
# the loader compiles in as -DTT_<macro>=<value> with the option's switches.
CONSTS = {"rescue": rescue_offsets, "typed": typed_tracepoints, "sock_id": sock_id_offsets,
          "connect_regs": connect_regs, "overflow": overflow_args,
          "rst_reason": lambda: reset_reasons()[:2]}


@dataclass(frozen=True)
class Option:
    """One value a switch of the plan can take: the check it needs ("" for none), the -D
    switches bpf/ is compiled with for it, what to say when it is taken instead of the best
    option (formatted with that option's check: {name}, {status}, {detail}), and the values
    from the running kernel it is compiled with (a key of CONSTS: struct offsets, argument
    positions, enum values), kept in Plan.consts."""
    value: object
    needs: str = ""
    cflags: tuple = ()
    note: str = ""
    consts: str = ""


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
    _hook("tcp:tcp_retransmit_synack", "TT_HOOK_SYNACK"),
    Switch("rescue", (
        Option(True, "recursion rescue", ("-DTT_RESCUE=1",), consts="rescue"),
        Option(False, note="recursion rescue {status}: {detail}"))),
    Switch("typed", (
        Option(True, "typed tracepoints", ("-DTT_TYPED=1",), consts="typed"),
        Option(False, note="typed tracepoints {status}: {detail}"))),
    Switch("sock_id", (
        Option(True, "socket namespaces", ("-DTT_SOCK_ID=1",), consts="sock_id"),
        Option(False, note="socket namespaces {status}: {detail}"))),
    Switch("overflow", (
        Option(True, "listen overflow drops", ("-DTT_LISTEN_OVERFLOW=1",), consts="overflow"),
        Option(False, note="listen overflow drops {status}: {detail}"))),
    Switch("rst_reason", (
        Option(True, "reset reasons", ("-DTT_RST_REASON=1",), consts="rst_reason"),
        Option(False, note="reset reasons {status}: {detail}"))),
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
    # Only the syscall hook reads this: the kprobes see the arguments at tcp_v{4,6}_connect.
    Switch("connect_regs", (
        Option(True, "connect() at its return", ("-DTT_CONNECT_REGS=1",), consts="connect_regs"),
        Option(False, note="connect() at its return {status}: {detail}"))),
)


@dataclass
class Plan:
    """What the tracer will attach, and how events reach user space."""
    transport: str = "perf"
    tracepoints: list = field(default_factory=list)     # names from TRACEPOINTS / RAW_TRACEPOINTS
    connect_hook: str = "none"                           # kprobe | syscall | none
    rescue: bool = False                                 # bpf/raw.c (BTF offsets)
    typed: bool = False                                  # bpf/raw.c's programs as tp_btf
    hold: bool = False                                   # bpf/hold.c (queue maps)
    sock_id: bool = False                                # bpf/listen.c: a listener's namespace
    overflow: bool = False                               # bpf/listen.c: kfree_skb overflows
    rst_reason: bool = False                             # tcp_send_reset's reason
    connect_regs: bool = False                           # bpf/connect.c: no sys_enter program
    # switch name -> {macro: value} read from the running kernel for the option it took
    # (Option.consts): compiled in as -DTT_<macro>=<value>
    consts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def choice(self, switch):
        """The value this plan took for a Switch."""
        if switch.hook:
            return switch.name in self.tracepoints
        return getattr(self, switch.name)

    def take(self, switch, value, consts=None):
        if switch.hook:
            if value:
                self.tracepoints.append(switch.name)
        else:
            setattr(self, switch.name, value)
        if consts:
            self.consts[switch.name] = dict(consts)

    def describe(self):
        hook = {"kprobe": "kprobes on tcp_v4_connect/tcp_v6_connect",
                "syscall": "syscalls:sys_exit_connect (kprobes unavailable)"
                if self.connect_regs else
                "syscalls:sys_{enter,exit}_connect (kprobes unavailable)",
                "none": "none"}[self.connect_hook]
        return (f"transport {self.transport}; tracepoints {', '.join(self.tracepoints)}; "
                f"connect errors via {hook}; recursion rescue {'on' if self.rescue else 'off'}"
                f"{' (typed tracepoints)' if self.rescue and self.typed else ''}; "
                f"held opens {'on' if self.hold else 'off'}; listener namespaces "
                f"{'on' if self.sock_id else 'off'}; listen overflows "
                f"{'per listener' if self.overflow else 'per namespace'}")


def _leftovers(td):
    from tcptrace.kernel.tally import Tally
    return Tally.leftovers(td)


def checks():
    lacking = missing_privileges()
    out = [Check("privileges", UNSUPPORTED if lacking else SUPPORTED,
                 "root" if os.geteuid() == 0 else
                 f"not root; lacking {', '.join(lacking)}" if lacking else
                 f"not root, with {', '.join(NEEDED)}" + (
                     "" if "CAP_SYS_PTRACE" in capabilities() else
                     "; without CAP_SYS_PTRACE the owners of other users' sockets are unknown"),
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
    mounted = tracefs_mounts()
    if td:
        out.append(Check("tracefs", SUPPORTED, td, required=True))
    elif mounted:
        out.append(Check("tracefs", UNSUPPORTED, f"mounted on {mounted[0]} but not readable by "
                         f"uid {os.geteuid()} (tracefs is root's, mode 0700, by default): run "
                         "as root, or with CAP_DAC_OVERRIDE", required=True))
    else:
        out.append(Check("tracefs", UNSUPPORTED, "not mounted: mount -t tracefs tracefs "
                         "/sys/kernel/tracing", required=True))
    for name, path, minver, required, why in TRACEPOINTS + RAW_TRACEPOINTS:
        if td is None:
            st, detail = UNKNOWN, "tracefs not readable" if mounted else "tracefs not mounted"
        elif os.path.isdir(os.path.join(td, "events", path)):
            st, detail = SUPPORTED, why
        else:
            st, detail = UNSUPPORTED, f"missing: {why} is lost"
        out.append(Check(name, st, detail, minver, required))
    out.append(_kprobes())
    out += [consts()[0] for consts in CONSTS.values()]
    _vmlinux_btf.cache_clear()
    if td is None:
        out.append(Check("transition tally", UNKNOWN,
                         "tracefs not readable" if mounted else "tracefs not mounted", "3.10"))
    elif os.path.isdir(os.path.join(td, "instances")) and _leftovers(td):
        names = _leftovers(td)
        out.append(Check("transition tally", SUPPORTED, f"{len(names)} stale instance(s) left by "
                         f"a tcptrace that was killed ({', '.join(names[:3])}) still count "
                         "every transition: `tcptrace doctor --fix` (or the next start) "
                         "removes them", "3.10"))
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


def plan(transport="auto", checks_=None, consts=None):
    """The plan for this machine: for each switch, the best option whose check passed, and a
    note where that is not the best there is. `checks_` and `consts` ({switch name: {macro:
    value}} for the options that need values from the kernel) are read from the machine unless
    given (tests give them)."""
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
        values = None
        if taken.consts:
            values = CONSTS[taken.consts]()[1] if consts is None else consts.get(sw.name, {})
        p.take(sw, taken.value, values)
    return p


def _passed(cs, name):
    return name in cs and cs[name].status == SUPPORTED


def require(checks_):
    """Raise the documented error for the first required check that fails."""
    cs = {c.name: c for c in checks_}
    if cs["privileges"].status != SUPPORTED:
        raise errors.NotPrivileged(f"tracing needs root, or {', '.join(NEEDED)} "
                                   f"({cs['privileges'].detail}); try: sudo tcptrace ...")
    if cs["tracefs"].status != SUPPORTED and "not readable" in cs["tracefs"].detail:
        raise errors.NotPrivileged("tracefs " + cs["tracefs"].detail)
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
