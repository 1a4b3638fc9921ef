"""Generate docs/tcptrace.8.md from the click definitions, the JSON Schema and the exit codes,
so SYNOPSIS, OPTIONS, FIELDS and EXIT STATUS cannot drift from the code.
EXAMPLES, METRICS, LISTENER PRESSURE, TIME_WAIT AND PORT EXHAUSTION and OVERHEAD are prose kept
in docs/man/*.md (transcripts of real runs, measured numbers, what each number means on which
kernel).

    python -m tcptrace.manpage > docs/tcptrace.8.md      (tests/unit/test_docs.py checks it)
"""
import json
import os

import click

from tcptrace import __version__, errors
from tcptrace.cli import main

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _opt_line(p):
    names = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
    if not p.is_flag:
        names += f" *{p.make_metavar(click.Context(main)) if _needs_ctx() else p.make_metavar()}*"
    desc = p.help or ""
    if p.show_default and p.default not in (None, False, ()):
        desc += f" (default: {p.default})"
    return f"- {names}: {desc}"


def _flat(text):
    return " ".join(text.replace("\b", "").split())


def _needs_ctx():
    import inspect
    return "ctx" in inspect.signature(click.Option.make_metavar).parameters


def _synopsis(name, cmd):
    args = " ".join(f"*{a.name.upper()}*" for a in cmd.params if isinstance(a, click.Argument))
    return f"    tcptrace {name} [OPTIONS] {args}".rstrip()


def _prose(name):
    path = os.path.join(DOCS, "man", f"{name}.md")
    with open(path) as f:
        return f.read().strip()


def render():
    out = [f"% TCPTRACE(8) tcptrace {__version__}", "",
           "# NAME", "", "tcptrace - trace TCP connection lifecycles with eBPF: handshake latency, "
           "failed connects, resets, closes and stuck half-closes", "", "# SYNOPSIS", ""]
    for name, cmd in main.commands.items():
        out.append(_synopsis(name, cmd))
    out += ["", "# DESCRIPTION", "", _flat(main.help.split("\n\n")[0]), "",
            "Every TCP state change in the kernel (the `sock:inet_sock_set_state` tracepoint) is "
            "streamed to user space, put back in time order, and replayed through one state "
            "machine per connection. Findings are printed as they are concluded; `report` "
            "aggregates them.", "",
            "# REQUIREMENTS", "", _prose("requirements"), "", "# COMMANDS AND OPTIONS", ""]
    for name, cmd in main.commands.items():
        out += [f"## tcptrace {name}", "", _flat(cmd.help or ""), ""]
        for p in cmd.params:
            if isinstance(p, click.Option):
                out.append(_opt_line(p))
        out.append("")
    out += ["Global: `--debug` shows the traceback of an error; `--version`; `-h`, `--help`.", "",
            "# EXAMPLES", "", _prose("examples"), "", "# METRICS", "", _prose("metrics"), "",
            "# LISTENER PRESSURE", "", _prose("listen"), "", "# FIELDS", "",
            "JSON Lines on stdout (`--json`): one object per finding, flushed per line. The "
            "contract is docs/tcptrace.schema.json; `report --json` prints one object described by "
            "docs/tcptrace-summary.schema.json.", ""]
    schema = json.load(open(os.path.join(DOCS, "tcptrace.schema.json")))
    out.append("Every record: " + ", ".join(f"`{k}`" for k in schema["required"]) + ".")
    out.append("")
    for k, v in schema["properties"].items():
        if v.get("description"):
            out.append(f"- `{k}`: {v['description']}")
    out.append("")
    for variant in schema["allOf"]:
        t = variant["if"]["properties"]["type"]["const"]
        then = variant["then"]
        fields = ", ".join(f"`{k}`" for k in then["properties"]) or "no extra fields"
        out.append(f"- **{t}**: {then['description']} Fields: {fields}.")
    out += ["", "# TIME_WAIT AND PORT EXHAUSTION", "", _prose("timewait")]
    out += ["", "# EXIT STATUS", ""]
    for code, what in sorted(errors.EXIT_CODES.items()):
        out.append(f"- {code}: {what}")
    out += ["", "# OVERHEAD", "", _prose("overhead"), "", "# SEE ALSO", "",
            "ss(8), tcpstates-bpfcc(8), tcplife-bpfcc(8), tcpconnect-bpfcc(8), bpftool(8); "
            "docs/design.md (data flow, BPF maps), docs/vm.md (the stock-kernel VM), "
            "docs/bench.md (benchmarks)."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
