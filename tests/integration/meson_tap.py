"""pytest plugin for `meson test` (protocol 'tap'): each pytest test becomes one TAP line, so meson, and
scripts/test after it, count every test on its own.

Loaded with `-p meson_tap` (meson.build). It is imported before pytest starts capturing output: it keeps the
original stdout for the TAP stream and points file descriptor 1 at stderr, so pytest's own report (progress,
tracebacks, server logs of failed tests, -rA summary) goes to the test's stderr, which meson keeps in its log.

  ok 3 test_upload.py::test_basic
  not ok 4 test_upload.py::test_crlf
  ok 5 test_faults.py::test_507_images_dir_full # SKIP cannot mount a 512 KiB tmpfs (needs root ...)
  not ok 6 collecting test_new.py        (a file that does not even import)
  1..6

A test counts once whatever its phases did (a failed call and an error in teardown are one failed test). When the
session does not finish normally (interrupted, internal error), one more `not ok` line says so (unless a
collection error, already reported, is what stopped it). pytest's exit
status stays what it is, except that "no tests collected" (a -k that matches nothing) exits 0: meson then reports
the test as skipped.
"""
import os
import sys

import pytest

sys.stdout.flush()
_TAP = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
os.set_inheritable(_TAP.fileno(), False)
os.dup2(2, 1)

_number = 0
_collect_errors = 0
_outcome = {}  # nodeid -> [worst outcome so far, skip reason]


def _emit(ok, name, directive=""):
    global _number
    _number += 1
    name = " ".join(name.split()).replace("#", "%23")  # a '#' would start a TAP directive
    _TAP.write(f"{'ok' if ok else 'not ok'} {_number} {name}{directive}\n")


def pytest_collectreport(report):
    global _collect_errors
    if report.failed:
        _collect_errors += 1
        _emit(False, f"collecting {report.nodeid or 'tests'}")


def pytest_runtest_logreport(report):
    state = _outcome.setdefault(report.nodeid, ["passed", ""])
    if report.failed:
        state[0] = "failed"
    elif report.skipped and state[0] == "passed":
        state[0] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr or "")
        state[1] = reason.removeprefix("Skipped: ")


def pytest_runtest_logfinish(nodeid, location):
    outcome, reason = _outcome.pop(nodeid, ["failed", "no report"])
    if outcome == "failed":
        _emit(False, nodeid)
    elif outcome == "skipped":
        _emit(True, nodeid, f" # SKIP {' '.join(reason.split())}")
    elif outcome == "xfailed":
        _emit(False, nodeid, " # TODO expected to fail")
    else:
        _emit(True, nodeid)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
    elif exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) and not (
            exitstatus == pytest.ExitCode.INTERRUPTED and _collect_errors):  # a collection error stops pytest
        _emit(False, f"pytest session ended early (exit status {int(exitstatus)})")
    _TAP.write(f"1..{_number}\n")
    _TAP.flush()
