"""Smoke check of scripts/bench-resumable --quick (40 users): every run (plain POST, tus-js-client in one PATCH,
in small PATCHes, through the flaky proxy) stores every row, and the table carries plausible figures."""
import os
import re
import subprocess

import pytest

import helpers

SCRIPT = os.path.join(helpers.ROOT, "scripts", "bench-resumable")


@pytest.mark.timeout(180)
def test_bench_resumable_quick(admin_db, tmp_path):
    r = subprocess.run([helpers.PYTHON, SCRIPT, "--quick", "--db", admin_db, "--binary", helpers.BINARY,
                        "--fixtures", str(tmp_path / "fixtures"), "--images-dir", str(tmp_path),
                        "--out", str(tmp_path / "resumable.tsv")],
                       capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"bench-resumable exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    rows = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(post|one-patch|8mib|flaky)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)",
                     line)
        if m:
            rows[m.group(1)] = m.groups()
    assert set(rows) == {"post", "one-patch", "8mib", "flaky"}, f"table rows missing:\n{r.stdout}"
    for name, (_, mb, seconds, mb_s, ratio, peak, tail, sent, n_rows) in rows.items():
        assert float(seconds) > 0 and float(mb_s) > 0, f"{name}: no throughput in {r.stdout}"
        assert ratio != "-", f"{name}: no ratio to the POST in {r.stdout}"
        assert 1 < float(peak) < 1024, f"{name}: peak RSS {peak} MiB is not plausible"
        assert int(n_rows) == 40, f"{name}: {n_rows} rows"
        assert int(sent) >= float(mb) * 1e6 * 0.99, f"{name}: {sent} bytes sent for {mb} MB"
    assert re.search(r"^ratio one-patch / post: \d+\.\d\d", r.stdout, re.M), r.stdout
    assert re.search(r"^ratio 8mib / post: \d+\.\d\d", r.stdout, re.M), r.stdout
    assert re.search(r"^flaky .* [1-9]\d* cuts, [1-9]\d* retries", r.stdout, re.M), \
        f"no drop in the flaky run:\n{r.stdout}"
    assert os.path.getsize(tmp_path / "resumable.tsv") > 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ji-bench-resumable-")], "images left behind"
