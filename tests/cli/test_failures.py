"""Bad input and broken output (issue 17, items 3-6): one clear line on stderr, a documented
exit code, never a traceback, never a file of the user's clobbered. Run as real processes where
file descriptors matter (a full or closed stdout or stderr); no root, no BCC."""
import json
import os
import random
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tcptrace import errors
from tcptrace.cli import main

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
RECORDED = os.path.join(HERE, "..", "data", "loopback.jsonl")


def tcptrace(*args, stdin=None, **redirect):
    """Run `python -m tcptrace args` with fds set up as a shell would: stdout/stderr may be a
    path ("/dev/full"), None to close the descriptor, or captured (the default)."""
    def open_fd(spec):
        if spec == "capture":
            return subprocess.PIPE
        if spec is None:
            return subprocess.DEVNULL      # replaced by a closed fd in preexec
        return open(spec, "w")
    out, err = redirect.get("stdout", "capture"), redirect.get("stderr", "capture")
    closing = [fd for fd, spec in ((1, out), (2, err)) if spec is None]

    def close_fds():
        for fd in closing:
            os.close(fd)
    p = subprocess.run([sys.executable, "-m", "tcptrace"] + list(args), cwd=ROOT,
                       stdout=open_fd(out), stderr=open_fd(err), input=stdin,
                       preexec_fn=close_fds if closing else None,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    return p.returncode, p.stdout or b"", p.stderr or b""


def one_clear_line(stderr):
    lines = stderr.decode().splitlines()
    assert "Traceback" not in stderr.decode(), stderr.decode()
    assert len(lines) == 1 and lines[0].startswith("tcptrace: "), lines
    return lines[0]


# -- item 4: output that cannot be written -------------------------------------------------

@pytest.mark.parametrize("args", [["replay", RECORDED], ["replay", RECORDED, "--json"],
                                  ["replay", RECORDED, "--report"],
                                  ["replay", RECORDED, "--report", "--json"], ["doctor"],
                                  ["doctor", "--json"]],
                         ids=["text", "json", "report", "report-json", "doctor", "doctor-json"])
def test_a_full_stdout_exits_74_with_one_line(args):
    rc, _, err = tcptrace(*args, stdout="/dev/full")
    doctor_rc = {0, errors.EXIT_NOPERM, errors.EXIT_UNAVAILABLE}
    assert rc == errors.EXIT_IOERR, err.decode()
    line = one_clear_line(err) if args[0] == "replay" else err.decode().splitlines()[-1]
    assert "No space left on device" in line
    assert args[0] == "replay" or doctor_rc


@pytest.mark.parametrize("args", [["replay", RECORDED], ["doctor"]])
def test_a_closed_stdout_exits_74_with_one_line(args):
    rc, _, err = tcptrace(*args, stdout=None)
    assert rc == errors.EXIT_IOERR
    assert "standard output is closed" in one_clear_line(err)


@pytest.mark.parametrize("stderr", ["/dev/full", None], ids=["full", "closed"])
def test_a_full_or_closed_stderr_does_not_stop_the_work(stderr):
    rc, out, _ = tcptrace("replay", RECORDED, "--json", stderr=stderr)
    assert rc == 0
    assert out == tcptrace("replay", RECORDED, "--json")[1]     # every finding written
    assert len(out.splitlines()) > 20


# -- item 5: recordings that are not what they claim ---------------------------------------

def test_random_bytes_are_a_malformed_recording_not_a_crash(tmp_path):
    f = tmp_path / "r"
    f.write_bytes(random.Random(1).randbytes(4096))
    rc, _, err = tcptrace("replay", str(f))
    assert rc == errors.EXIT_DATAERR
    assert f"{f}:1:" in one_clear_line(err)


@pytest.mark.parametrize("header,says", [
    ('[1, 2]', "not a tcptrace recording"),
    ('{"format": "tcptrace-recording", "version": 2}', "no wall_offset_ns"),
    ('{"format": "tcptrace-recording", "version": 2, "wall_offset_ns": "x"}',
     "wall_offset_ns"),
    ('{"format": "other"}', "not a tcptrace recording"),
    ('', "empty"),
])
def test_a_wrong_header_is_named_in_words(tmp_path, header, says):
    f = tmp_path / "r"
    f.write_text(header + "\n" if header else "")
    rc, _, err = tcptrace("replay", str(f))
    assert rc == errors.EXIT_DATAERR
    line = one_clear_line(err)
    assert says in line and "'list' object" not in line


@pytest.mark.parametrize("record,says", [
    ('[1, 2]', "not a JSON object"),
    ('{"kind": "state"}', "no ts_ns"),
    ('{"kind": "nonsense", "ts_ns": 1}', "kind"),
    ('{"kind": "state", "ts_ns": 1e999}', "ts_ns"),
    ('{"kind": "state", "ts_ns": 5, "family": 7, "saddr": "1.2.3.4"}', "family"),
    ('\xff\xfe', "UTF-8"),
])
def test_a_bad_record_names_its_line_after_analysing_what_came_before(tmp_path, record, says):
    good = open(RECORDED, "rb").read().splitlines(keepends=True)
    f = tmp_path / "r"
    f.write_bytes(b"".join(good[:40]) + record.encode("latin-1") + b"\n" + b"".join(good[40:]))
    rc, out, err = tcptrace("replay", str(f), "--json")
    assert rc == errors.EXIT_DATAERR
    line = one_clear_line(err)
    assert f"{f}:41:" in line and says in line
    assert "everything before it was analysed" in line
    assert out                              # what came before was reported


def test_a_directory_or_a_missing_file_exits_66(tmp_path):
    for path in (str(tmp_path), str(tmp_path / "none")):
        rc, _, err = tcptrace("replay", path)
        assert rc == errors.EXIT_NOINPUT
        assert path in one_clear_line(err)


def test_replay_reads_stdin_given_as_dash():
    with open(RECORDED, "rb") as f:
        data = f.read()
    rc, out, err = tcptrace("replay", "-", "--json", stdin=data)
    assert rc == 0, err
    want = tcptrace("replay", RECORDED, "--json")[1]
    assert out == want and len(out.splitlines()) > 20


def _mutants(seed, n):
    """n byte-level mutations of the committed recording: flips, deletions, insertions,
    duplicated and swapped lines, truncation."""
    base = open(RECORDED, "rb").read()
    lines = base.splitlines(keepends=True)
    rng = random.Random(seed)
    for _ in range(n):
        how = rng.randrange(6)
        if how == 0:
            b = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b)
        elif how == 1:
            i = rng.randrange(len(base))
            yield base[:i] + base[i + rng.randint(1, 40):]
        elif how == 2:
            i = rng.randrange(len(base))
            yield base[:i] + bytes(rng.choice(b'{}[]",:0123456789-e.\n ') for _ in range(
                rng.randint(1, 12))) + base[i:]
        elif how == 3:
            ls = lines[:]
            i, j = rng.randrange(len(ls)), rng.randrange(len(ls))
            ls[i], ls[j] = ls[j], ls[i]
            yield b"".join(ls)
        elif how == 4:
            ls = lines[:]
            k = rng.randrange(1, len(ls))
            yield b"".join(ls[:k] + ls[k - 1:])
        else:
            yield base[:rng.randrange(len(base))]


def test_fuzzed_recordings_end_in_0_or_65_with_one_line(tmp_path):
    """A seeded byte-mutation loop over the committed recording, in-process (each case costs
    a few ms): every input ends in 0 or 65, one line on stderr, no traceback."""
    runner = CliRunner(**({"mix_stderr": False} if "mix_stderr" in
                          CliRunner.__init__.__code__.co_varnames else {}))
    f = tmp_path / "m"
    seen = set()
    for i, data in enumerate(_mutants(20261205, 3000)):
        f.write_bytes(data)
        args = ["replay", str(f), "--stuck-after", "1"] + (["--json"] if i % 2 else [])
        r = runner.invoke(main, args, catch_exceptions=True)
        assert r.exception is None or isinstance(r.exception, SystemExit), \
            (i, repr(r.exception), data[:200])
        assert r.exit_code in (0, errors.EXIT_DATAERR), (i, r.exit_code, r.stderr)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, (i, r.stderr)
        assert len(r.stderr.splitlines()) == 1, (i, r.stderr)
        seen.add(r.exit_code)
    assert seen == {0, errors.EXIT_DATAERR}       # the mutations reached both outcomes


# -- item 6: values no run can mean -------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["replay", RECORDED, "--stuck-after", "nan"], ["replay", RECORDED, "--stuck-after", "inf"],
    ["watch", "--stuck-after", "nan"], ["watch", "--duration", "nan"],
    ["watch", "--duration", "inf"], ["report", "--interval", "nan"],
    ["report", "--interval", "inf"], ["watch", "--pid", "0"], ["watch", "--pid", "-5"],
    ["replay", RECORDED, "--pid", "0"], ["watch", "--comm", ""],
    ["watch", "--comm", "a-name-longer-than-15"], ["replay", RECORDED, "--comm", ""],
])
def test_impossible_values_exit_2_with_one_clear_message(args):
    runner = CliRunner(**({"mix_stderr": False} if "mix_stderr" in
                          CliRunner.__init__.__code__.co_varnames else {}))
    if args[0] != "replay" and "--duration" not in args:
        args = args + ["--duration", "0.5"]      # were it accepted, as root it would trace
    r = runner.invoke(main, args)
    assert r.exit_code == errors.EXIT_USAGE, (r.exit_code, r.stderr)
    assert "Error:" in r.stderr and "Traceback" not in r.stderr


def test_the_comm_limit_is_the_kernels():
    runner = CliRunner(**({"mix_stderr": False} if "mix_stderr" in
                          CliRunner.__init__.__code__.co_varnames else {}))
    r = runner.invoke(main, ["replay", RECORDED, "--comm", "a-name-longer-than-15"])
    assert "15" in r.stderr
    r = runner.invoke(main, ["replay", RECORDED, "--comm", "exactly15chars!", "--json"])
    assert r.exit_code == 0


# -- item 3: --ready-file and --record never replace what is not ours ---------------------

def test_record_into_a_file_with_content_is_refused_before_anything_runs(tmp_path):
    path = tmp_path / "incident.jsonl"
    path.write_text("an earlier recording\n")
    before = os.stat(path)
    runner = CliRunner(**({"mix_stderr": False} if "mix_stderr" in
                          CliRunner.__init__.__code__.co_varnames else {}))
    r = runner.invoke(main, ["watch", "--record", str(path), "--duration", "0.5"])
    assert r.exit_code == errors.EXIT_USAGE, r.stderr
    assert "--record" in r.stderr and "not empty" in r.stderr and "Traceback" not in r.stderr
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)
    assert path.read_text() == "an earlier recording\n"


@pytest.mark.parametrize("path", ["/dev/full", "/tmp", "/nonexistent-dir/ready"])
def test_ready_file_that_cannot_be_ours_is_refused_before_anything_runs(path):
    before = os.stat(path) if os.path.exists(path) else None
    runner = CliRunner(**({"mix_stderr": False} if "mix_stderr" in
                          CliRunner.__init__.__code__.co_varnames else {}))
    r = runner.invoke(main, ["watch", "--ready-file", path, "--duration", "0.5"])
    assert r.exit_code == errors.EXIT_USAGE, r.stderr
    assert "--ready-file" in r.stderr and "Traceback" not in r.stderr
    if before is not None:
        after = os.stat(path)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
