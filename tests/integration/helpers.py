"""Helpers for the jsonl-ingest integration tests: the server process, curl,
a raw HTTP/1.1 client for what curl cannot do, psql, and file checks.

Everything talks to the real binary ($JI_BINARY, default build/jsonl-ingest)
and a real PostgreSQL ($JI_TEST_DB, default the private test cluster of
scripts/pg-cluster: postgresql://postgres@127.0.0.1:54331/jsonl_ingest_test).
"""
import atexit
import base64
import gzip
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "fixtures")
BINARY = os.environ.get("JI_BINARY") or os.path.join(ROOT, "build", "jsonl-ingest")
TEST_DB = os.environ.get("JI_TEST_DB") or "postgresql://postgres@127.0.0.1:54331/jsonl_ingest_test"
GEN_USERS = os.path.join(ROOT, "scripts", "gen-users")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# <images-dir>/ab/cd/<32 hex>.<ext>
IMAGE_PATH_RE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}\.([a-z0-9]+)$")
EXTENSIONS = {"image/png": {"png"}, "image/jpeg": {"jpg", "jpeg"}, "image/gif": {"gif"}}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURL_MAX_TIME = "20"


# ------------------------------------------------------------------ big generated bodies
def roomy_tmp(need_bytes):
    """/dev/shm when it has room (tmpfs: no disk effects in the figures), else the default tmp."""
    for d in ("/dev/shm", tempfile.gettempdir()):
        try:
            st = os.statvfs(d)
        except OSError:
            continue
        if os.access(d, os.W_OK) and st.f_bavail * st.f_frsize > need_bytes:
            return d
    return tempfile.gettempdir()


def gen_users(n, out, timeout=300):
    """scripts/gen-users --all-hashes: `n` users in `out`; returns the path of the JSON Lines file (the sha256 and
    length of every image are in users-<n>.hashes.tsv next to it)."""
    subprocess.run([PYTHON, GEN_USERS, "--users", str(n), "--all-hashes", "--out", out],
                   check=True, capture_output=True, timeout=timeout)
    return os.path.join(out, f"users-{n}.jsonl")


# ------------------------------------------------------------------ conninfo
def conninfo_with(conninfo, dbname=None, host=None, port=None):
    """The same conninfo with another database and/or host:port (URL or key=value form)."""
    if re.match(r"^postgres(ql)?://", conninfo):
        u = urllib.parse.urlsplit(conninfo)
        netloc = u.netloc
        if host is not None or port is not None:
            userinfo = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
            h = host if host is not None else (u.hostname or "127.0.0.1")
            p = port if port is not None else u.port
            netloc = userinfo + h + (f":{p}" if p else "")
        path = "/" + dbname if dbname is not None else u.path
        return urllib.parse.urlunsplit((u.scheme, netloc, path, u.query, u.fragment))
    extra = []
    if dbname is not None:
        extra.append(f"dbname={dbname}")
    if host is not None:
        extra.append(f"host={host}")
    if port is not None:
        extra.append(f"port={port}")
    return " ".join([conninfo] + extra)  # later keywords win in libpq


def conninfo_hostport(conninfo):
    """(host, port) of a conninfo (URL or key=value); defaults 127.0.0.1, 5432."""
    if re.match(r"^postgres(ql)?://", conninfo):
        u = urllib.parse.urlsplit(conninfo)
        return u.hostname or "127.0.0.1", u.port or 5432
    host = re.findall(r"(?:^|\s)host\s*=\s*(\S+)", conninfo)
    port = re.findall(r"(?:^|\s)port\s*=\s*(\d+)", conninfo)
    return (host[-1] if host else "127.0.0.1"), (int(port[-1]) if port else 5432)


# ------------------------------------------------------------------ psql
class PsqlError(RuntimeError):
    pass


def psql(conninfo, sql, timeout=30):
    r = subprocess.run(["psql", conninfo, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise PsqlError(f"psql failed ({sql[:80]}): {r.stderr.strip()}")
    return r.stdout.strip()


class Database:
    def __init__(self, conninfo):
        self.url = conninfo

    def sql(self, q):
        return psql(self.url, q)

    def table_exists(self, name):
        return self.sql(f"SELECT to_regclass('public.{name}') IS NOT NULL") == "t"

    def truncate_all(self):
        tables = self.sql("SELECT string_agg(format('%I', tablename), ', ') FROM pg_tables WHERE schemaname = 'public'")
        if tables:
            self.sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")

    def count_users(self):
        """Rows in users (0 when the server has not created the table yet)."""
        if not self.table_exists("users"):
            return 0
        return int(self.sql("SELECT count(*) FROM users"))

    def users(self, where="true"):
        """All user rows (dicts), in user_id order."""
        out = self.sql("SELECT coalesce(json_agg(t ORDER BY t.user_id), '[]') FROM ("
                       "SELECT user_id, name, email, image_path, image_type, image_size, batch_id "
                       f"FROM users WHERE {where}) t")
        return json.loads(out)

    def batch_count(self, batch_id):
        return int(self.sql(f"SELECT count(*) FROM batches WHERE batch_id = {int(batch_id)}"))


# ------------------------------------------------------------------ ports
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ the server
_LIVE_SERVERS = set()


@atexit.register
def _kill_leftover_servers():
    for proc in list(_LIVE_SERVERS):
        if proc.poll() is None:
            proc.kill()


class Server:
    """One jsonl-ingest process on 127.0.0.1:<free port>, stdout+stderr in a log file."""

    def __init__(self, db, images_dir, log_path, fsync="off", args=(), port=None, env=None, prefix=()):
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.base = f"http://{self.host}:{self.port}"
        self.url = self.base + "/users"
        self.images_dir = str(images_dir)
        self.log_path = str(log_path)
        self.db = db
        self.argv = [BINARY, "--listen", f"{self.host}:{self.port}", "--db", db,
                     "--images-dir", self.images_dir]
        if fsync is not None:
            self.argv += ["--fsync", fsync]
        self.argv += [str(a) for a in args]
        self.prefix = [str(a) for a in prefix]  # a command that execs the server (same pid), e.g. prlimit
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    def start(self, timeout=15):
        if not os.path.exists(BINARY):
            pytest.fail(f"server binary {BINARY} does not exist (build it: ninja -C build)", pytrace=False)
        os.makedirs(self.images_dir, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.log.write(("$ " + " ".join(self.argv) + "\n").encode())
        self.log.flush()
        self.proc = subprocess.Popen(self.prefix + self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        _LIVE_SERVERS.add(self.proc)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} before it was ready:\n"
                            + self.log_tail(), pytrace=False)
            try:
                st, _, _ = raw_request(self.host, self.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                       b"Connection: close\r\n\r\n", timeout=1)
                if st == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not answer GET /healthz with 200 within {timeout} s:\n"
                            + self.log_tail(), pytrace=False)
            time.sleep(0.05)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def status_kib(self, key):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL after `timeout` s; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.log.write(b"[harness] no exit within 10 s of SIGTERM; SIGKILL\n")
                self.proc.kill()
                self.proc.wait()
        _LIVE_SERVERS.discard(self.proc)
        try:
            self.log.close()
        except OSError:
            pass
        return self.proc.returncode

    def log_tail(self, n=80):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def healthy(self):
        st, _, _ = raw_request(self.host, self.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                               b"Connection: close\r\n\r\n", timeout=5)
        return st == 200


# ------------------------------------------------------------------ curl
class JsonBody:
    """What the answers share: a body that should be JSON."""

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise AssertionError(f"response body is not JSON ({e}): {self.body[:500]!r}") from None


class CurlResult(JsonBody):
    def __init__(self, rc, info, status, headers, body, stderr, header_blocks):
        self.rc, self.info, self.status, self.headers = rc, info, status, headers
        self.body, self.stderr, self.header_blocks = body, stderr, header_blocks

    def __repr__(self):
        return (f"<curl rc={self.rc} status={self.status} body={self.body[:300]!r} "
                f"stderr={self.stderr[-300:]!r}>")


def parse_header_blocks(raw):
    """Header dump (curl -D) -> list of (status, {lowercase name: value})."""
    blocks = []
    for block in re.split(r"\r?\n\r?\n", raw.decode("latin-1")):
        lines = [l for l in block.splitlines() if l]
        if not lines or not lines[0].startswith("HTTP/"):
            continue
        status = int(lines[0].split()[1])
        hdrs = {}
        for l in lines[1:]:
            if ":" in l:
                k, v = l.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        blocks.append((status, hdrs))
    return blocks


def curl(args, tmpdir, max_time=CURL_MAX_TIME):
    """Run curl with a body file, a header dump and -w '%{json}'; one transfer."""
    tag = f"{time.monotonic_ns()}"
    body_f = os.path.join(str(tmpdir), f"curl-{tag}.body")
    hdr_f = os.path.join(str(tmpdir), f"curl-{tag}.headers")
    cmd = ["curl", "-sS", "--max-time", str(max_time), "-o", body_f, "-D", hdr_f, "-w", "%{json}"] + list(args)
    r = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
    try:
        info = json.loads(r.stdout.decode() or "{}")
    except ValueError:
        info = {}
    body = open(body_f, "rb").read() if os.path.exists(body_f) else b""
    raw_hdrs = open(hdr_f, "rb").read() if os.path.exists(hdr_f) else b""
    blocks = parse_header_blocks(raw_hdrs)
    status, headers = blocks[-1] if blocks else (info.get("http_code") or 0, {})
    for f in (body_f, hdr_f):
        if os.path.exists(f):
            os.unlink(f)
    return CurlResult(r.returncode, info, status, headers, body, r.stderr.decode("utf-8", "replace"), blocks)


def post(server, data_file, tmpdir, mode="data-binary", content_type="application/x-ndjson", headers=(),
         query="", max_time=CURL_MAX_TIME, extra=()):
    """POST a file to /users with curl.
    mode: data-binary (Content-Length), chunked (Transfer-Encoding: chunked), upload (-T file -X POST)."""
    url = server.url + (("?" + query) if query else "")
    args = []
    if content_type:
        args += ["-H", f"Content-Type: {content_type}"]
    for h in headers:
        args += ["-H", h]
    if mode == "data-binary":
        args += ["--data-binary", "@" + str(data_file)]
    elif mode == "chunked":
        args += ["-H", "Transfer-Encoding: chunked", "--data-binary", "@" + str(data_file)]
    elif mode == "upload":
        args += ["-T", str(data_file), "-X", "POST"]
    else:
        raise ValueError(mode)
    return curl(args + list(extra) + [url], tmpdir, max_time=max_time)


# ------------------------------------------------------------------ raw HTTP/1.1
class RawResponse(JsonBody):
    def __init__(self, status, reason, headers, body, interim=()):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body
        self.interim = list(interim)

    def __repr__(self):
        return f"<HTTP {self.status} {self.headers} {self.body[:300]!r}>"


class HTTPConn:
    """A raw HTTP/1.1 client connection with a read buffer (for pipelining)."""

    def __init__(self, host, port, timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        self.buf += chunk

    def _read_until(self, sep):
        while sep not in self.buf:
            self._fill()
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def _read_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self, head_only=False):
        interim = []
        while True:
            head = self._read_until(b"\r\n\r\n").decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ", 2)
            status = int(parts[1])
            reason = parts[2] if len(parts) > 2 else ""
            headers = {}
            for l in lines[1:]:
                if ":" in l:
                    k, v = l.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            if 100 <= status < 200:
                interim.append(status)
                continue
            break
        if head_only:
            return RawResponse(status, reason, headers, b"", interim)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0].strip(), 16)
                if size == 0:
                    self._read_until(b"\r\n")  # no trailers expected
                    break
                body += self._read_exact(size)
                self._read_exact(2)
        elif "content-length" in headers:
            body = self._read_exact(int(headers["content-length"]))
        else:
            body = self.buf
            self.buf = b""
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                body += chunk
        return RawResponse(status, reason, headers, body, interim)

    def closed_by_peer(self, timeout=5):
        """True when the server closes the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def raw_request(host, port, data, timeout=10):
    c = HTTPConn(host, port, timeout=timeout)
    try:
        c.send(data)
        r = c.read_response()
        return r.status, r.headers, r.body
    finally:
        c.close()


def post_head(path, length=None, content_type="application/x-ndjson", extra=(), chunked=False):
    h = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    if content_type:
        h.append(f"Content-Type: {content_type}")
    if chunked:
        h.append("Transfer-Encoding: chunked")
    elif length is not None:
        h.append(f"Content-Length: {length}")
    h += list(extra)
    return ("\r\n".join(h) + "\r\n\r\n").encode()


def stream_upload(host, port, path, body_file, headers=(), chunk=1 << 20, timeout=600):
    """POST body_file with Content-Length from a raw socket, reading any early
    response while sending. Returns a dict with the response and timings:
    t_start, t_last_byte (all body bytes handed to the kernel), t_response
    (complete response read), sent, early (response arrived before the last byte)."""
    size = os.path.getsize(body_file)
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = HTTPConn.__new__(HTTPConn)
    conn.sock, conn.buf = sock, b""
    out = {"sent": 0, "early": False, "size": size}
    t0 = time.monotonic()
    out["t_start"] = t0
    head = post_head(path, size, extra=headers)
    sock.sendall(head)
    sock.setblocking(False)
    with open(body_file, "rb") as f:
        pending = b""
        deadline = t0 + timeout
        while out["sent"] < size:
            if time.monotonic() > deadline:
                raise TimeoutError("upload timed out")
            r, w, _ = select.select([sock], [sock], [], 1.0)
            if r:
                out["early"] = True
                break
            if w:
                if not pending:
                    pending = f.read(chunk)
                    if not pending:
                        break
                try:
                    n = sock.send(pending)
                except (BlockingIOError, InterruptedError):
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    out["early"] = True
                    break
                out["sent"] += n
                pending = pending[n:]
    out["t_last_byte"] = time.monotonic()
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        resp = conn.read_response()
    except (ConnectionError, OSError) as e:
        resp = None
        out["error"] = repr(e)
    out["t_response"] = time.monotonic()
    out["response"] = resp
    conn.close()
    return out


# ------------------------------------------------------------------ files
def all_files(images_dir):
    """Every non-directory entry below images_dir (including .pending/), relative paths."""
    out = []
    for dirpath, _, files in os.walk(images_dir):
        for name in files:
            out.append(os.path.relpath(os.path.join(dirpath, name), images_dir))
    return sorted(out)


def pending_files(images_dir):
    return all_files(os.path.join(images_dir, ".pending")) if os.path.isdir(
        os.path.join(images_dir, ".pending")) else []


def image_files(images_dir):
    """Committed image files (everything except .pending/)."""
    return [p for p in all_files(images_dir) if not p.startswith(".pending" + os.sep)]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def wait_for(cond, timeout=5.0, interval=0.1):
    """Poll cond() until it is truthy or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


# ------------------------------------------------------------------ bodies
def fixture_path(name):
    return os.path.join(FIXTURES, name)


def fixture_bytes(name):
    with open(fixture_path(name), "rb") as f:
        return f.read()


def expected(name):
    with open(fixture_path("expected.json"), encoding="utf-8") as f:
        return json.load(f)[name]


def png_bytes(n, seed):
    """A PNG-signature image of n bytes, deterministic for seed."""
    import random
    return (PNG_SIGNATURE + random.Random(seed).randbytes(max(n - 8, 0)))[:n]


def record_line(name, email, image=None, **extra):
    rec = {"name": name, "email": email}
    if image is not None:
        rec["image"] = base64.b64encode(image).decode() if isinstance(image, bytes) else image
    rec.update(extra)
    return json.dumps(rec, ensure_ascii=False).encode("utf-8")


def good_body(tag, n=3, image_bytes=300):
    """n good records with small PNG images, emails <tag>-<i>@example.com."""
    return b"".join(record_line(f"{tag} {i}", f"{tag}-{i}@example.com", png_bytes(image_bytes, f"{tag}-{i}"))
                    + b"\n" for i in range(n))


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def gzip_bytes(data):
    return gzip.compress(data, mtime=0)


class TcpProxy:
    """A byte-pumping TCP forwarder 127.0.0.1:listen_port -> target: a database port that can come alive (start
    one) and go away (cut() it), as seen by the server under test."""

    def __init__(self, listen_port, target_host, target_port):
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", listen_port))
        self.lsock.listen(16)
        self.target = (target_host, target_port)
        self.stopped = False
        self.socks = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            with self.lock:
                if self.stopped:  # cut() ran meanwhile: this one never gets through
                    self._shut([c, u])
                    return
                self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @staticmethod
    def _shut(socks):
        # shutdown() before close(): on Linux a socket closed while another thread is blocked in accept() or recv()
        # on it stays open until that call returns (one more connection would get through); shutdown() wakes
        # those calls and sends FIN at once
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def cut(self):
        """Stops for good, at once: no new connection, every forwarded one broken (the database is gone)."""
        with self.lock:
            self.stopped = True
            socks, self.socks = [self.lsock] + self.socks, []
        self._shut(socks)

    close = cut
