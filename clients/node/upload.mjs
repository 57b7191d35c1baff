// Resumable upload of a JSON Lines file to jsonl-ingest, built on tus-js-client (pinned in package-lock.json).
//
// Owns: the command line of the client, the choice of creation URL per protocol (tus: BASE/uploads, the IETF
// draft as tus-js-client's ietf-draft-05 mode speaks it: BASE/users), retries with backoff on drops (tus-js-client
// retryDelays: HEAD, then PATCH from the server's offset), progress on stderr, and the final answer.
//
//   node clients/node/upload.mjs --file F --endpoint BASE [--protocol tus-v1|ietf-draft-05] [--chunk-size N]
//        [--retries N | --retry-delays MS,MS,...] [--metadata k=v]... [--header 'Name: value']... [--token T]
//        [--upload-url URL] [--progress auto|tty|lines|none] [--stop-after BYTES] [--output json|answer]
//
// stdout: one JSON line: {ok, url, token, protocol, size, offset, chunk_size, bytes_sent, requests, retries,
// status, answer, content_location, seconds, last_byte_to_answer_s, error} (--output answer: the final answer
// alone, the POST /users JSON of the batch or the error's, and a summary on stderr). bytes_sent counts every body byte
// handed to a connection, resends included, so bytes_sent - size is what the drops cost. Exit status 0 when the
// upload completed (or stopped where --stop-after asked), 1 when it failed, 2 on a usage error.
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { Transform } from 'node:stream';
import * as tus from 'tus-js-client';

const USAGE = `usage: upload.mjs --file FILE --endpoint BASE_URL [--protocol tus-v1|ietf-draft-05]
       [--chunk-size BYTES|Infinity] [--retries N | --retry-delays MS,MS,...] [--metadata key=value]...
       [--header 'Name: value']... [--token TOKEN] [--upload-url URL] [--progress auto|tty|lines|none]
       [--stop-after BYTES] [--output json|answer]`;

const MiB = 1 << 20;

function usage(message) {
  if (message) process.stderr.write(`upload: ${message}\n`);
  process.stderr.write(USAGE + '\n');
  process.exit(2);
}

// "8MiB", "8M", "1048576", "Infinity"
function parseSize(text, name) {
  if (/^(inf|infinity)$/i.test(text)) return Number.POSITIVE_INFINITY;
  const m = /^(\d+)\s*(k|kb|kib|m|mb|mib|g|gb|gib)?$/i.exec(text);
  if (!m) usage(`${name}: not a size: ${text}`);
  const unit = (m[2] || '').toLowerCase();
  const mult = { '': 1, k: 1024, kb: 1000, kib: 1024, m: MiB, mb: 1e6, mib: MiB, g: 1 << 30, gb: 1e9, gib: 1 << 30 };
  const n = Number(m[1]) * mult[unit];
  if (!(n > 0)) usage(`${name} must be positive`);
  return n;
}

// N retries with exponential backoff: 0.5 s, 1 s, 2 s, 4 s, ... capped at 10 s
function backoff(n) {
  const out = [];
  for (let i = 0; i < n; i++) out.push(Math.min(500 * 2 ** i, 10000));
  return out;
}

function parseArgs(argv) {
  const o = {
    protocol: 'tus-v1',
    chunkSize: 8 * MiB,
    retryDelays: backoff(10),
    metadata: {},
    headers: {},
    progress: 'auto',
    stopAfter: null,
    uploadUrl: null,
    output: 'json',
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf('=');
    const flag = a.startsWith('--') && eq > 0 ? a.slice(0, eq) : a;
    const value = () => {
      if (a.startsWith('--') && eq > 0) return a.slice(eq + 1);
      if (i + 1 >= argv.length) usage(`${flag} needs a value`);
      return argv[++i];
    };
    switch (flag) {
      case '--file': o.file = value(); break;
      case '--endpoint': o.endpoint = value(); break;
      case '--protocol': {
        const p = value();
        if (p === 'tus' || p === 'tus-v1') o.protocol = 'tus-v1';
        else if (p === 'ietf' || p === 'draft' || p === 'ietf-draft-05') o.protocol = 'ietf-draft-05';
        else usage(`--protocol: tus or ietf, not ${p}`);
        break;
      }
      case '--chunk-size': o.chunkSize = parseSize(value(), '--chunk-size'); break;
      case '--retries': {
        const v = value();
        if (!/^\d+$/.test(v)) usage('--retries: a count');
        o.retryDelays = backoff(Number(v));
        break;
      }
      case '--retry-delays': {
        const v = value();
        o.retryDelays = v === '' ? [] : v.split(',').map((s) => {
          if (!/^\d+$/.test(s.trim())) usage(`--retry-delays: not milliseconds: ${s}`);
          return Number(s);
        });
        break;
      }
      case '--metadata': {
        const v = value();
        const k = v.indexOf('=');
        if (k <= 0) usage(`--metadata: key=value, not ${v}`);
        o.metadata[v.slice(0, k)] = v.slice(k + 1);
        break;
      }
      case '--header': {
        const v = value();
        const k = v.indexOf(':');
        if (k <= 0) usage(`--header: 'Name: value', not ${v}`);
        o.headers[v.slice(0, k).trim()] = v.slice(k + 1).trim();
        break;
      }
      case '--token': o.headers.Authorization = `Bearer ${value()}`; break;
      case '--upload-url': o.uploadUrl = value(); break;
      case '--progress': {
        o.progress = value();
        if (!['auto', 'tty', 'lines', 'none'].includes(o.progress)) usage('--progress: auto, tty, lines or none');
        break;
      }
      case '--output': {
        o.output = value();
        if (!['json', 'answer'].includes(o.output)) usage('--output: json or answer');
        break;
      }
      case '--stop-after': o.stopAfter = parseSize(value(), '--stop-after'); break;
      case '-h': case '--help':
        process.stdout.write(USAGE + '\n');
        process.exit(0);
        break;
      default: usage(`unknown argument ${a}`);
    }
  }
  if (!o.file) usage('--file is required');
  if (!o.endpoint && !o.uploadUrl) usage('--endpoint (or --upload-url) is required');
  if (o.progress === 'auto') o.progress = process.stderr.isTTY ? 'tty' : 'lines';
  return o;
}

// The tus-js-client Node HTTP stack with accounting: every body byte piped into a request counts (resends
// included), and the time from a body's last byte to its answer is kept for the last request.
class CountingHttpStack {
  constructor(requestOptions) {
    this.inner = new tus.DefaultHttpStack(requestOptions);
    this.bytesSent = 0;
    this.requests = 0;
    this.lastByteAt = null;
    this.lastAnswerAt = null;
  }

  getName() {
    return 'CountingHttpStack';
  }

  createRequest(method, url) {
    const req = this.inner.createRequest(method, url);
    const stack = this;
    const send = req.send.bind(req);
    req.send = (body = null) => {
      stack.requests++;
      let sentAt = null;
      if (body && typeof body.pipe === 'function') {
        const counter = new Transform({
          transform(chunk, _enc, cb) {
            stack.bytesSent += chunk.length;
            cb(null, chunk);
          },
          flush(cb) {
            sentAt = process.hrtime.bigint();
            cb();
          },
        });
        counter.size = body.size;
        body.on('error', (e) => counter.destroy(e));
        body = body.pipe(counter);
      } else if (body && body.length) {
        stack.bytesSent += body.length;
      }
      const started = process.hrtime.bigint();
      return send(body).then((res) => {
        stack.lastByteAt = sentAt ?? started;
        stack.lastAnswerAt = process.hrtime.bigint();
        return res;
      });
    };
    return req;
  }
}

function fmtBytes(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

class Progress {
  constructor(mode, size) {
    this.mode = mode;
    this.size = size;
    this.t0 = Date.now();
    this.lastLine = 0;
    this.dirty = false;
  }

  text(sent) {
    const s = (Date.now() - this.t0) / 1000;
    const pct = this.size ? ((100 * sent) / this.size).toFixed(1) : '100.0';
    const rate = s > 0 ? (sent / 1e6 / s).toFixed(1) : '0.0';
    return `${pct}% ${fmtBytes(sent)} of ${fmtBytes(this.size)}, ${rate} MB/s`;
  }

  update(sent) {
    if (this.mode === 'tty') {
      if (sent < this.size && Date.now() - this.lastLine < 100) return;
      this.lastLine = Date.now();
      process.stderr.write(`\r\x1b[Kupload: ${this.text(sent)}`);
      this.dirty = true;
    } else if (this.mode === 'lines' && Date.now() - this.lastLine >= 5000) {
      this.lastLine = Date.now();
      process.stderr.write(`upload: ${this.text(sent)}\n`);
    }
  }

  note(message) {
    if (this.mode === 'none') return;
    if (this.dirty) process.stderr.write('\n');
    this.dirty = false;
    process.stderr.write(`upload: ${message}\n`);
  }

  done() {
    if (this.dirty) process.stderr.write('\n');
    this.dirty = false;
  }
}

// GET url -> {status, headers, body}; null on a network error
function httpGet(url, headers) {
  return new Promise((resolve) => {
    const mod = url.startsWith('https:') ? https : http;
    const req = mod.get(url, { headers }, (res) => {
      const chunks = [];
      res.on('data', (d) => chunks.push(d));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers,
                                    body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', () => resolve(null));
    });
    req.on('error', () => resolve(null));
    req.setTimeout(30000, () => req.destroy());
  });
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  let stat;
  try {
    stat = fs.statSync(o.file);
  } catch (e) {
    usage(`cannot read ${o.file}: ${e.message}`);
  }
  const size = stat.size;
  const base = (o.endpoint || new URL('/', o.uploadUrl).toString()).replace(/\/+$/, '');
  const createUrl = o.protocol === 'tus-v1' ? `${base}/uploads` : `${base}/users`;
  const stack = new CountingHttpStack({ headers: {} });
  const progress = new Progress(o.progress, size);
  const t0 = process.hrtime.bigint();
  let retries = 0;
  let lastOffset = 0;

  const result = {
    ok: false, url: null, token: null, protocol: o.protocol, size, offset: null,
    chunk_size: Number.isFinite(o.chunkSize) ? o.chunkSize : 'Infinity', bytes_sent: 0, requests: 0, retries: 0,
    status: null, answer: null, content_location: null, seconds: null, last_byte_to_answer_s: null, error: null,
  };

  let upload = null;
  const outcome = await new Promise((resolve) => {
    const options = {
      endpoint: createUrl,
      uploadUrl: o.uploadUrl,
      protocol: o.protocol,
      chunkSize: o.chunkSize,
      retryDelays: o.retryDelays,
      metadata: o.metadata,
      headers: o.headers,
      httpStack: stack,
      uploadSize: size,
      storeFingerprintForResuming: false,
      removeFingerprintOnSuccess: true,
      onUploadUrlAvailable() {
        progress.note(`upload URL ${upload.url}`);
      },
      onProgress(sent) {
        progress.update(sent);
      },
      onChunkComplete(_n, accepted) {
        lastOffset = accepted;
        if (o.stopAfter !== null && accepted >= o.stopAfter && accepted < size) {
          upload.abort(false).then(() => resolve({ stopped: true }));
        }
      },
      onShouldRetry(err, attempt) {
        const status = err.originalResponse ? err.originalResponse.getStatus() : 0;
        const retry = status === 0 || status >= 500 || status === 409 || status === 423;
        if (retry) {
          retries++;
          const delay = o.retryDelays[attempt];
          progress.note(`${status ? `HTTP ${status}` : 'connection lost'} at offset ${lastOffset}; ` +
                        `retry ${attempt + 1} of ${o.retryDelays.length} in ${(delay / 1000).toFixed(1)} s`);
        }
        return retry;
      },
      onError(err) {
        resolve({ error: err });
      },
      onSuccess(payload) {
        resolve({ response: payload.lastResponse });
      },
    };
    upload = new tus.Upload(fs.createReadStream(o.file), options);
    upload.start();
  });
  progress.done();

  result.seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  result.bytes_sent = stack.bytesSent;
  result.requests = stack.requests;
  result.retries = retries;
  if (stack.lastByteAt !== null && stack.lastAnswerAt !== null) {
    result.last_byte_to_answer_s = Number(stack.lastAnswerAt - stack.lastByteAt) / 1e9;
  }

  const authHeaders = {};
  if (o.headers.Authorization) authHeaders.Authorization = o.headers.Authorization;

  if (outcome.error) {
    const err = outcome.error;
    result.error = String(err.message || err).split('\n')[0];
    const res = err.originalResponse;
    if (res) {
      result.status = res.getStatus();
      result.answer = parseJson(res.getBody()) ?? (res.getBody() || null);
    }
  } else if (outcome.response) {
    const res = outcome.response;
    result.ok = true;
    result.status = res.getStatus();
    result.content_location = res.getHeader('Content-Location') || null;
    const off = Number.parseInt(res.getHeader('Upload-Offset'), 10);
    result.offset = Number.isNaN(off) ? size : off;
    // the draft's completing PATCH carries the POST /users JSON; tus answers 204 and the batch is read below
    result.answer = parseJson(res.getBody());
  } else {
    result.ok = true;
    result.offset = lastOffset;
    result.stopped = true;
  }

  return { result, base, authHeaders, progress, size, url: upload.url || o.uploadUrl || null, output: o.output };
}

async function finish({ result, base, authHeaders, progress, size, url, output }) {
  result.url = url;
  if (url) {
    const m = /\/uploads\/([^/?#]+)/.exec(url);
    result.token = m ? m[1] : null;
  }
  // a completed upload without its JSON (tus, or an answer lost): the upload's state, with the batch and the
  // kept answer once committed
  if (result.ok && !result.stopped && (!result.answer || typeof result.answer !== 'object') && url) {
    const st = await httpGet(url, authHeaders);
    const state = st && st.status === 200 ? parseJson(st.body) : null;
    if (state) {
      result.state = state;
      if (state.answer && typeof state.answer === 'object') result.answer = state.answer;
    }
    if ((!result.answer || typeof result.answer !== 'object') && result.content_location) {
      const b = await httpGet(new URL(result.content_location, base + '/').toString(), authHeaders);
      if (b && b.status === 200) result.batch = parseJson(b.body);
    }
  }
  if (result.ok && !result.stopped) {
    progress.note(`done: ${fmtBytes(size)} in ${result.seconds.toFixed(2)} s, ${fmtBytes(result.bytes_sent)} sent, ` +
                  `${result.retries} retries`);
  } else if (!result.ok) {
    progress.note(`failed: ${result.error}`);
  }
  if (output === 'answer') {
    let a = result.answer ?? result.batch ?? result.state ?? { error: result.error, status: result.status };
    if (result.stopped) a = { url: result.url, offset: result.offset };
    process.stdout.write((typeof a === 'string' ? a : JSON.stringify(a)) + '\n');
    if (result.url) progress.note(`upload URL ${result.url}: offset ${result.offset} of ${size}`);
  } else {
    process.stdout.write(JSON.stringify(result) + '\n');
  }
  process.exitCode = result.ok ? 0 : 1;
}

main()
  .then(finish)
  .catch((e) => {
    process.stderr.write(`upload: ${e.stack || e}\n`);
    process.exit(1);
  });
