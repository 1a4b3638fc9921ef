"""The CLI over replayed streams: what a user or a log pipeline sees, parsed as JSON Lines and
validated against docs/*.schema.json. No root, no BCC."""
import json
import os

import jsonschema
import pytest
from click.testing import CliRunner

from tcptrace import errors, states as S
from tcptrace.cli import main
from streams import (MS, SEC, active_close, active_open, listen, lost,
                     passive_open, state, write_recording)

HERE = os.path.dirname(__file__)
DOCS = os.path.join(HERE, "..", "..", "docs")
RECORDED = os.path.join(HERE, "..", "data", "loopback.jsonl")
RECORD_SCHEMA = json.load(open(os.path.join(DOCS, "tcptrace.schema.json")))
SUMMARY_SCHEMA = json.load(open(os.path.join(DOCS, "tcptrace-summary.schema.json")))


def _runner():
    try:
        return CliRunner(mix_stderr=False)      # click < 8.2 mixes stderr in by default
    except TypeError:
        return CliRunner()


def invoke(*args):
    return _runner().invoke(main, list(args), catch_exceptions=False)


def jsonl(text):
    recs = [json.loads(line) for line in text.splitlines()]
    v = jsonschema.Draft202012Validator(RECORD_SCHEMA)
    for r in recs:
        v.validate(r)
    return recs


def test_recorded_stream_replays_to_the_findings_the_kernel_run_gave():
    """tests/data/loopback.jsonl was recorded from the real kernel: 3 connect/close pairs,
    a refused connect, one IPv6 connection, a SO_LINGER 0 reset, a CLOSE_WAIT held 2.5 s."""
    r = invoke("replay", RECORDED, "--json", "--stuck-after", "1")
    assert r.exit_code == 0, r.stderr
    recs = jsonl(r.stdout)
    by = {}
    for x in recs:
        by.setdefault(x["type"], []).append(x)
    assert len(by["connect"]) == 6 and len(by["accept"]) == 6
    assert len(by["refused"]) == 1 and by["refused"][0]["rport"] == 1
    assert by["refused"][0]["errno"] == "ECONNREFUSED"
    assert sorted(x["reset_by"] for x in by["reset"]) == ["local", "remote"]
    assert [x["family"] for x in by["connect"]].count("ipv6") == 1
    stuck = by["stuck"]
    assert len(stuck) == 1 and stuck[0]["state"] == "CLOSE_WAIT"
    assert 1e9 <= stuck[0]["age_ns"] < 1.5e9
    assert by["unstuck"][0]["duration_ns"] >= 2.5e9
    assert "lost" not in by
    # every close has a path that starts at the connection's open and ends in CLOSE
    for c in by["close"]:
        assert c["path"][0] in ("SYN_SENT", "SYN_RECV") and c["path"][-1] == "CLOSE"
    # the same pid owns both ends (the recording's client and server were one process)
    assert len({x["pid"] for x in by["connect"] + by["accept"]}) == 1


def test_replay_is_deterministic():
    a = invoke("replay", RECORDED, "--json").stdout
    b = invoke("replay", RECORDED, "--json").stdout
    assert a == b and a


def test_human_output_fits_80_columns():
    r = invoke("replay", RECORDED, "--stuck-after", "1")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME", "PID", "COMM", "EVENT"]
    assert max(len(l) for l in lines) <= 80
    assert any("STUCK CLOSE_WAIT" in l and "close()" in l for l in lines)


def test_report_json_summary(tmp_path):
    r = invoke("replay", RECORDED, "--report", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    jsonschema.validate(s, SUMMARY_SCHEMA)
    assert sum(c["count"] for c in s["connects"]) == 6
    assert s["failures"] == [{"raddr": "127.0.0.1", "rport": 1, "comm": "python3",
                              "cause": "refused", "count": 1}]
    assert sum(h["count"] for h in s["handshake_histogram_us"]) == 6
    row = {(t["old"], t["new"]): t["count"] for t in s["transitions"]}
    assert row[("CLOSE", "SYN_SENT")] == 7 and row[("SYN_SENT", "CLOSE")] == 1
    assert s["lost"]["total"] == 0


def test_report_tables():
    r = invoke("replay", RECORDED, "--report")
    assert r.exit_code == 0
    out = r.stdout
    for title in ("CONNECTS", "FAILED CONNECTS", "STUCK HALF-CLOSES", "RESETS",
                  "HANDSHAKE LATENCY", "TRANSITIONS", "LOST EVENTS: 0"):
        assert title in out
    conn = out.split("CONNECTS")[1].split("ACCEPTS")[0]
    assert "P50" in conn and "P99" in conn


@pytest.mark.parametrize("args,expect", [
    (["--port", "1"], {"refused"}),
    (["-6"], {"connect", "accept", "close"}),
    (["--raddr", "127.0.0.0/8", "--comm", "nobody"], set()),
])
def test_filters(args, expect):
    r = invoke("replay", RECORDED, "--json", *args)
    assert r.exit_code == 0
    assert {x["type"] for x in jsonl(r.stdout)} == expect


def test_pid_filter_matches_the_attributed_owner():
    everything = jsonl(invoke("replay", RECORDED, "--json").stdout)
    pid = everything[0]["pid"]
    mine = jsonl(invoke("replay", RECORDED, "--json", "--pid", str(pid)).stdout)
    assert mine == [r for r in everything if r["pid"] == pid] and mine
    assert jsonl(invoke("replay", RECORDED, "--json", "--pid", str(pid + 1)).stdout) == []


def test_gap_in_replayed_stream_gives_no_false_stuck(tmp_path):
    recs = (listen(SEC - MS, 0xC1, 8080) + passive_open(SEC, 0xB1, 8080, 40000)
            + [state(SEC + MS, 0xB1, S.ESTABLISHED, S.CLOSE_WAIT, lport=8080, rport=40000),
               lost(SEC + 2 * MS, 3)]
            + active_open(SEC + 3 * MS, 0xA1, 40001, 9090)
            + active_close(SEC + 4 * MS, 0xA1, 40001, 9090))
    f = tmp_path / "gap.jsonl"
    write_recording(f, recs, ticks=[SEC + i * 100 * MS for i in range(1, 100)])
    r = invoke("replay", str(f), "--json", "--stuck-after", "1")
    assert r.exit_code == 0
    out = jsonl(r.stdout)
    assert "stuck" not in {x["type"] for x in out}
    lost_rec = [x for x in out if x["type"] == "lost"]
    assert lost_rec and lost_rec[0]["count"] == 3
    assert "3 lost" in r.stderr
    # ... while the same stream without the loss does report the lingering socket
    f2 = tmp_path / "nogap.jsonl"
    write_recording(f2, [x for x in recs if not hasattr(x, "where")],
                    ticks=[SEC + i * 100 * MS for i in range(1, 100)])
    out2 = jsonl(invoke("replay", str(f2), "--json", "--stuck-after", "1").stdout)
    assert [x["state"] for x in out2 if x["type"] == "stuck"] == ["CLOSE_WAIT"]


def test_malformed_recording_names_the_line_and_keeps_what_came_before(tmp_path):
    lines = open(RECORDED).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:30] + ['{"kind": "state", "ts_ns": "soon"'] + lines[30:]) + "\n")
    r = invoke("replay", str(bad), "--json")
    assert r.exit_code == errors.EXIT_DATAERR
    assert "bad.jsonl:31: malformed record" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1      # the error, with the summary in it
    assert "everything before it was analysed (" in r.stderr
    assert "Traceback" not in r.stderr
    got = jsonl(r.stdout)
    assert any(x["type"] == "connect" for x in got)


@pytest.mark.parametrize("step", [[-5, 1, 7, 2], [5, 1 << 32, 7, 2], [1 << 64, 1, 7, 2]])
def test_step_values_the_kernel_cannot_hold_are_malformed(tmp_path, step):
    """A step's time is a u64 and its pid a u32 in the kernel's record: anything else in a
    recording is malformed input (exit 65), not an internal error."""
    lines = open(RECORDED).read().splitlines()
    rec = {"ts_ns": 5, "kind": "state", "skaddr": "ab", "family": 2, "saddr": "127.0.0.1",
           "daddr": "127.0.0.1", "oldstate": 7, "newstate": 2, "steps": [step]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:30] + [json.dumps(rec)] + lines[30:]) + "\n")
    r = invoke("replay", str(bad), "--json")
    assert r.exit_code == errors.EXIT_DATAERR
    assert "bad.jsonl:31: malformed record" in r.stderr and "bad steps" in r.stderr
    assert "Traceback" not in r.stderr


def test_truncated_recording(tmp_path):
    text = open(RECORDED).read()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[: len(text) // 2].rstrip("\n")[:-5])
    r = invoke("replay", str(cut))
    assert r.exit_code == errors.EXIT_DATAERR
    assert "cut.jsonl:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("content,code,msg", [
    (None, errors.EXIT_NOINPUT, "cannot read recording"),
    ("hello\n", errors.EXIT_DATAERR, ":1:"),
    ('{"format": "tcptrace-recording", "version": 99, "wall_offset_ns": 0}\n',
     errors.EXIT_DATAERR, "version 99"),
])
def test_bad_recordings(tmp_path, content, code, msg):
    f = tmp_path / "r.jsonl"
    if content is not None:
        f.write_text(content)
    r = invoke("replay", str(f))
    assert r.exit_code == code
    assert msg in r.stderr and r.stderr.startswith("tcptrace: ")


@pytest.mark.parametrize("args", [["watch", "--stuck-after", "-1"], ["watch", "--port", "0"],
                                  ["replay", RECORDED, "--laddr", "300.1.1.1"],
                                  ["watch", "--transport", "carrier-pigeon"],
                                  ["report", "--interval", "0"], ["frobnicate"]])
def test_bad_options_exit_2_with_one_clear_message(args):
    r = invoke(*args)
    assert r.exit_code == errors.EXIT_USAGE
    assert "Error:" in r.stderr and "Traceback" not in r.stderr


def test_not_root_exits_77_without_traceback(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr("tcptrace.kernel.probes.capabilities", lambda: {"CAP_BPF"})
    r = invoke("watch", "--duration", "1")     # (were it let through, as root it would trace)
    assert r.exit_code == errors.EXIT_NOPERM
    assert r.stderr.startswith("tcptrace: tracing needs root")
    assert "lacking CAP_PERFMON, CAP_DAC_OVERRIDE" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_bcc_exits_69_with_install_command(monkeypatch):
    monkeypatch.setattr("tcptrace.kernel.probes.privileged", lambda: True)
    monkeypatch.setattr("tcptrace.kernel.probes.bcc_available", lambda: False)
    r = invoke("watch", "--duration", "1")
    assert r.exit_code == errors.EXIT_UNAVAILABLE
    assert "apt-get install python3-bpfcc" in r.stderr


def test_no_headers_exits_69(monkeypatch):
    monkeypatch.setattr("tcptrace.kernel.probes.privileged", lambda: True)
    monkeypatch.setattr("tcptrace.kernel.probes.bcc_available", lambda: True)
    monkeypatch.setattr("tcptrace.kernel.probes.headers_dir", lambda: None)
    r = invoke("report", "--duration", "1")
    assert r.exit_code == errors.EXIT_UNAVAILABLE
    assert "no kernel headers" in r.stderr and "setup.sh" in r.stderr


def test_missing_required_tracepoint_exits_69(monkeypatch, tmp_path):
    (tmp_path / "events" / "tcp" / "tcp_receive_reset").mkdir(parents=True)
    monkeypatch.setattr("tcptrace.kernel.probes.privileged", lambda: True)
    monkeypatch.setattr("tcptrace.kernel.probes.bcc_available", lambda: True)
    monkeypatch.setattr("tcptrace.kernel.probes.headers_dir", lambda: "/x")
    monkeypatch.setattr("tcptrace.kernel.probes.TRACEFS_DIRS", (str(tmp_path),))
    r = invoke("watch", "--duration", "1")
    assert r.exit_code == errors.EXIT_UNAVAILABLE
    assert "sock:inet_sock_set_state unsupported" in r.stderr and "4.16" in r.stderr


def test_help_needs_neither_root_nor_bcc():
    r = invoke("--help")
    assert r.exit_code == 0 and "Exit codes" in r.stdout
    for cmd in ("watch", "report", "replay", "doctor"):
        assert invoke(cmd, "--help").exit_code == 0


def test_steps_read_from_the_kernel_map_replay_as_they_ran_live(tmp_path):
    """A socket resting in CLOSE_WAIT is seen there only through the scans of the kernel's
    pending-steps map (its record would come at CLOSE): replay takes the recorded scan records
    at their place in the stream, after the tick written before them, as the live loop did."""
    from streams import grouped, passive_close
    from tcptrace import recording, wire
    recs = (listen(SEC - MS, 0xC1, 8080) + passive_open(SEC, 0xB1, 8080, 40000)
            + passive_close(SEC + MS, 0xB1, 8080, 40000, wait=5 * SEC))
    scans = [SEC + i * 100 * MS for i in range(1, 60)]
    got = grouped(recs, scan_at=scans)
    assert any(r.flags & wire.F_SCAN for r in got)
    f = tmp_path / "scan.jsonl"
    with open(f, "w") as out:
        out.write(json.dumps(recording.recording_header(1_700_000_000 * SEC)) + "\n")
        scan_times = iter(scans)
        for r in got:
            if r.flags & wire.F_SCAN:       # written by the live loop at scan time
                out.write(json.dumps({"kind": "tick", "ts_ns": next(scan_times)}) + "\n")
            out.write(recording.event_to_json(r) + "\n")
    r = invoke("replay", str(f), "--json", "--stuck-after", "2", "--transitions")
    assert r.exit_code == 0, r.stderr
    out = jsonl(r.stdout)
    assert [x["state"] for x in out if x["type"] == "stuck"] == ["CLOSE_WAIT"]
    assert [x["state"] for x in out if x["type"] == "unstuck"] == ["CLOSE_WAIT"]
    server = [(x["oldstate"], x["newstate"]) for x in out
              if x["type"] == "transition" and x["lport"] == 8080 and x["rport"] == 40000]
    assert server == [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED"),
                      ("ESTABLISHED", "CLOSE_WAIT"), ("CLOSE_WAIT", "LAST_ACK"),
                      ("LAST_ACK", "CLOSE")]          # each once, though scanned many times


@pytest.fixture(scope="module")
def listen_recording(tmp_path_factory):
    """tests/data/listen.jsonl.xz was recorded from the real kernel (6.18) in the lab of
    tests/kernel/lab.py, traced with --port for the two listeners of one server namespace:
    a 3 s hping3 SYN flood (tcp_syncookies=0, tcp_max_syn_backlog=64) against a listen(16),
    a legitimate client from another address connecting during it (7.15 s, its SYNs
    retransmitted), then 12 clients against a listen(4) nobody accept()s (tcp_syn_retries=2:
    7 time out), then the server accepting 5."""
    import lzma
    path = tmp_path_factory.mktemp("listen") / "listen.jsonl"
    with lzma.open(os.path.join(HERE, "..", "data", "listen.jsonl.xz")) as f:
        path.write_bytes(f.read())
    return str(path)


def test_listener_pressure_replays_from_a_recording(listen_recording):
    r = invoke("replay", listen_recording, "--json", "--pressure-interval", "2")
    assert r.exit_code == 0, r.stderr
    recs = jsonl(r.stdout)
    flood, queue = sorted({x["lport"] for x in recs if x["type"].startswith("listen_")},
                          key=lambda p: min(x["time"] for x in recs if x["lport"] == p))
    f = [x for x in recs if x["type"].startswith("listen_") and x["lport"] == flood]
    q = [x for x in recs if x["type"].startswith("listen_") and x["lport"] == queue]
    assert [x["type"] for x in f][-1] == [x["type"] for x in q][-1] == "listen_recovered"
    assert {x["type"] for x in f[:-1] + q[:-1]} == {"listen_pressure"}
    assert f[0]["reason"].startswith("SYN flood: request queue full (17/16), ")
    assert q[0]["reason"].startswith("accept queue full (5/4): the application is not "
                                     "calling accept()")
    # every count once: the findings add up to the episode the recovery reports
    assert sum(x["drops"]["total"] for x in f) == f[-1]["episode"]["dropped"] > 1000
    assert sum(x["synack_retransmits"] for x in f) == f[-1]["episode"]["synack_retransmits"]
    # two listeners in the namespace: its counters cannot be told apart, and say so
    assert {x["counters"] for x in f + q if x["counters"]} == {"namespace"}
    waited = [x for x in recs if x.get("listener")]
    assert {(x["type"], x["listener"]["lport"]) for x in waited} == \
        {("connect", flood), ("failed", queue)}
    assert len([x for x in waited if x["type"] == "failed"]) == 7


def test_listener_pressure_in_text_and_report(listen_recording):
    r = invoke("replay", listen_recording)
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert max(len(l) for l in lines) <= 80
    assert any(" pressure " in l and "listening" in l for l in lines)
    assert any(" recovered " in l for l in lines)
    rep = invoke("replay", listen_recording, "--report")
    assert rep.exit_code == 0
    text = rep.stdout
    assert "LISTENERS" in text and "RQ/AQ/OTH" in text
    assert max(len(l) for l in text.splitlines()) <= 80
    r = invoke("replay", listen_recording, "--report", "--json")
    summary = json.loads(r.stdout)
    jsonschema.validate(summary, SUMMARY_SCHEMA)
    rows = {x["lport"]: x for x in summary["listeners"] if x["laddr"] == "10.77.0.2"}
    assert len(rows) == 2
    flood = max(rows.values(), key=lambda x: x["drops"]["total"])
    assert flood["drops"]["request_queue_full"] == flood["drops"]["total"] > 1000
    assert flood["half_open_peak"] == 17 and flood["counters"] == "namespace"


def test_only_keeps_the_types_asked_for():
    everything = jsonl(invoke("replay", RECORDED, "--json").stdout)
    for only in (["--only", "refused,stuck"], ["-o", "refused", "-o", "stuck"]):
        got = jsonl(invoke("replay", RECORDED, "--json", *only).stdout)
        assert got == [r for r in everything if r["type"] in ("refused", "stuck")] and got
    r = invoke("replay", RECORDED, "--only", "refused,nonsense")
    assert r.exit_code == 2 and "'nonsense' is not a finding type" in r.stderr
