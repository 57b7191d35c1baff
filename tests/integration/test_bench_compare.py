"""Smoke checks of the benchmark comparison (scripts/bench-compare and the
Node.js servers in bench/node), small enough for every test run: the figures
in docs/benchmarks.md must stay reproducible from a clone."""
import glob
import os
import re
import shutil
import subprocess

import pytest

import helpers

SCRIPT = os.path.join(helpers.ROOT, "scripts", "bench-compare")
NODE_DIR = os.path.join(helpers.ROOT, "bench", "node")


@pytest.mark.timeout(120)
def test_bench_compare_measures_and_verifies_our_binary(admin_db, tmp_path):
    users = 3
    r = subprocess.run([helpers.PYTHON, SCRIPT, "--users", str(users), "--servers", "ji,ji-array",
                        "--db", admin_db, "--binary", helpers.BINARY, "--no-install",
                        "--fixtures", str(tmp_path / "fixtures"), "--images-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, f"bench-compare exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    rows = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(ji|ji-array)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(.*)$", line)
        if m:
            rows[m.group(1)] = m.groups()
    assert set(rows) == {"ji", "ji-array"}, f"table rows missing:\n{r.stdout}"
    for name, (_, _, seconds, mb_s, rows_s, cpu, peak, n_rows, verified, what) in rows.items():
        assert float(seconds) > 0 and float(mb_s) > 0 and float(rows_s) > 0, f"{name}: no throughput in {r.stdout}"
        assert 0 <= float(cpu) <= float(seconds) * os.cpu_count() + 0.1, f"{name}: CPU {cpu} s is not plausible"
        assert 1 < float(peak) < 1024, f"{name}: peak RSS {peak} MiB is not plausible"
        assert int(n_rows) == users and int(verified) == users, f"{name}: {n_rows} rows, {verified} verified"
        assert "FAILED" not in what
    leftovers = glob.glob(str(tmp_path / "ji-bench-compare-*"))
    assert not leftovers, f"bench-compare left its images behind: {leftovers}"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (scripts/bench-compare installs it)")
@pytest.mark.parametrize("server", ["common.js", "naive.js", "stream.js", "copy.js"])
def test_node_server_parses(server):
    r = subprocess.run(["node", "--check", os.path.join(NODE_DIR, server)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, f"node --check bench/node/{server}:\n{r.stderr}"
