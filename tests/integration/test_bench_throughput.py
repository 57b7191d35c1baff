"""Smoke check of scripts/bench-throughput --quick: many small uploads over keep-alive connections (wrk) next to
pgbench's same transaction, one upload of small records next to psql's \\copy, and big uploads one and two at a
time. No timing is asserted: the run must work, every table row must carry a figure, and every request must have
committed exactly its 100 rows (the script counts the users of every batch in the database)."""
import os
import re
import shutil
import subprocess

import pytest

import helpers

SCRIPT = os.path.join(helpers.ROOT, "scripts", "bench-throughput")


@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("pgbench") is None,
                    reason="wrk or pgbench is not installed (scripts/setup-deps installs them)")
@pytest.mark.timeout(180)
def test_bench_throughput_quick_measures_and_checks_every_batch(admin_db, tmp_path):
    r = subprocess.run([helpers.PYTHON, SCRIPT, "--quick", "--db", admin_db, "--binary", helpers.BINARY,
                        "--fixtures", str(tmp_path / "fixtures"), "--images-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, f"bench-throughput exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"

    rows = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(requests|rows|big)\s+(jsonl-ingest|pgbench|psql \\copy)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+"
                     r"([\d.]+)\s+(\S+)", line)
        if m:
            rows[(m.group(1), m.group(2), m.group(3))] = [float(m.group(i)) for i in (4, 5, 6)]
    want = {("requests", who, f"conns={c}") for who in ("jsonl-ingest", "pgbench") for c in (1, 4)}
    want |= {("rows", "jsonl-ingest", "records=2000"), ("rows", "psql \\copy", "records=2000"),
             ("big", "jsonl-ingest", "uploads=1"), ("big", "jsonl-ingest", "uploads=2"),
             ("big", "jsonl-ingest", "uploads=4")}
    assert set(rows) == want, f"table rows:\n{r.stdout}"
    for key, (median, lo, hi) in rows.items():
        assert 0 < lo <= median <= hi, f"{key}: no figure in\n{r.stdout}"

    checks = re.findall(r"(service|pgbench) (\d+) (?:conns|clients): .*?(?:(\d+) 2xx, )?checked: batches=(\d+) "
                        r"users=(\d+) not_100=(\d+)", r.stderr)
    assert len(checks) == 4, f"no database check per run:\n{r.stderr}"
    for who, conns, ok, batches, users, wrong in checks:
        assert int(batches) > 0 and int(wrong) == 0 and int(users) == 100 * int(batches), (who, conns, r.stderr)
        if who == "service":
            assert int(batches) >= int(ok) > 0, f"{ok} answers 2xx but {batches} batches committed"
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ji-bench-throughput-")], "work directory left"
