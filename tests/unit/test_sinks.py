"""The text sink on hand-built findings of every type and shape (the recorded runs' output is
pinned by tests/unit/test_golden.py). No root, no BCC."""
import io
import os

import pytest

from tcptrace import states as S
from tcptrace.findings import Accept, Close, Conclusion, Connect, Finding, Transition
from tcptrace.output import Closed
from tcptrace.output.jsonl import JsonSink
from tcptrace.output.text import HEADER, TextSink

from test_findings import CASES

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
WALL = 1_763_700_000_000_000_000

LONG = "2001:db8:1234:5678:9abc:def0:1234:5678"
# (the JSON tests' lost finding with made-up extras is not one the tracker makes)
EXTRA = [c for c in CASES if c.type != "lost" or "count" in c.extra] + [
    # long enough to move the detail to a line of its own (unless wide)
    Connect(20, 123456, "a-very-long-command", S.AF_INET6, LONG, 65535, LONG, 65535,
            True, True, "active", 3_600_000_000_000, 7),
    Close(21, None, None, S.AF_INET6, LONG, 1, LONG, 2, True, True, "passive", 61_000_000_000,
          "remote", ["ESTABLISHED", "CLOSE"], False, None),
    Accept(22, 9, "x", S.AF_INET6, LONG, 3, LONG, 4, True, False, "passive"),
    Transition.of(23, None, None, S.AF_INET6, LONG, 5, LONG, 6, S.FIN_WAIT2, S.TIME_WAIT, 1),
    # endpoints not known yet: no address, no port
    Connect(24, 1, "c", S.AF_INET, "10.0.0.1", None, None, None, False, False, "active",
            None, None),
    Transition.of(25, 1, "c", S.AF_INET, None, None, "10.0.0.2", None, S.CLOSE, S.SYN_SENT, 2),
    Close(26, 1, "c", S.AF_INET, "10.0.0.1", 0, "10.0.0.2", 0, False, True, "active", 5,
          None, ["SYN_SENT", "CLOSE"], False, None),
    Connect(27, 1, "c", S.AF_INET, "10.0.0.1", 1, "10.0.0.2", 2, False, False, "active",
            999, 1),
    Finding("refused", 28, 5, "curl", S.AF_INET, "127.0.0.1", 4, "127.0.0.1", 5, before_syn=False,
            role="active"),
    Finding("reset", 29, 5, "curl", S.AF_INET, "127.0.0.1", 4, "127.0.0.1", 5,
            reset_by="remote", duration_ns=2_500_000, incomplete=True),
    # a second later, and a minute later: the clock's cached second must move on
    Transition.of(1_000_000_030, 3, "x", S.AF_INET, "1.1.1.1", 9, "2.2.2.2", 10, S.LAST_ACK,
               S.CLOSE, 0x10),
    Close(61_000_000_031, 3, "x", S.AF_INET, "1.1.1.1", 9, "2.2.2.2", 10, False, False,
          "passive", 1, "remote", ["CLOSE"], False, None),
]


def expected(wide):
    """The lines of EXTRA as the text sink's reviewed layout has them (written by the formatter
    of 2026-11, before the output layer was one path: tests/data/text-sink-*.txt)."""
    with open(os.path.join(DATA, f"text-sink-{'wide' if wide else 'folded'}.txt")) as f:
        return f.read()


@pytest.mark.parametrize("wide", [False, True])
def test_every_type_and_shape_formats_as_reviewed(wide):
    out = io.StringIO()
    sink = TextSink(out, WALL, wide=wide)
    sink.emit_many(EXTRA[:7])
    sink.emit_many([])
    sink.emit_many(EXTRA[7:])
    lines = out.getvalue().splitlines(keepends=True)
    assert lines[0] == HEADER + "\n"                   # once, however many batches
    assert "".join(lines[1:]) == expected(wide)
    # the cases exercise both layouts: detail on the line, and on a line of its own
    assert any(line.startswith("    ") for line in lines) != wide
    if not wide:
        assert all(len(line.rstrip("\n")) <= 80 for line in lines
                   if "2001:db8" not in line)        # only an endpoint itself may not fit


def test_closed_pipe_is_reported_as_closed():
    class Gone(io.StringIO):
        def write(self, s):
            raise BrokenPipeError()

    with pytest.raises(Closed):
        TextSink(Gone(), WALL).emit_many(EXTRA[:1])


def test_conclusions_are_formatted_without_their_extra(monkeypatch):
    """connect, accept and close come from every connection: a sink that builds their `extra`
    dict, or asks one for a member it lacks (Finding.__getattr__ builds it to find out), pays
    for that on every line. Both sinks format them from their slots alone."""
    def built(self):
        raise RuntimeError(f"{self.type}: extra built")     # not AttributeError: getattr()
    monkeypatch.setattr(Conclusion, "extra", property(built))   # with a default would hide it
    conclusions = [f for f in EXTRA if isinstance(f, Conclusion)]
    assert {f.type for f in conclusions} == {"connect", "accept", "close"}
    for sink in (TextSink, JsonSink):
        out = io.StringIO()
        sink(out, WALL).emit_many(conclusions)
        assert len(out.getvalue().splitlines()) >= len(conclusions)
