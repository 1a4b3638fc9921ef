import json

import pytest

from tcptrace import states as S
from tcptrace.findings import Finding, Transition, rfc3339

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
    Transition(11, 0, "swapper/1", S.AF_INET, "127.0.0.1", 0, "127.0.0.1", 80, S.CLOSE,
               S.SYN_SENT, 0xffff888103001280),
    Transition(12, 3, "x", S.AF_INET6, "::1", 9, "::1", 10, S.LAST_ACK, S.CLOSE, 0x10),
]


@pytest.mark.parametrize("f", CASES, ids=[f"{c.type}{i}" for i, c in enumerate(CASES)])
def test_fast_json_is_exactly_the_record(f):
    wall = 1_763_700_000_000_000_000
    assert json.loads(f.to_json(wall)) == f.to_record(wall)
    assert list(json.loads(f.to_json(wall))) == list(f.to_record(wall))    # same key order


def test_rfc3339_microseconds_utc():
    assert rfc3339(1_763_700_000_123_456_789) == "2025-11-21T04:40:00.123456Z"
    assert rfc3339(1_763_700_001_000_000_000) == "2025-11-21T04:40:01.000000Z"


def test_transition_attributes_read_as_names():
    t = CASES[-1]
    assert (t.extra["oldstate"], t.extra["newstate"], t.extra["skaddr"]) == ("LAST_ACK", "CLOSE", "10")
