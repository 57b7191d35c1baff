"""The repository explains itself: the flag table of docs/running.md matches
the binary's --help, the file table of docs/architecture.md names every file
of src/, and no tracked file points at documents outside the repository.
Needs the binary, not the database."""
import os
import re
import subprocess

import pytest

import helpers

RUNNING_MD = os.path.join(helpers.ROOT, "docs", "running.md")
ARCHITECTURE_MD = os.path.join(helpers.ROOT, "docs", "architecture.md")
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# Names of documents that live outside the repository. Built from pieces so
# that this file does not match its own patterns.
OUTSIDE_REFERENCES = [
    ".." + "/" + "shared",
    "shared" + "/" + "anchors",
    "SPEC" + ".md",
    "STYLE" + ".md",
    "LIB" + "-NOTES",
    "H2O" + "-NOTES",
]


def help_flags():
    if not os.path.exists(helpers.BINARY):
        pytest.fail(f"server binary {helpers.BINARY} does not exist (build it: ninja -C build)", pytrace=False)
    r = subprocess.run([helpers.BINARY, "--help"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, f"{helpers.BINARY} --help exited {r.returncode}: {r.stderr}"
    text = r.stdout + r.stderr
    flags = set(FLAG_RE.findall(text))
    assert flags, f"{helpers.BINARY} --help lists no --flag at all:\n{text}"
    return flags


def table_flags():
    """The flag of each row of the table under '## Flags' in docs/running.md."""
    with open(RUNNING_MD, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## Flags[ \t]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "docs/running.md has no section '## Flags'"
    rows = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] if line.startswith("|") else []
        if not cells or set(cells[0]) <= set("-: ") or cells[0] == "flag":
            continue
        found = FLAG_RE.findall(cells[0])
        assert len(found) == 1, f"docs/running.md, section Flags: row {line!r} should name exactly one --flag"
        assert found[0] not in rows, f"docs/running.md, section Flags: {found[0]} has two rows"
        rows[found[0]] = line
    assert rows, "docs/running.md, section Flags: the table has no rows"
    return rows


def test_every_flag_of_help_has_a_row_in_running_md():
    missing = sorted(help_flags() - set(table_flags()))
    assert not missing, ("flags printed by `jsonl-ingest --help` but missing from the table in "
                         "docs/running.md, section Flags: " + ", ".join(missing))


def test_every_row_of_running_md_is_a_flag_of_help():
    unknown = sorted(set(table_flags()) - help_flags())
    assert not unknown, ("rows of the table in docs/running.md, section Flags, whose flag "
                         "`jsonl-ingest --help` does not print: " + ", ".join(unknown))


def tracked_files():
    r = subprocess.run(["git", "-C", helpers.ROOT, "ls-files", "-z"], capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout ({r.stderr.decode(errors='replace').strip()})")
    return [p for p in r.stdout.decode().split("\0") if p]


def test_no_tracked_file_refers_to_documents_outside_the_repository():
    files = tracked_files()
    assert "README.md" in files and "docs/running.md" in files, "git ls-files did not list the repository"
    patterns = [p.encode() for p in OUTSIDE_REFERENCES]
    hits = []
    for rel in files:
        path = os.path.join(helpers.ROOT, rel)
        if not os.path.isfile(path):  # deleted in the work tree but still in the index
            continue
        with open(path, "rb") as f:
            data = f.read()
        if not any(p in data for p in patterns):
            continue
        for n, line in enumerate(data.split(b"\n"), 1):
            found = [p.decode() for p in patterns if p in line]
            if found:
                hits.append(f"{rel}:{n} ({', '.join(found)}): {line.decode(errors='replace').strip()[:120]}")
    assert not hits, ("these lines refer to documents outside the repository (write what they say "
                      "into the repository's own docs instead):\n" + "\n".join(hits))


def test_architecture_file_table_names_every_source_file():
    with open(ARCHITECTURE_MD, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^## The files[ \t]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "docs/architecture.md has no section '## The files'"
    named = set(re.findall(r"`(src/[A-Za-z0-9_.-]+)`", m.group(1)))
    src = os.path.join(helpers.ROOT, "src")
    present = {f"src/{name}" for name in os.listdir(src) if name.endswith((".c", ".h"))}
    missing = sorted(present - named)
    gone = sorted(named - present)
    assert not missing, "files of src/ without a row in docs/architecture.md, section The files: " + ", ".join(missing)
    assert not gone, "rows of docs/architecture.md, section The files, for files src/ does not have: " + ", ".join(gone)
