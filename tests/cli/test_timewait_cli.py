"""TIME_WAIT through the CLI: a recording with the sampler's readings replays to the same
records a live run writes, each valid against docs/*.schema.json, in every output mode.
No root, no BCC."""
import json
import os
import sys

import jsonschema

from tcptrace import states as S
from streams import MS, SEC, state, write_recording
from test_replay_cli import SUMMARY_SCHEMA, invoke, jsonl

# The pure tier's hand-built connection and samples (tests/unit/test_timewait.py)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))
from test_timewait import CLI, NETNS, TUPLE, conn, tw_sample  # noqa: E402


def recording(path):
    """A client-closed connection whose TIME_WAIT a dump shows and a later dump no longer
    does; a destination whose ports run out; a connect that found no local port; and the
    kernel refusing a timewait sock once."""
    dest = ("10.0.0.1", "10.0.0.2", 80, 3, 6)          # 9 of 10 ports in use
    recs = conn() + [
        tw_sample(SEC + 20 * MS, tw=4, counters=(10, 0, 0, 0),
                  dests=[("127.0.0.1", "127.0.0.1", 8080, 1, 0), dest],
                  entered=[TUPLE + [59_980]]),
        state(SEC + 30 * MS, CLI + 1, S.CLOSE, S.SYN_SENT, raddr="10.0.0.2", rport=80),
        state(SEC + 30 * MS + 20_000, CLI + 1, S.SYN_SENT, S.CLOSE, raddr="10.0.0.2", rport=80),
        tw_sample(2 * SEC, tw=3, counters=(10, 1, 0, 2), dests=[dest], left=[TUPLE],
                  services=[("127.0.0.1", 443, 1)])]
    write_recording(path, recs, ticks=range(SEC, 3 * SEC, 100 * MS))
    return path


def test_replayed_samples_give_the_time_wait_records(tmp_path):
    path = str(recording(tmp_path / "r.jsonl"))
    r = invoke("replay", path, "--json", "--transitions")
    assert r.exit_code == 0, r.stderr
    recs = jsonl(r.stdout)                  # each one valid against the schema
    by = {}
    for x in recs:
        by.setdefault(x["type"], []).append(x)
    close = [c for c in by["close"] if c["role"] == "active"][0]
    assert (close["time_wait"], close["time_wait_ns"]) == (True, 60_000_000_000)
    inferred = [(t["oldstate"], t["newstate"], t["by"]) for t in by["transition"]
                if t.get("inferred")]
    assert inferred == [("FIN_WAIT2", "TIME_WAIT", "close"), ("TIME_WAIT", "CLOSE", "sock_diag")]
    assert [(v["time_wait"], v["entered"], v["recycled"]) for v in by["time_wait"]] == \
        [(4, None, None), (3, 0, 1)]
    [p] = by["port_pressure"]
    assert (p["raddr"], p["rport"], p["port_share"], p["netns"]) == ("10.0.0.2", 80, 0.9, NETNS)
    [o] = by["time_wait_overflow"]
    assert (o["count"], o["netns"]) == (2, NETNS)
    [f] = by["failed"]
    assert (f["reason"], f["errno"], f["errno_inferred"], f["raddr"]) == \
        ("no_local_port", "EADDRNOTAVAIL", True, "10.0.0.2")


def test_report_json_and_text_carry_the_time_wait_table(tmp_path):
    path = str(recording(tmp_path / "r.jsonl"))
    r = invoke("replay", path, "--report", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    jsonschema.Draft202012Validator(SUMMARY_SCHEMA).validate(s)
    rows = {(t["side"], t["addr"], t["port"]): t for t in s["time_wait"]}
    assert rows[("to", "127.0.0.1", 8080)]["entries"] == 1
    assert rows[("to", "127.0.0.1", 8080)]["peak"] == 1
    assert rows[("to", "127.0.0.1", 8080)]["now"] == 0
    assert rows[("to", "10.0.0.2", 80)]["now"] == 3
    assert rows[("at", "127.0.0.1", 443)]["now"] == 1
    assert s["time_wait_overflow"] == 2
    t = invoke("replay", path, "--report")
    assert t.exit_code == 0
    assert "TIME_WAIT (to:" in t.stdout
    assert "2 closes got no timewait sock: tcp_max_tw_buckets" in t.stdout
    assert max(len(line) for line in t.stdout.splitlines()) <= 80
    w = invoke("replay", path)
    assert w.exit_code == 0
    assert max(len(line) for line in w.stdout.splitlines()) <= 80
    assert "no_local_port before any SYN" not in w.stdout
