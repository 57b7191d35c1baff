"""pytest fixtures for the jsonl-ingest integration tests.

Environment:
  JI_BINARY    the server binary (default build/jsonl-ingest)
  JI_TEST_DB   conninfo of a scratch PostgreSQL database; each test module gets
               its own fresh database on that server (ji_it_<module>), and
               every table in it is truncated before each test
  JI_FIGURES   file the measured figures go to (emptied when the session starts; scripts/test prints it)
  JI_SUITE_BUDGET  seconds; tests starting after that fail at once (default 1200)
  JI_DESELECT  markers whose tests are left out, comma-separated (meson.build: "memory" in a
               sanitizer build, whatever -m says)

Markers:
  @pytest.mark.memory           the big-upload memory test (select with -m memory,
                                deselect with -m 'not memory')
  @pytest.mark.timeout(seconds) per-test time limit (default 60 s)
"""
import os
import re
import signal
import time

import pytest

import helpers

DEFAULT_TIMEOUT = 60
_SESSION_START = time.monotonic()
_FIGURES = []


def _terminate(signum, frame):
    # `timeout` (scripts/test) and CI stop pytest with SIGTERM: turn it into an
    # interrupt so fixtures are torn down (servers stopped) and the junit XML is written
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    config.addinivalue_line("markers", "memory: big upload, peak RSS and throughput (slow)")
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (default 60 s)")
    path = os.environ.get("JI_FIGURES")
    if path:
        open(path, "w").close()


def pytest_collection_modifyitems(config, items):
    markers = {m.strip() for m in os.environ.get("JI_DESELECT", "").split(",") if m.strip()}
    if not markers:
        return
    keep = [i for i in items if not any(i.get_closest_marker(m) for m in markers)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


# ------------------------------------------------------------------ time limits
def pytest_runtest_setup(item):
    budget = float(os.environ.get("JI_SUITE_BUDGET", "1200"))
    if time.monotonic() - _SESSION_START > budget:
        pytest.fail(f"suite time budget of {budget:.0f} s used up; not running this test", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    m = item.get_closest_marker("timeout")
    seconds = float(m.args[0]) if m and m.args else DEFAULT_TIMEOUT

    def on_alarm(signum, frame):
        pytest.fail(f"test timed out after {seconds:.0f} s", pytrace=True)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ server logs on failure
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for srv in getattr(item, "_ji_servers", []):
            rep.sections.append((f"jsonl-ingest log (port {srv.port}, {' '.join(srv.argv[1:])})",
                                 srv.log_tail(120) or "(empty)"))


# ------------------------------------------------------------------ figures
@pytest.fixture
def figures():
    """figures(text): a measured figure, printed in the summary, never asserted."""
    def record(text):
        _FIGURES.append(text)
        path = os.environ.get("JI_FIGURES")
        if path:
            with open(path, "a") as f:
                f.write(text + "\n")
    return record


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("jsonl-ingest figures (not asserted)")
        for line in _FIGURES:
            terminalreporter.write_line(line)


# ------------------------------------------------------------------ database
@pytest.fixture(scope="session")
def admin_db():
    try:
        helpers.psql(helpers.TEST_DB, "SELECT 1")
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"test database {helpers.TEST_DB} is not reachable (scripts/pg-cluster start test?): {e}",
                    pytrace=False)
    return helpers.TEST_DB


@pytest.fixture(scope="module")
def module_db(request, admin_db):
    """A fresh database for this test module, dropped afterwards."""
    name = "ji_it_" + re.sub(r"[^a-z0-9_]", "_", request.module.__name__.rsplit(".", 1)[-1].lower())
    helpers.psql(admin_db, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    helpers.psql(admin_db, f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
    yield helpers.conninfo_with(admin_db, dbname=name)
    try:
        helpers.psql(admin_db, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except helpers.PsqlError:
        pass


@pytest.fixture
def db(module_db):
    """The module's database, every table truncated (identities restarted)."""
    d = helpers.Database(module_db)
    d.truncate_all()
    return d


# ------------------------------------------------------------------ server
@pytest.fixture
def images_dir(tmp_path):
    p = tmp_path / "images"
    p.mkdir()
    return str(p)


@pytest.fixture
def start_server(request, db, images_dir, tmp_path):
    """start_server(fsync='off', args=(), db=None, images_dir=None, env=None, prefix=()) -> helpers.Server.
    `prefix`: a command line that execs the server, e.g. ["prlimit", "--nofile=256:256"].
    Each server gets a free port, is stopped with SIGTERM after the test, and its
    log is attached to the report of a failed test."""
    servers = []
    request.node._ji_servers = servers

    def start(fsync="off", args=(), db=None, images_dir=None, env=None, port=None, prefix=()):
        n = len(servers)
        srv = helpers.Server(db=db or request.getfixturevalue("db").url,
                             images_dir=images_dir or request.getfixturevalue("images_dir"),
                             log_path=tmp_path / f"server-{n}.log", fsync=fsync, args=args, env=env, port=port,
                             prefix=prefix)
        servers.append(srv)
        srv.start()
        return srv

    yield start
    for srv in servers:
        srv.stop()
    # sanitizer builds (scripts/test runs the suite again against build-asan/): a report fails the test
    reports = []
    for srv in servers:
        try:
            with open(srv.log_path, "rb") as f:
                log = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        if re.search(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:", log):
            reports.append(f"---- {srv.log_path}\n{log[-6000:]}")
    if reports:
        pytest.fail("sanitizer report in the server log:\n" + "\n".join(reports), pytrace=False)


@pytest.fixture
def server(start_server):
    """A server with the defaults: --fsync off, its own images dir, the module's database."""
    return start_server()
