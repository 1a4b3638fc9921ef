"""A plan to running programs: bpf/tcptrace.c compiled with the plan's -D switches, attached,
and told the runtime options. The only module that imports bcc (and only when a plan is
loaded), so `--help`, `replay` and the unit tests run without it.
"""
import contextlib
import ctypes
import os
import re
import time

from importlib.resources import files as _res_files

from tcptrace import errors, histogram
from tcptrace.kernel import bpfsys, probes
from tcptrace.kernel.bpfsys import LIBC, prog_stats
from tcptrace.lifecycle import rules
from tcptrace.wire import Kind

# The hooks whose programs sit on raw tracepoints where BTF gives the socket's offsets (plan.rescue;
# bpf/raw.c: tt_prog_<hook>, then its twin tt_rescue_<hook>), and on the regular tracepoint, named
# as BCC names it, otherwise: (hook, raw tracepoint, tracepoint program, the Kind of its `hits`
# and `rescued` slots, the plan's hook name or None when every plan has it).
HOOKS = (
    ("state", "inet_sock_set_state", "tracepoint__sock__inet_sock_set_state", Kind.STATE, None),
    ("recv_reset", "tcp_receive_reset", "tracepoint__tcp__tcp_receive_reset", Kind.RECV_RESET,
     "tcp:tcp_receive_reset"),
    ("sock_error", "inet_sk_error_report", "tracepoint__sock__inet_sk_error_report",
     Kind.SOCK_ERROR, "sock:inet_sk_error_report"),
    ("retrans", "tcp_retransmit_skb", "tracepoint__tcp__tcp_retransmit_skb", Kind.RETRANS,
     "tcp:tcp_retransmit_skb"),
)


def bpf_dir():
    """Where bpf/*.c lives: inside the installed package, or bpf/ of a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.join(os.path.dirname(os.path.dirname(here)), "bpf")
    if os.path.exists(os.path.join(checkout, "tcptrace.c")):
        return checkout
    p = str(_res_files("tcptrace.bpf"))
    if os.path.exists(os.path.join(p, "tcptrace.c")):
        return p
    raise errors.Unavailable("BPF sources not found (a broken install: bpf/tcptrace.c missing)")


_PART = re.compile(r'#include "(\w+\.c)"\s*$')


def source():
    """bpf/tcptrace.c with each part it #includes ("x.c") put in place: one text for BCC. BCC
    rewrites map calls (`socks.lookup(&k)`) and tracepoint arguments only in the main text it
    is given; in a file the compiler includes, a map call stays an indirect call the verifier
    refuses. #line markers keep the compiler's messages naming each part's own file and line.
    The text is the same for every plan: options reach the program as -D switches and maps."""
    d = bpf_dir()
    main = os.path.join(d, "tcptrace.c")
    out = [f'#line 1 "{main}"\n']
    with open(main) as f:
        for n, line in enumerate(f, 1):
            m = _PART.match(line)
            if m is None:
                out.append(line)
                continue
            part = os.path.join(d, m.group(1))
            with open(part) as p:
                out += [f'#line 1 "{part}"\n'] + p.readlines()
            out.append(f'\n#line {n + 1} "{main}"\n')
    return "".join(out)


def cflags(plan, ringbuf_pages):
    """The compiler flags for a plan: the -D switches of the options it took (probes.SWITCHES)
    with the values from the running kernel they need (Plan.consts: struct offsets, argument
    positions, enum values), the fixed sizes, and the grouping rules (lifecycle/rules.py, as
    function-like macros, which BCC's clang takes as -D like any other)."""
    flags = [f"-I{bpf_dir()}", f"-DTT_RINGBUF_PAGES={ringbuf_pages}",
             "-Wno-macro-redefined", "-Wno-unused-function"] + rules.cflags()
    flags += [f"-DTT_{k}={v}" for k, v in histogram.c_defines().items()]
    for sw in probes.SWITCHES:
        flags += sw.option(plan.choice(sw)).cflags
    consts = {}
    for values in plan.consts.values():     # switches may share a macro (the same member)
        consts.update(values)
    flags += [f"-DTT_{k}={v}" for k, v in sorted(consts.items())]
    if plan.rescue and os.environ.get("TCPTRACE_TEST_RESCUE_ONLY") == "1":
        # Tests only: the first programs step aside and the twins handle every hit, so their
        # field reads are checked against real sockets (tests/kernel/test_foundation.py).
        flags.append("-DTT_RESCUE_ONLY=1")
    return flags


@contextlib.contextmanager
def _stdout_to_stderr():
    """BCC and clang may print to fd 1; the JSON stream must never see it."""
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def release_compiler_memory():
    """Give back what compiling cost: clang/LLVM (inside libbcc) touch ~120 MB of their own code
    and data pages and leave freed heap behind, none of it needed once the programs are loaded.
    Clean file-backed pages are dropped with MADV_PAGEOUT (5.4+; they would be re-read from disk
    if ever touched again) and the heap is trimmed. Returns the bytes of mappings advised."""
    libc = LIBC
    with contextlib.suppress(AttributeError):
        libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    MADV_PAGEOUT = 21
    advised = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or not any(k in parts[5] for k in ("libbcc", "libLLVM", "libclang")):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if libc.madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
            advised += hi - lo
    return advised


class _TypedRefused(Exception):
    """The kernel refused a typed tracepoint program (or BTF lacks its tracepoint's type)."""


def _name(n):
    return n.decode() if isinstance(n, bytes) else n


class Programs:
    """bpf/tcptrace.c compiled for a plan, its programs attached: BCC attaches the tracepoint
    programs while loading, the raw tracepoint programs of HOOKS are attached here, each before
    its twin. `b` is the BCC module (maps by name); `hook_progs` maps each hook's Kind to the
    program that takes its hits; `twins` maps each of those programs that has a twin to that
    Kind (its `rescued` slot); `typed` holds the fds of those loaded as typed tracepoints."""

    def __init__(self, plan, ringbuf_pages):
        self.notes = []
        self.twins = {}
        self._raw_fds = []          # attachments (links) to close
        self.typed = {}             # programs loaded as typed tracepoints (tp_btf): name -> fd
        self.compile_s = 0.0
        self.b = self._compile(plan, ringbuf_pages)
        hooks = set(plan.tracepoints)
        mine = [h for h in HOOKS if h[4] is None or h[4] in hooks]
        if plan.rescue:
            self.hook_progs = {kind: f"tt_prog_{hook}" for hook, _r, _t, kind, _p in mine}
            try:
                try:
                    self._attach_raw(mine, plan)
                except _TypedRefused as e:
                    # The verifier has the last word on what BTF promised: raw tracepoint
                    # programs instead, which need the program compiled without TT_TYPED
                    self.close()
                    plan.typed = False
                    self.notes.append(f"typed tracepoints refused ({e}): raw tracepoint "
                                      "programs instead, reading the socket by probe reads")
                    self.twins = {}
                    self.b = self._compile(plan, ringbuf_pages)
                    self._attach_raw(mine, plan)
            except Exception:
                self.close()
                raise
        else:
            self.hook_progs = {kind: prog for _h, _r, prog, kind, _p in mine}
        release_compiler_memory()

    def _compile(self, plan, ringbuf_pages):
        """The BCC module of bpf/tcptrace.c for the plan; its time is added to compile_s."""
        try:
            import bcc
        except ImportError:
            raise errors.Unavailable("python3 module 'bcc' missing: apt-get install python3-bpfcc")
        t0 = time.monotonic()
        try:
            with _stdout_to_stderr():
                return bcc.BPF(text=source().encode(), cflags=cflags(plan, ringbuf_pages))
        except Exception as e:   # BCC raises bare Exception for compile and attach failures
            raise errors.Unavailable(f"loading the BPF programs failed: {e}") from e
        finally:
            self.compile_s += time.monotonic() - t0

    def _attach_raw(self, hooks, plan):
        """Attach each hook's program, then its twin: a tracepoint calls its probes in the order
        they were attached, and the twin decides by what ran before it on the same hit. Typed
        tracepoint programs (plan.typed) are loaded here, from the bytecode BCC compiled (BCC
        loads tp_btf programs of no name it knows); _TypedRefused if the kernel refuses any of
        them, which the caller answers with raw tracepoint programs."""
        if plan.typed:
            ids = plan.consts.get("typed", {})
            attach = lambda name, raw: self._attach_typed(name, raw, ids)   # noqa: E731
        else:
            attach = self._attach
        for hook, raw, _tp, kind, _plan_name in hooks:
            first = f"tt_prog_{hook}"
            try:
                attach(first, raw)
            except _TypedRefused:
                raise
            except Exception as e:     # BCC raises bare Exception
                raise errors.Unavailable(f"attaching {first} to raw tracepoint {raw} failed: {e}")
            try:
                attach(f"tt_rescue_{hook}", raw)
            except _TypedRefused:
                raise
            except Exception as e:
                # The program's misses are then reported as lost, as without a twin.
                self.notes.append(f"recursion rescue off for {raw}: {e}")
                continue
            self.twins[first] = kind

    def _attach_typed(self, name, raw, ids):
        """Load BCC's bytecode of program `name` as a typed tracepoint program of `raw` (its
        BTF id from `ids`, the plan's consts) and attach it."""
        btf_id = ids.get(f"TP_{raw.upper()}")
        if btf_id is None:
            raise _TypedRefused(f"no btf_trace_{raw} in BTF")
        try:
            fd = bpfsys.load_typed_tracepoint(self.b.dump_func(name.encode()), name, btf_id)
        except OSError as e:
            raise _TypedRefused(f"{name}: {e.strerror}") from e
        self.typed[name] = fd
        self._raw_fds.append(bpfsys.attach_typed_tracepoint(fd))

    def _attach(self, name, raw):
        import bcc
        from bcc.libbcc import lib
        with _stdout_to_stderr():
            fn = self.b.load_func(name.encode(), bcc.BPF.RAW_TRACEPOINT)
        # Not BPF.attach_raw_tracepoint: it keeps one program per tracepoint.
        fd = lib.bpf_attach_raw_tracepoint(fn.fd, raw.encode())
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"attaching {name} failed")
        self._raw_fds.append(fd)

    def table(self, name):
        """A map of the loaded programs, by its name in bpf/ (BCC takes names as bytes)."""
        return self.b[name.encode()]

    def record_type(self):
        """The ctypes struct BCC built for tt_event from the compiled program."""
        return type(self.table("events").event(ctypes.create_string_buffer(512)))

    def configure(self, families, ports, hold_us, fold=False):
        """The runtime options, into the `config` and `ports` maps (bpf/config.c)."""
        pm = self.table("ports")
        for p in ports:
            pm[pm.Key(p)] = pm.Leaf(1)
        cfg = self.table("config")
        v = cfg[ctypes.c_int(0)]
        v.family = families[0] if len(families) == 1 else 0
        v.port_filter = 1 if ports else 0
        v.hold_us = hold_us
        v.fold = 1 if fold else 0
        cfg[ctypes.c_int(0)] = v
        # Armed last, in its own update: the programs emit nothing until every filter is in.
        v.armed = 1
        cfg[ctypes.c_int(0)] = v

    def prog_stats(self, twins=True):
        """{program name: (run_cnt, run_time_ns, recursion_misses)} of every loaded program;
        twins=False: but the twins (tt_rescue*), which lose nothing when skipped
        (kernel/losses.py reads the others on every drain)."""
        out = {}
        fds = {_name(name): fn.fd for name, fn in self.b.funcs.items()} | self.typed
        for name, fd in fds.items():
            if not twins and name.startswith("tt_rescue"):
                continue
            st = prog_stats(fd)
            if st is not None:
                out[name] = st
        return out

    def close(self):
        for fd in self._raw_fds + list(self.typed.values()):
            os.close(fd)
        self._raw_fds = []
        self.typed = {}
        with contextlib.suppress(Exception):
            self.b.cleanup()
