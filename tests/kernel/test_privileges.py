"""Issue 17 item 9: as an unprivileged user with some capabilities (setpriv), the tracer says
exactly what it lacks, with exit 77, and runs with what it needs (CAP_BPF, CAP_PERFMON,
CAP_DAC_OVERRIDE: tracefs is root's, mode 0700, as mounted here)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tcptrace import errors

pytestmark = pytest.mark.kernel
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def as_nobody(caps, *args):
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing")
    c = ",".join(f"+{x}" for x in caps)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if caps:
        cmd += [f"--inh-caps={c}", f"--ambient-caps={c}"]
    p = subprocess.run(cmd + [sys.executable, "-m", "tcptrace"] + list(args), cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    return p.returncode, p.stdout, p.stderr


def tracefs_mode():
    return os.stat("/sys/kernel/tracing").st_mode & 0o777


@pytest.mark.parametrize("caps,lacking", [
    ((), "CAP_BPF, CAP_PERFMON, CAP_DAC_OVERRIDE"),
    (("bpf", "perfmon"), "CAP_DAC_OVERRIDE"),
    (("bpf", "perfmon", "sys_admin"), "CAP_DAC_OVERRIDE"),
])
def test_what_is_lacking_is_named_with_77(caps, lacking):
    assert tracefs_mode() == 0o700, "tracefs is expected as mounted by default (mode 0700)"
    rc, _, err = as_nobody(caps, "watch", "--duration", "1")
    assert rc == errors.EXIT_NOPERM, err
    assert f"lacking {lacking}" in err and "Traceback" not in err
    assert "not mounted" not in err


def test_doctor_tells_a_mounted_but_closed_tracefs_from_a_missing_one():
    rc, out, _ = as_nobody(("bpf", "perfmon"), "doctor", "--json")
    assert rc == errors.EXIT_NOPERM
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert "not readable by uid 65534" in checks["tracefs"]["detail"]
    assert "not mounted" not in out


def test_with_what_it_needs_it_traces():
    rc, _, err = as_nobody(("bpf", "perfmon", "dac_override"), "watch", "--duration", "1")
    assert rc == 0, err
    assert "tracing (compiled in" in err
