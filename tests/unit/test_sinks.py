"""The text sink's batch path against its general formatter, on hand-built findings of every
type and shape and on the findings of a recorded loopback run. No root, no BCC."""
import io
import os

import pytest

from tcptrace import session, states as S
from tcptrace.findings import Accept, Close, Connect, Finding, Transition
from tcptrace.sinks import Closed, TextSink

from test_findings import CASES

RECORDED = os.path.join(os.path.dirname(__file__), "..", "data", "loopback.jsonl")
WALL = 1_763_700_000_000_000_000

LONG = "2001:db8:1234:5678:9abc:def0:1234:5678"
# (the JSON tests' lost finding with made-up extras is not one the tracker makes)
EXTRA = [c for c in CASES if c.type != "lost" or "count" in c.extra] + [
    # long enough to move the detail to a line of its own (unless wide)
    Connect(20, 123456, "a-very-long-command", S.AF_INET6, LONG, 65535, LONG, 65535,
            True, True, "active", 3_600_000_000_000, 7),
    Close(21, None, None, S.AF_INET6, LONG, 1, LONG, 2, True, True, "passive", 61_000_000_000,
          "remote", ["ESTABLISHED", "CLOSE"]),
    Accept(22, 9, "x", S.AF_INET6, LONG, 3, LONG, 4, True, False, "passive"),
    Transition.of(23, None, None, S.AF_INET6, LONG, 5, LONG, 6, S.FIN_WAIT2, S.TIME_WAIT, 1),
    # endpoints not known yet: no address, no port
    Connect(24, 1, "c", S.AF_INET, "10.0.0.1", None, None, None, False, False, "active",
            None, None),
    Transition.of(25, 1, "c", S.AF_INET, None, None, "10.0.0.2", None, S.CLOSE, S.SYN_SENT, 2),
    Close(26, 1, "c", S.AF_INET, "10.0.0.1", 0, "10.0.0.2", 0, False, True, "active", 5,
          None, ["SYN_SENT", "CLOSE"]),
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
          "passive", 1, "remote", ["CLOSE"]),
]


def reference(findings, wide):
    """What the general formatter makes of the findings, one at a time."""
    ref = TextSink(io.StringIO(), WALL, wide=wide)
    return "".join(line + "\n" for f in findings for line in ref._lines(f))


@pytest.mark.parametrize("wide", [False, True])
def test_batch_path_formats_every_type_as_the_general_formatter(wide):
    out = io.StringIO()
    sink = TextSink(out, WALL, wide=wide)
    sink.emit_many(EXTRA[:7])
    sink.emit_many([])
    sink.emit_many(EXTRA[7:])
    lines = out.getvalue().splitlines(keepends=True)
    assert lines[0] == TextSink.HEADER + "\n"
    assert "".join(lines[1:]) == reference(EXTRA, wide)
    # the cases exercise both layouts: detail on the line, and on a line of its own
    assert any(line.startswith("    ") for line in lines) != wide


def _findings_of_recording(transitions):
    opts = session.Options(json=False, transitions=transitions)
    kept = []

    class Keep:
        def emit_many(self, fs):
            kept.extend(fs)

        def flush(self):
            pass

    real = session.Pipeline

    class Capturing(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.sink = Keep()

    session.Pipeline = Capturing
    try:
        session.replay(RECORDED, opts, io.StringIO(), lambda *_: None)
    finally:
        session.Pipeline = real
    return kept


@pytest.mark.parametrize("transitions", [False, True])
def test_batch_path_on_a_recorded_run(transitions):
    found = _findings_of_recording(transitions)
    types = {f.type for f in found}
    assert {"connect", "accept", "close"} <= types
    assert ("transition" in types) == transitions
    out = io.StringIO()
    TextSink(out, WALL).emit_many(found)
    assert out.getvalue() == TextSink.HEADER + "\n" + reference(found, False)


def test_closed_pipe_is_reported_as_closed():
    class Gone(io.StringIO):
        def write(self, s):
            raise BrokenPipeError()

    with pytest.raises(Closed):
        TextSink(Gone(), WALL).emit_many(EXTRA[:1])
