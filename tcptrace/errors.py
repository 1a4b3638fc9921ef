"""Every expected failure, and its exit code, in one place.

Codes follow sysexits(3) where one fits, so scripts can tell "fix your machine" from "fix your
command line". The CLI prints `tcptrace: <message>` on stderr and exits with the code; --debug adds
the traceback.
"""
import click

EXIT_OK = 0
EXIT_USAGE = 2           # bad option or argument (click's own code)
EXIT_DATAERR = 65        # malformed recording
EXIT_NOINPUT = 66        # recording not found / unreadable
EXIT_UNAVAILABLE = 69    # a required kernel or BCC feature is missing
EXIT_SOFTWARE = 70       # internal error (a bug: please report with --debug output)
EXIT_IOERR = 74          # output cannot be written (stdout or the recording: full, closed, I/O)
EXIT_NOPERM = 77         # not privileged
EXIT_INTERRUPTED = 130   # interrupted before tracing began (Ctrl-C while compiling)

EXIT_CODES = {
    EXIT_OK: "success (also after SIGINT/SIGTERM or a closed output pipe once tracing runs)",
    EXIT_USAGE: "bad option or argument",
    EXIT_DATAERR: "malformed or truncated recording (what came before the bad line is still reported)",
    EXIT_NOINPUT: "recording missing or unreadable",
    EXIT_UNAVAILABLE: "a required kernel or BCC feature is missing (BCC, headers, tracefs, tracepoint)",
    EXIT_SOFTWARE: "internal error",
    EXIT_IOERR: "output cannot be written: standard output or the recording is full, closed or failing",
    EXIT_NOPERM: "not privileged (root, or CAP_BPF, CAP_PERFMON and CAP_DAC_OVERRIDE), or "
                 "tracefs not readable",
    EXIT_INTERRUPTED: "interrupted before tracing began (while compiling)",
}


class TcptraceError(click.ClickException):
    exit_code = EXIT_SOFTWARE

    def show(self, file=None):
        say(self.format_message())


class NotPrivileged(TcptraceError):
    exit_code = EXIT_NOPERM


class Unavailable(TcptraceError):
    """A kernel or BCC feature the run needs is missing."""
    exit_code = EXIT_UNAVAILABLE


class DataError(TcptraceError):
    exit_code = EXIT_DATAERR


class NoInput(TcptraceError):
    exit_code = EXIT_NOINPUT


class Interrupted(TcptraceError):
    """SIGINT or SIGTERM before tracing began (while compiling)."""
    exit_code = EXIT_INTERRUPTED


class OutputError(TcptraceError):
    """stdout or the recording cannot be written. Not EPIPE: a reader that went away ends the
    run quietly (output.Closed)."""
    exit_code = EXIT_IOERR


def say(msg):
    """One diagnostic line on stderr. A full or closed stderr must not stop the work: the first
    failure points fd 2 at /dev/null, so nothing (ours, BCC's or clang's) tries again."""
    import os
    import sys
    try:
        click.echo(f"tcptrace: {msg}", err=True)
        return
    except (OSError, ValueError):
        pass
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = open(os.devnull, "w")
    except OSError:
        pass
