import json

import pytest

from tcptrace import states as S
from tcptrace.findings import (Accept, Close, Connect, Ends, Finding, InferredTransition,
                               Transition, rfc3339)
from tcptrace.output.jsonl import encode

CASES = [
    Finding("connect", 5_000_123_456, 42, "curl", S.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 443,
            handshake_ns=1_020_000_000, syn_retransmits=1, role="active"),
    Finding("accept", 1, None, None, S.AF_INET6, "::1", 80, "::ffff:10.0.0.9", 5555),
    Finding("lost", 7, count=3, where="bpf:state", lost_total=9),
    Finding("lost", 8, ratio=0.5, detail={"a": [1, None]}, flag=True, neg=-3, big=2 ** 70,
            empty=[], s="1", t="true"),   # the encoder's fallback, and look-alike strings
    Finding("stuck", 9, 1, 'we"ird\\comm\u00e9', S.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2,
            state="CLOSE_WAIT", age_ns=3, fd=None, blame="x", age_is_lower_bound=False),
    Finding("close", 10, 2, "a", S.AF_INET, "1.2.3.4", 5, "5.6.7.8", 9, path=["SYN_SENT", "CLOSE"],
            duration_ns=None, closed_by=None, partial=True),
    Transition.of(11, 0, "swapper/1", S.AF_INET, "127.0.0.1", 0, "127.0.0.1", 80, S.CLOSE,
               S.SYN_SENT, 0xffff888103001280),
    Connect(13, 42, "curl", S.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 443,
            False, False, "active", 1_020_000_000, 1),
    Connect(14, 42, "curl", S.AF_INET6, "::1", 40000, "::1", 443, True, True, "active", 5, 0),
    Accept(15, None, None, S.AF_INET, "127.0.0.1", 80, "127.0.0.1", 5555,
           False, False, "passive"),
    Accept(16, 7, "srv", S.AF_INET, "127.0.0.1", 80, "127.0.0.1", 5555, False, True, None),
    Close(17, 2, "a", S.AF_INET, "1.2.3.4", 5, "5.6.7.8", 9, False, False, "active", 70,
          "local", ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"], True,
          60_000_000_000),
    Close(18, 2, "a", S.AF_INET, "1.2.3.4", 5, "5.6.7.8", 9, True, False, None, None, None,
          ["ESTABLISHED", "CLOSE"], False, None),
    InferredTransition(19, Ends(3, "x", S.AF_INET, "10.0.0.1", 40000, "10.0.0.2", 80, 0x10),
                       S.FIN_WAIT2 << 8 | S.TIME_WAIT, "close"),
    Finding("time_wait", 20, netns=4026531840, time_wait=3, entered=None, recycled=None,
            killed=None, interval_ns=None, port_range=[40000, 40009],
            destinations=[{"laddr": "10.0.0.1", "raddr": "10.0.0.2", "rport": 80,
                           "time_wait": 3, "in_use": 4, "port_share": 0.4}],
            local_addresses=[], services=[]),
    Transition.of(12, 3, "x", S.AF_INET6, "::1", 9, "::1", 10, S.LAST_ACK, S.CLOSE, 0x10),
]


@pytest.mark.parametrize("f", CASES, ids=[f"{c.type}{i}" for i, c in enumerate(CASES)])
def test_json_sink_writes_exactly_the_record(f):
    wall = 1_763_700_000_000_000_000
    assert json.loads(encode(f, wall)) == f.to_record(wall)
    assert list(json.loads(encode(f, wall))) == list(f.to_record(wall))    # same key order
    assert encode(f, wall) == json.dumps(f.to_record(wall), separators=(",", ":"))


def test_rfc3339_microseconds_utc():
    assert rfc3339(1_763_700_000_123_456_789) == "2025-11-21T04:40:00.123456Z"
    assert rfc3339(1_763_700_001_000_000_000) == "2025-11-21T04:40:01.000000Z"


def test_transition_attributes_read_as_names():
    t = CASES[-1]
    assert (t.extra["oldstate"], t.extra["newstate"], t.extra["skaddr"]) == ("LAST_ACK", "CLOSE", "10")


def test_connection_findings_are_the_generic_ones():
    # connect/accept/close keep their extras in slots: the same record, key order and
    # attributes as a Finding built with the extras as keywords.
    p = ["SYN_RECV", "ESTABLISHED", "CLOSE"]
    for typed, generic in [
            (Close(1, 2, "a", S.AF_INET, "1.2.3.4", 5, "5.6.7.8", 9, True, True, "passive",
                   None, "remote", p, False, None),
             Finding("close", 1, 2, "a", S.AF_INET, "1.2.3.4", 5, "5.6.7.8", 9, duration_ns=None,
                     closed_by="remote", path=p, time_wait=False, time_wait_ns=None,
                     partial=True, incomplete=True, role="passive")),
            (Connect(1, 2, "a", S.AF_INET, "1.2.3.4", 5, "5.6.7.8", 9, False, True, "active",
                     50, 2),
             Finding("connect", 1, 2, "a", S.AF_INET, "1.2.3.4", 5, "5.6.7.8", 9,
                     handshake_ns=50, syn_retransmits=2, incomplete=True, role="active")),
            (Accept(1, 2, "a", S.AF_INET, "1.2.3.4", 5, "5.6.7.8", 9, False, False, "passive"),
             Finding("accept", 1, 2, "a", S.AF_INET, "1.2.3.4", 5, "5.6.7.8", 9,
                     role="passive"))]:
        assert encode(typed, 0) == encode(generic, 0)
        assert list(typed.extra.items()) == list(generic.extra.items())
        assert typed.role == generic.role and typed.type == generic.type


def test_every_conclusion_member_has_the_type_it_declares(tmp_path):
    """The JSON sink writes a Conclusion's members by the types its class declares (an int
    member as is, without asking its value's type): every value the tracker makes, in every
    recording of tests/golden.py, is of its declared type."""
    import typing
    from tcptrace.findings import Conclusion
    from tcptrace.options import Options
    from tcptrace.recording import RecordingSource
    from tcptrace.session import Pipeline, run
    from streams import Collect
    import golden           # tests/, on the path by tests/conftest.py

    seen = {cls: 0 for cls in Conclusion.__subclasses__()}
    for name in golden.RECORDINGS:
        keep = Collect()
        run(RecordingSource(golden.recording_path(name, str(tmp_path))),
            Pipeline(Options(json=True), keep))
        for f in keep.got:
            if isinstance(f, Conclusion):
                seen[type(f)] += 1
                for member, kind in typing.get_type_hints(type(f)).items():
                    assert isinstance(getattr(f, member), kind), (type(f).__name__, member)
    assert all(seen.values()), seen
    assert all(set(cls.OWN) == set(typing.get_type_hints(cls)) for cls in seen)
