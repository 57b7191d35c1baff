"""deploy/jsonl-ingest.service: systemd accepts it, and it says what docs/deploy.md promises.

`systemd-analyze verify` wants the ExecStart binary to exist: the test verifies
a copy whose ExecStart points at the binary under test. verify exits 0 on
warnings (an unknown key, a bad time value are "ignoring"), so any message
about the unit fails the test too.
"""
import os
import re
import shutil
import subprocess

import pytest

import helpers

UNIT = os.path.join(helpers.ROOT, "deploy", "jsonl-ingest.service")
INSTALLED = "/usr/local/bin/jsonl-ingest"


def directives(text):
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    if not os.path.exists(helpers.BINARY):
        pytest.fail(f"{helpers.BINARY} does not exist (build it first)", pytrace=False)
    with open(UNIT) as f:
        text = f.read()
    assert INSTALLED in text
    copy = tmp_path / "jsonl-ingest.service"
    copy.write_text(text.replace(INSTALLED, os.path.abspath(helpers.BINARY)))
    r = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    messages = [line for line in (r.stdout + r.stderr).splitlines()
                if "jsonl-ingest.service" in line or "ignoring" in line.lower() or "unknown" in line.lower()]
    assert r.returncode == 0 and not messages, r.stdout + r.stderr


def test_unit_has_the_promised_settings():
    with open(UNIT) as f:
        d = directives(f.read())
    assert d["Restart"] == ["on-failure"]
    assert d["KillSignal"] == ["SIGTERM"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["LimitNOFILE"] == ["65536"]
    for key, value in [("ProtectSystem", "strict"), ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes")]:
        assert d[key] == [value], key
    assert d["User"] and d["User"][0] not in ("root", "0")
    exec_start = d["ExecStart"][0]
    images = re.search(r"--images-dir (\S+)", exec_start).group(1)
    log = re.search(r"--access-log (\S+)", exec_start).group(1)
    writable = " ".join(d["ReadWritePaths"]).split()
    assert images in writable and os.path.dirname(log) in writable
    grace = int(re.search(r"--shutdown-grace (\d+)", exec_start).group(1))
    # the grace period, then JI_STOP_ANSWER_MS (2 s) of final answers, must end before systemd's SIGKILL
    assert int(d["TimeoutStopSec"][0]) > grace + 2
