"""Every expected failure, and its exit code, in one place.

Codes follow sysexits(3) where one fits, so scripts can tell "fix your machine" from "fix your
command line". The CLI prints `tcptrace: <message>` on stderr and exits with the code; --debug adds
the traceback.
"""
import click

EXIT_OK = 0
EXIT_FINDINGS = 1        # reserved: not used yet
EXIT_USAGE = 2           # bad option or argument (click's own code)
EXIT_DATAERR = 65        # malformed recording
EXIT_NOINPUT = 66        # recording not found / unreadable
EXIT_UNAVAILABLE = 69    # a required kernel or BCC feature is missing
EXIT_SOFTWARE = 70       # internal error (a bug: please report with --debug output)
EXIT_NOPERM = 77         # not privileged
EXIT_INTERRUPTED = 130   # reserved for a second SIGINT during shutdown

EXIT_CODES = {
    EXIT_OK: "success (also after SIGINT/SIGTERM or a closed output pipe)",
    EXIT_USAGE: "bad option or argument",
    EXIT_DATAERR: "malformed or truncated recording (what came before the bad line is still reported)",
    EXIT_NOINPUT: "recording missing or unreadable",
    EXIT_UNAVAILABLE: "a required kernel or BCC feature is missing (BCC, headers, tracefs, tracepoint)",
    EXIT_SOFTWARE: "internal error",
    EXIT_NOPERM: "not privileged (root or CAP_BPF+CAP_PERFMON+CAP_SYS_ADMIN needed)",
}


class TcptraceError(click.ClickException):
    exit_code = EXIT_SOFTWARE

    def show(self, file=None):
        click.echo(f"tcptrace: {self.format_message()}", err=True)


class NotPrivileged(TcptraceError):
    exit_code = EXIT_NOPERM


class Unavailable(TcptraceError):
    """A kernel or BCC feature the run needs is missing."""
    exit_code = EXIT_UNAVAILABLE


class DataError(TcptraceError):
    exit_code = EXIT_DATAERR


class NoInput(TcptraceError):
    exit_code = EXIT_NOINPUT
