"""Smoke check of scripts/bench-throughput --quick: many small uploads over keep-alive connections (wrk, after a
warm-up) next to pgbench's same transaction and pgbench running the service's own statements, one upload of small
records next to psql's \\copy, big uploads one, two and four at a time (and node-stream's when bench/node is
installed). No timing is asserted: the run must work, every table row must carry a figure, the CPU columns must be
numbers (the test cluster is local), and every request must have committed exactly its 100 rows (the script
counts the users of every batch in the database)."""
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

    rows, cpu = {}, {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(requests|rows|big)\s+(jsonl-ingest|pgbench-svc|pgbench|psql \\copy|node-stream)\s+(\S+)\s+"
                     r"([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+"
                     r"(\S+)\s+(\S+)$", line)
        if m:
            key = (m.group(1), m.group(2), m.group(3))
            rows[key] = [float(m.group(i)) for i in (4, 5, 6)]
            cpu[key] = [m.group(i) for i in (12, 13, 14, 15, 16)]  # server, db, client, total us; CPU s/GB
    want = {("requests", who, f"conns={c}") for who in ("jsonl-ingest", "pgbench", "pgbench-svc") for c in (1, 4)}
    want |= {("rows", "jsonl-ingest", "records=2000"), ("rows", "psql \\copy", "records=2000"),
             ("big", "jsonl-ingest", "uploads=1"), ("big", "jsonl-ingest", "uploads=2"),
             ("big", "jsonl-ingest", "uploads=4")}
    node = os.path.exists(os.path.join(helpers.ROOT, "bench", "node", "node_modules", ".package-lock.json")) and \
        shutil.which("node") is not None
    if node:
        want.add(("big", "node-stream", "uploads=1"))
    else:
        assert "note: no Node.js rows" in r.stdout, r.stdout
    assert set(rows) == want, f"table rows:\n{r.stdout}"
    for key, (median, lo, hi) in rows.items():
        assert 0 < lo <= median <= hi, f"{key}: no figure in\n{r.stdout}"
    # the cluster of the tests is local: every CPU figure of the requests rows is there (the service's own only
    # for the service), and the big rows have their server's CPU per GB
    for key, (server, db, client, total, per_gb) in cpu.items():
        if key[0] == "requests":
            figures = [db, client, total] + ([server] if key[1] == "jsonl-ingest" else [])
            assert all(re.fullmatch(r"\d+", v) for v in figures), f"{key}: CPU columns {cpu[key]}\n{r.stdout}"
            assert server == "-" or key[1] == "jsonl-ingest" and int(total) >= int(server), (key, cpu[key])
            assert per_gb == "-", (key, cpu[key])
        elif key[0] == "big":
            assert re.fullmatch(r"\d+\.\d\d", per_gb), f"{key}: CPU s/GB {per_gb}\n{r.stdout}"
        else:
            assert cpu[key] == ["-"] * 5, (key, cpu[key])
    ratios = re.findall(r"^\s+(\d+) conns: req/s [\d.]+, p99 [\d.]+ of pgbench; req/s [\d.]+, p99 [\d.]+ of "
                        r"pgbench-svc$", r.stdout, re.M)
    assert ratios == ["1", "4"], f"no after/pgbench summary:\n{r.stdout}"

    checks = re.findall(r"(service|pgbench|pgbench-svc) (\d+) (?:conns|clients): .*?(?:(\d+) 2xx \(warm-up "
                        r"included\), )?checked: batches=(\d+) users=(\d+) not_100=(\d+)", r.stderr)
    assert len(checks) == 6, f"no database check per run:\n{r.stderr}"
    for who, conns, ok, batches, users, wrong in checks:
        assert int(batches) > 0 and int(wrong) == 0 and int(users) == 100 * int(batches), (who, conns, r.stderr)
        if who == "service":
            assert int(batches) >= int(ok) > 0, f"{ok} answers 2xx but {batches} batches committed"
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ji-bench-throughput-")], "work directory left"
