"""tcptrace command line. Options are declared once, as data, and shared by every command that
takes them; docs/tcptrace.8.md is generated from these definitions (tcptrace/manpage.py)."""
import contextlib
import json
import math
import os
import sys
import textwrap
import traceback

import click

from tcptrace import __version__, errors

TASK_COMM_LEN = 16      # include/linux/sched.h: command names are at most 15 characters


class Seconds(click.ParamType):
    """A finite number of seconds above a minimum: nan and inf are no time a run can mean."""
    name = "seconds"

    def __init__(self, minimum=0.0, open_min=True):
        self.minimum, self.open_min = minimum, open_min

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            v = value
        else:
            try:
                v = float(value)
            except ValueError:
                self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if v < self.minimum or (self.open_min and v == self.minimum):
            self.fail(f"{value} is not {'above' if self.open_min else 'at least'} "
                      f"{self.minimum:g} seconds", param, ctx)
        return v


def _comm(ctx, param, values):
    for v in values:
        if not v:
            raise click.BadParameter("an empty command name matches nothing", ctx, param)
        if len(v.encode()) >= TASK_COMM_LEN:
            raise click.BadParameter(
                f"{v!r} is longer than the kernel's command names ({TASK_COMM_LEN - 1} bytes: "
                f"it would match nothing); give its first {TASK_COMM_LEN - 1}: "
                f"{v.encode()[:TASK_COMM_LEN - 1].decode(errors='ignore')!r}", ctx, param)
    return values


def _ready_file(ctx, param, path):
    """A path tcptrace may create and remove: a regular file or nothing yet, in a directory
    that exists. Checked before anything is compiled."""
    if path is None:
        return None
    if os.path.lexists(path) and not os.path.isfile(path):
        raise click.BadParameter(f"{path} exists and is not a regular file", ctx, param)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise click.BadParameter(f"directory {d} does not exist", ctx, param)
    if not os.access(d, os.W_OK):
        raise click.BadParameter(f"directory {d} is not writable", ctx, param)
    return path


def _record_file(ctx, param, path):
    """Where --record writes: a new file, an empty one, or a device or pipe. A regular file that
    holds something is the user's (an earlier recording, often), and is never overwritten.
    Checked before anything is compiled."""
    if path is not None and os.path.isfile(path) and os.path.getsize(path) > 0:
        raise click.BadParameter(f"{path} exists and is not empty: tcptrace does not overwrite "
                                 "it (remove it, or name another file)", ctx, param)
    return path


def _only(ctx, param, values):
    """--only connect,refused --only stuck -> the set of finding types; unknown ones refused."""
    from tcptrace.findings import TYPES
    got = set()
    for v in values:
        for t in v.split(","):
            t = t.strip()
            if t not in TYPES:
                raise click.BadParameter(f"{t!r} is not a finding type (one of: "
                                         f"{', '.join(TYPES)})", ctx, param)
            got.add(t)
    return frozenset(got)


FILTER_OPTIONS = (
    (("--pid",), dict(type=click.IntRange(min=1), multiple=True, metavar="PID",
                      help="Only connections owned by this process (repeatable).")),
    (("--comm",), dict(multiple=True, metavar="NAME", callback=_comm,
                       help="Only connections owned by processes with this name (repeatable; "
                            "at most 15 characters, as the kernel keeps them).")),
    (("--port",), dict(type=click.IntRange(1, 65535), multiple=True, metavar="PORT",
                       help="Only connections with this local or remote port (repeatable; "
                            "applied in the kernel).")),
    (("--laddr",), dict(multiple=True, metavar="ADDR[/LEN]",
                        help="Only this local address or CIDR (repeatable).")),
    (("--raddr",), dict(multiple=True, metavar="ADDR[/LEN]",
                        help="Only this remote address or CIDR (repeatable).")),
    (("-4", "--ipv4"), dict(is_flag=True, help="IPv4 only (applied in the kernel).")),
    (("-6", "--ipv6"), dict(is_flag=True, help="IPv6 only (applied in the kernel).")),
)

ANALYSIS_OPTIONS = (
    (("--stuck-after",), dict(type=Seconds(0.001, open_min=False), default=30.0,
                              show_default=True,
                              metavar="SECONDS",
                              help="Report a socket lingering this long in CLOSE_WAIT, FIN_WAIT1, "
                                   "FIN_WAIT2, LAST_ACK or CLOSING.")),
    (("--pressure-interval",), dict(type=Seconds(0.1, open_min=False), default=5.0,
                                    show_default=True, metavar="SECONDS",
                                    help="Report a listener under pressure (dropping SYNs, "
                                         "retransmitting SYN-ACKs, accept queue full) at most "
                                         "this often while it lasts, and as recovered after "
                                         "this long without.")),
    (("--json",), dict(is_flag=True, help="JSON Lines on stdout (docs/tcptrace.schema.json).")),
    (("--max-conns",), dict(type=click.IntRange(min=16), default=262_144, show_default=True,
                            help="Connections tracked at once; the oldest are "
                                 "evicted beyond this, and counted.")),
    (("--port-pressure",), dict(type=click.FloatRange(0, 100, min_open=True), default=80.0,
                                show_default=True, metavar="PERCENT",
                                help="Report a destination whose TIME_WAIT and connected "
                                     "sockets use this share of the local port range "
                                     "(ip_local_port_range) of their namespace.")),
)

LIVE_OPTIONS = (
    (("--duration",), dict(type=Seconds(), metavar="SECONDS",
                           help="Stop after this long (default: until Ctrl-C or SIGTERM).")),
    (("--ready-file",), dict(callback=_ready_file, metavar="PATH",
                             help="Write this file (JSON: pid, plan) once the probes are "
                                  "attached; removed at exit.")),
    (("--record",), dict(type=click.Path(dir_okay=False), callback=_record_file, metavar="FILE",
                         help="Also write the raw event stream to FILE, for `tcptrace replay` "
                              "(a new or empty file: one with content is not overwritten).")),
    (("--transport",), dict(type=click.Choice(["auto", "ringbuf", "perf"]), default="auto",
                            show_default=True,
                            help="How events reach user space: the BPF ring buffer where the "
                                 "kernel has one, else per-CPU perf buffers.")),
    (("--no-seed",), dict(is_flag=True, help="Do not load sockets that existed before start.")),
    (("--full-stream",), dict(is_flag=True,
                              help="Send every connection's records to user space. Without "
                                   "it, report, metrics and watch --only (without connect, "
                                   "accept, close) let the kernel count healthy short "
                                   "connections instead (percentiles then come from "
                                   "histogram buckets, within 4.5%).")),
)

WATCH_OPTIONS = (
    (("--transitions",), dict(is_flag=True, help="Also show every raw state transition.")),
    (("--only", "-o"), dict(multiple=True, callback=_only, metavar="TYPE[,TYPE...]",
                            help="Only these findings (repeatable), e.g. refused,failed,reset,"
                                 "stuck; lost and evicted are always shown. Without connect, "
                                 "accept and close, healthy short connections are counted in "
                                 "the kernel and never sent (see --full-stream).")),
    (("--wide", "-w"), dict(is_flag=True, help="Do not fold lines to 80 columns.")),
)

REPORT_OPTIONS = (
    (("--interval",), dict(type=Seconds(), metavar="SECONDS",
                           help="Print the tables every SECONDS (and reset them).")),
)


def _listen(ctx, param, value):
    """ADDR:PORT (an IPv6 address in brackets) -> (addr, port)."""
    addr, sep, port = value.rpartition(":")
    addr = addr.strip("[]")
    try:
        import ipaddress
        ipaddress.ip_address(addr)
        port = int(port)
        if not sep or not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{value!r} is not ADDR:PORT (e.g. 127.0.0.1:9977)", ctx,
                                 param) from None
    return addr, port


METRICS_OPTIONS = (
    (("--listen",), dict(default="127.0.0.1:9977", show_default=True, callback=_listen,
                         metavar="ADDR:PORT",
                         help="Serve /metrics there. Loopback by default: the metrics name the "
                              "hosts and services this one talks to, and an exporter has no "
                              "authentication; give 0.0.0.0:PORT for a Prometheus elsewhere.")),
    (("--by",), dict(type=click.Choice(["dest", "port", "comm"]), default="dest",
                     show_default=True,
                     help="What labels connects: the destination (addr:port; accepts by local "
                          "port), the port alone, or the command name.")),
)


def options(*groups):
    def deco(f):
        for group in reversed(groups):
            for decls, kw in reversed(group):
                f = click.option(*decls, **kw)(f)
        return f
    return deco


_diag = errors.say


def _silence_stdout():
    """After an output error: point fd 1 at /dev/null, so what is still buffered for it cannot
    fail again when the interpreter exits."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _check_std_fds():
    """A closed stderr becomes /dev/null (diagnostics are not worth failing for, and a file
    opened later must not land on fd 2, where BCC and clang write). A closed stdout is an
    error: there is nowhere to put the output, and it must not land in a file we open."""
    for fd in (2, 1):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
            if fd == 1:
                raise errors.OutputError("standard output is closed")
            sys.stderr = open(os.devnull, "w")


def _build_options(kw, report=False, metrics=False):
    from tcptrace import filters
    from tcptrace.options import Options
    try:
        laddr = [filters.parse_net(a) for a in kw.get("laddr", ())]
        raddr = [filters.parse_net(a) for a in kw.get("raddr", ())]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--laddr/--raddr")
    if kw.get("ipv4") and kw.get("ipv6"):
        raise click.UsageError("-4 and -6 together mean both: give neither")
    flt = filters.build(pid=kw.get("pid", ()), comm=kw.get("comm", ()), port=kw.get("port", ()),
                        laddr=laddr, raddr=raddr, ipv4=kw.get("ipv4"), ipv6=kw.get("ipv6"),
                        only=kw.get("only", ()))
    return Options(transitions=kw.get("transitions", False), json=kw.get("json", False),
                   report=report, interval=kw.get("interval"), duration=kw.get("duration"),
                   stuck_after=kw.get("stuck_after", 30.0), ready_file=kw.get("ready_file"),
                   pressure_interval=kw.get("pressure_interval", 5.0),
                   record=kw.get("record"), transport=kw.get("transport", "auto"),
                   wide=kw.get("wide", False), filter=flt, max_conns=kw.get("max_conns", 262_144),
                   seed=not kw.get("no_seed", False), metrics=metrics,
                   listen=kw.get("listen", ("127.0.0.1", 9977)), by=kw.get("by", "dest"),
                   port_pressure=kw.get("port_pressure", 80.0) / 100,
                   full_stream=kw.get("full_stream", False))


def _live(opts):
    from tcptrace import session
    from tcptrace.kernel import probes
    cs = probes.checks()
    probes.require(cs)
    plan = probes.plan(opts.transport, cs)
    if opts.transport == "ringbuf" and {c.name: c for c in cs}["ringbuf"].status == probes.UNSUPPORTED:
        raise errors.Unavailable("--transport ringbuf: this kernel has no BPF ring buffer (5.8+)")
    session.run_live(opts, plan, _diag)


@contextlib.contextmanager
def _stdout_errors():
    """Output to stdout as the sinks treat it: a reader that went away ends the command
    quietly, any other failure is an OutputError (exit 74)."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except OSError as e:
        raise errors.OutputError(f"cannot write output: {e.strerror}") from None


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except errors.OutputError:
            _silence_stdout()
            raise
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            ctx.exit(errors.EXIT_INTERRUPTED)
        except Exception as e:     # a bug: say so in one line; --debug shows where
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            raise errors.TcptraceError(f"internal error: {type(e).__name__}: {e} "
                                       "(rerun with --debug for the traceback)")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tcptrace")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx, debug):
    """Trace TCP connection lifecycles with eBPF: handshake latency, refused and failed
    connects, resets, closes, and half-closed sockets stuck in CLOSE_WAIT or FIN_WAIT2.

    \b
    Exit codes:
      0   success (also after Ctrl-C, SIGTERM or a closed output pipe)
      2   bad option or argument
      65  malformed or truncated recording
      66  recording missing or unreadable
      69  a required kernel or BCC feature is missing
      70  internal error
      74  output cannot be written (stdout or the recording full, closed or failing)
      77  not privileged
      130 interrupted before tracing began
    """
    ctx.obj = {"debug": debug}
    if ctx.invoked_subcommand and "--help" not in sys.argv[1:] and "-h" not in sys.argv[1:]:
        _check_std_fds()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--transport", type=click.Choice(["auto", "ringbuf", "perf"]), default="auto",
              help="Plan for this transport instead of the automatic choice.")
@click.option("--fix", is_flag=True,
              help="Remove what a killed tcptrace left behind (its tracefs instance).")
def doctor(as_json, transport, fix):
    """Check this machine: privileges, BCC, headers, tracefs, each hook, and the attach plan.

    Exits 0 when the tracer can run here, else with the code `watch` would exit with."""
    from tcptrace.kernel import probes
    if fix:
        from tcptrace.kernel.tally import Tally
        td = probes.tracefs_dir()
        for name in Tally.sweep(td) if td else ():
            _diag(f"removed stale tracefs instance {name}")
    cs = probes.checks()
    plan = probes.plan(transport, cs)
    failure = None
    try:
        probes.require(cs)
    except errors.TcptraceError as e:
        failure = e
    with _stdout_errors():
        _doctor_print(cs, plan, failure, as_json)
    if failure:
        sys.exit(failure.exit_code)


def _doctor_print(cs, plan, failure, as_json):
    from tcptrace.kernel import probes
    if as_json:
        d = probes.as_dict(cs, plan)
        d["ready"] = failure is None
        d["problem"] = failure.format_message() if failure else None
        click.echo(json.dumps(d, indent=2))
    else:
        from tabulate import tabulate
        # Wrapped by hand: tabulate's maxcolwidths needs 0.8.10, Debian 12 ships 0.8.9.
        rows = [(c.name, c.status + (" (required)" if c.required and c.status != "supported" else ""),
                 (c.min_kernel or "").split(" ")[0], "\n".join(textwrap.wrap(c.detail, 30)))
                for c in cs]
        click.echo(tabulate(rows, headers=["CHECK", "STATUS", "KERNEL", "DETAIL"]))
        click.echo("\n" + textwrap.fill(f"plan: {plan.describe()}", 79, subsequent_indent="  "))
        for n in plan.notes:
            click.echo(textwrap.fill(f"note: {n}", 79, subsequent_indent="  "))
        click.echo("ready: yes" if failure is None else f"ready: no: {failure.format_message()}")


@main.command()
@options(WATCH_OPTIONS, ANALYSIS_OPTIONS, LIVE_OPTIONS, FILTER_OPTIONS)
def watch(**kw):
    """One line per finding as it happens: connect, accept, refused, failed, reset, close,
    stuck, unstuck, lost (and every transition with --transitions)."""
    _live(_build_options(kw))


@main.command()
@options(REPORT_OPTIONS, ANALYSIS_OPTIONS, LIVE_OPTIONS, FILTER_OPTIONS)
def report(**kw):
    """Trace until Ctrl-C or --duration, then print tables: connects with handshake
    percentiles, failed connects by cause, stuck half-closes, resets, transitions, histogram."""
    _live(_build_options(kw, report=True))


@main.command()
@options(METRICS_OPTIONS, ANALYSIS_OPTIONS[:1] + ANALYSIS_OPTIONS[2:], LIVE_OPTIONS,
         FILTER_OPTIONS)
def metrics(**kw):
    """Serve Prometheus metrics on /metrics while tracing: connects, accepts, handshake time
    histograms, failed connects by cause, resets, closes, stuck sockets, losses."""
    _live(_build_options(kw, metrics=True))


@main.command()
@click.argument("file", metavar="FILE|-")
@click.option("--report", "as_report", is_flag=True, help="Print report tables instead of lines.")
@options(WATCH_OPTIONS, ANALYSIS_OPTIONS, FILTER_OPTIONS)
def replay(file, as_report, **kw):
    """Re-run the analysis on a recording made with --record (- reads standard input): no
    root, no BCC needed."""
    from tcptrace import session
    opts = _build_options(kw, report=as_report)
    with _stdout_errors():
        session.replay(file, opts, sys.stdout, _diag)


if __name__ == "__main__":
    main()
