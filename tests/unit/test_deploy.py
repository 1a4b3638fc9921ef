"""The deployment examples in docs/deploy/ are checked with the tools that exist here:
promtool for the scrape configuration, systemd-analyze for the unit, YAML and TOML parsers
for the DaemonSet and the Vector pipeline (no cluster or Vector to run them against)."""
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "deploy")
TCPTRACE = os.path.join(os.path.dirname(sys.executable), "tcptrace")


def path(name):
    return os.path.join(DEPLOY, name)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_scrape_config_is_valid_for_prometheus():
    r = subprocess.run(["promtool", "check", "config", path("prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    unit = open(path("tcptrace-metrics.service")).read()
    assert "ExecStart=/opt/tcptrace/.venv/bin/tcptrace metrics --listen 127.0.0.1:" in unit
    # verified where the tool is installed, as setup.sh installs it into a checkout
    f = tmp_path / "tcptrace-metrics.service"
    f.write_text(unit.replace("/opt/tcptrace/.venv/bin/tcptrace", TCPTRACE))
    r = subprocess.run(["systemd-analyze", "verify", str(f)], capture_output=True, text=True)
    assert r.returncode == 0 and "tcptrace-metrics.service" not in r.stderr, r.stderr


def test_daemonset_has_what_bcc_needs_on_the_node():
    yaml = pytest.importorskip("yaml")
    d = yaml.safe_load(open(path("daemonset.yaml")))
    assert d["kind"] == "DaemonSet" and d["apiVersion"] == "apps/v1"
    spec = d["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    c = spec["containers"][0]
    assert c["securityContext"]["privileged"] is True
    assert c["args"][0] == "metrics" and "--listen" in c["args"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"/sys/kernel/tracing", "/sys/fs/bpf", "/lib/modules", "/usr/src"}
    assert {v["name"] for v in spec["volumes"]} == {m["name"] for m in c["volumeMounts"]}
    assert d["spec"]["selector"]["matchLabels"] == d["spec"]["template"]["metadata"]["labels"]


def test_vector_pipeline_reads_the_json_lines():
    v = tomllib.load(open(path("vector.toml"), "rb"))
    src = v["sources"]["tcptrace"]
    assert src["type"] == "exec" and src["command"][-2:] == ["watch", "--json"]
    assert v["transforms"]["parse"]["inputs"] == ["tcptrace"]
    assert v["sinks"]["loki"]["inputs"] == ["parse"]
