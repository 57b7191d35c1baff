/*
 * service_limits.h — every named limit of the service in one place: its value
 * and the reason it has that value. Error messages print the constant's name
 * and value from here (JI_STR), never a copied number. The flags that change
 * a limit start from the JI_DEFAULT_* values; docs/security.md lists each one
 * with the threat it stops.
 */
#ifndef JI_SERVICE_LIMITS_H
#define JI_SERVICE_LIMITS_H

/** Turns a macro's value into a string literal, for messages that name a limit. */
#define JI_STR(x) JI_STR_(x)
#define JI_STR_(x) #x

/* ---- records ---- */
/** Most Unicode characters in `name` and `email`: the columns are varchar(255). */
#define JI_MAX_FIELD_CHARS 255
/** Default for --max-record-bytes: the longest line one record may take; it bounds per-record memory. */
#define JI_DEFAULT_MAX_RECORD_BYTES (8u * 1024 * 1024)
/** Errors listed in a skip-mode answer: the answer stays small however many lines fail. */
#define JI_MAX_REPORTED_ERRORS 100
/** Bytes of a line over --max-record-bytes kept as its dead letter (marked truncated): the line is never held. */
#define JI_DEAD_LETTER_KEEP_BYTES (64u * 1024)
/**
 * Bytes of the line being read that a skip-mode upload holds in memory; past it the line goes on in the
 * request's spool file (unnamed, gone with the process). Each rejected record is spooled until COMMIT.
 */
#define JI_DEAD_LETTER_MEMORY_BYTES (64u * 1024)
/** Most rejected records a batch's /rejected read holds per page, and the bytes of record text per page. */
#define JI_REJECTED_PAGE_ROWS 256
#define JI_REJECTED_PAGE_BYTES (1024u * 1024)
/**
 * Bytes of a /rejected answer written at a time from the page in memory: a record is escaped (up to 6 bytes for
 * one) or base64-encoded piece by piece, so what is sent never costs more than this besides the two pages.
 */
#define JI_REJECTED_CHUNK_BYTES (64u * 1024)
/**
 * Deepest nesting of one record, a JSON Lines line or one element of an array body, the record's own object
 * counting 1: a deeper record is refused (400) before anything is built from it. A record needs 1 level (2 with
 * an object in an ignored member); 64 leaves room for any sane extra member. Without it a 600 KB body of
 * 300,000 '[' crashed the process: yajl_tree_free recurses once per level and overflows the stack.
 */
#define JI_MAX_JSON_DEPTH 64

/* ---- bodies ---- */
/** Default for --max-array-bytes: the largest body of the JSON-array mode, which holds it whole. */
#define JI_DEFAULT_MAX_ARRAY_BYTES (256u * 1024 * 1024)
/**
 * Default for --max-inflated-bytes: the most one gzip or zstd body may inflate to. 16 GiB: above the biggest batch a
 * crawler sends in one request, far below what a small compressed body could claim (gzip reaches ~1000:1).
 */
#define JI_DEFAULT_MAX_INFLATED_BYTES (16ull * 1024 * 1024 * 1024)
/**
 * Default for --max-array-memory: the most one JSON-array request may hold (its body, the inflated text and
 * yajl's tree, as estimated by the pre-scan: array_scan.h). Bytes alone do not bound the tree: 8 MB of
 * `[0,0,...]` build a 360 MB tree, and gzip turns 8 KB on the wire into those 8 MB. 64 MiB holds a ~20 MB array
 * of real profiles (images make the bytes, not the values).
 */
#define JI_DEFAULT_MAX_ARRAY_MEMORY (64u * 1024 * 1024)
/**
 * Default for --array-memory-budget: what all JSON-array requests of the process may hold together. Each one
 * reserves --max-array-memory before its body is read (and keeps only its estimate once its body is scanned),
 * so with the defaults two run at once; one more gets 503 with Retry-After.
 */
#define JI_DEFAULT_ARRAY_MEMORY_BUDGET (128u * 1024 * 1024)
/**
 * What yajl_tree (yajl 2.1, glibc malloc, 64-bit) allocates per value (member names count as values) besides
 * the bytes of strings and numbers, which it copies. Measured with mallinfo2() over 10^6-element arrays:
 * a number or a short string 88 bytes (a 48-byte node, a 32-byte chunk for its text, an 8-byte slot in the
 * parent), `{}` or `[]` or `true` 56, `{"a":0}` 232 for 3 values (77 each), a profile object with name, email
 * and image 424 for 7 values (61 each). 96 = the worst measured (88) plus room for realloc slack of the arrays
 * that grow one slot at a time. tests/unit/test_array_scan.c checks the estimate against malloc's own figures.
 */
#define JI_ARRAY_TREE_BYTES_PER_VALUE 96
/** yajl rescans a string that spans its input chunks: feed it at least this much at a time. */
#define JI_FEED_MIN_BYTES (64u * 1024)
/** A part-filled input buffer is fed after this long without more bytes (ms): small uploads are not delayed. */
#define JI_FEED_FLUSH_MS 5
/**
 * Longest stretch (ms) one gzip or zstd body is inflated and fed in one turn of the event loop before its connection
 * yields (for 1 ms, JI_YIELD_MS): a body that inflates fast and yields little (gigabytes of newlines) must not
 * hold the thread its other connections share. Time, not bytes: what a slice costs depends on what it holds.
 */
#define JI_LOOP_SLICE_MS 10
/** How long a connection that yielded waits before it goes on (ms): the others get a turn of the loop. */
#define JI_YIELD_MS 1
/**
 * Largest window a zstd body's frames may ask for, as a power of two (bytes): the decoder allocates the window a
 * frame header declares, so without a bound a 20-byte frame (window descriptor of `zstd --long=31`) would make it
 * allocate 2 GiB. 23 = 8 MiB: what RFC 9659 tells HTTP zstd encoders to stay within, and what the zstd tool uses
 * up to level 19 (`--ultra` levels 20-22 and `--long` ask for more). A frame that needs more is refused with 413
 * before anything is allocated for it.
 */
#define JI_MAX_ZSTD_WINDOW_LOG 23
/**
 * What one zstd decoder may hold besides its window: its context, its input block buffer (128 KiB) and the block
 * margin of its output buffer. libzstd 1.5 estimates ~480 KiB (ZSTD_estimateDStreamSize at a window of
 * 2^JI_MAX_ZSTD_WINDOW_LOG minus the window; tests/unit/test_unzstd.c checks the bound against it). A zstd upload
 * reserves the window and this from --max-memory on top of JI_UPLOAD_FIXED_BYTES.
 */
#define JI_ZSTD_DECODER_OVERHEAD_BYTES (1024u * 1024)
/** Inflated bytes held for the ingest on a gzip or zstd body (a multiple of what yajl wants per feed). */
#define JI_INFLATE_BUFFER_BYTES (256u * 1024)
/** Most body bytes inspected to find the first non-space byte when the format must be sniffed. */
#define JI_MAX_SNIFF_BYTES (64u * 1024)
/** Bytes of COPY data gathered before they are handed to libpq. */
#define JI_COPY_BUFFER_BYTES (64u * 1024)
/** Room kept behind JI_COPY_BUFFER_BYTES so that one more row always fits. */
#define JI_COPY_BUFFER_SLACK (16u * 1024)

/* ---- request heads and connections ---- */
/** Most bytes of one request head (request line and headers): a head is held whole while it is parsed. */
#define JI_MAX_HEAD_BYTES 16384
/** Most headers in one request head. */
#define JI_MAX_HEADERS 64
/** Longest Idempotency-Key accepted (bytes): a key is stored and indexed with its batch. */
#define JI_MAX_IDEMPOTENCY_KEY_BYTES 255
/** A resumable upload's token: 128 random bits (getrandom), as lowercase hex. */
#define JI_UPLOAD_TOKEN_CHARS 32
/** --upload-expiry default (seconds): an upload with no append for this long is discarded. */
#define JI_DEFAULT_UPLOAD_EXPIRY_S 86400
/** Longest time between two sweeps of expired resumable uploads by the service (seconds; shorter --upload-expiry: that). */
#define JI_UPLOAD_SWEEP_INTERVAL_S 60
/** Expired uploads deleted by one sweep statement: a sweep stays short however many expired at once. */
#define JI_UPLOAD_SWEEP_ROWS 100
/** Largest --upload-expiry (seconds): one year. */
#define JI_MAX_UPLOAD_EXPIRY_S (366u * 86400)
/** --max-upload-bytes default: the largest Upload-Length (and offset) a resumable upload may reach (Tus-Max-Size). */
#define JI_DEFAULT_MAX_UPLOAD_BYTES (64ull * 1024 * 1024 * 1024)
/**
 * Default for --idempotency-ttl (seconds): how long a committed key answers retries. After it the key may be
 * reused; the service and `gc` clear it (its batch stays), so keys do not pile up in the database.
 */
#define JI_DEFAULT_IDEMPOTENCY_TTL_S 86400
/** Largest --idempotency-ttl (seconds): one year. */
#define JI_MAX_IDEMPOTENCY_TTL_S (366u * 86400)
/** Longest time between two sweeps of expired keys by one worker while it commits uploads (seconds). */
#define JI_IDEMPOTENCY_SWEEP_INTERVAL_S 60
/** Expired keys cleared by one sweep statement: a sweep stays short however many keys expired at once. */
#define JI_IDEMPOTENCY_SWEEP_ROWS 1000
/**
 * Longest Content-Digest header value (bytes). Both known digests with their keys take 158 bytes
 * (`sha-256=:<44>:, sha-512=:<88>:`); 1024 leaves room for a few algorithms the service ignores, and bounds the
 * work of parsing a dictionary nobody needs to be long.
 */
#define JI_MAX_CONTENT_DIGEST_BYTES 1024
/**
 * Content-Digest on a streamed body: the first bytes hashed on the event loop itself (a small body starts no
 * thread); past them a helper thread of the upload hashes, fed through a ring of JI_DIGEST_BUFFER_BYTES (reserved
 * from --max-memory with the upload) in slices of at most JI_DIGEST_SLICE_BYTES. On the loop, SHA-512 (~650 MB/s
 * here) took a fifth of an upload's speed; with the helper the loop only copies (docs/benchmarks.md).
 */
#define JI_DIGEST_INLINE_BYTES (1u * 1024 * 1024)
#define JI_DIGEST_BUFFER_BYTES (2u * 1024 * 1024)
#define JI_DIGEST_SLICE_BYTES (256u * 1024)
/**
 * Kernel receive buffer of a client socket. h2o reads until the socket is empty, so this also bounds how much
 * one read burst adds to the input buffer (without it, loopback autotuning lets a burst reach megabytes).
 */
#define JI_SOCKET_RCVBUF_BYTES (256 * 1024)
/** Default for --idle-timeout (seconds): a head or body that receives nothing for this long is cut. */
#define JI_DEFAULT_IDLE_TIMEOUT_S 30
/** How long an error answer waits for the client to stop sending before the connection closes (ms). */
#define JI_LINGER_MS 2000
/** Default for --max-ingests: POST /users requests running at once in the process. */
#define JI_DEFAULT_MAX_INGESTS 64
/** Default for --max-client-ingests: uploads one client (address) may run at once; a quarter of the above. */
#define JI_DEFAULT_MAX_CLIENT_INGESTS 16
/** Default for --min-body-rate (bytes/s): below this over a window, an upload is cut. A 9600 baud link passes. */
#define JI_DEFAULT_MIN_BODY_RATE 1024
/** Default for --min-body-rate-window (seconds): the window the rate is measured over. */
#define JI_DEFAULT_MIN_BODY_RATE_WINDOW_S 20

/**
 * Default for --keepalive-timeout (seconds): a kept-alive connection that sends no byte of its next request for
 * this long is closed (never longer than --idle-timeout). Shorter than JI_DEFAULT_IDLE_TIMEOUT_S: a client between
 * requests costs a descriptor and a connection place and gives nothing, while a slow head or body is work under
 * way. 5 s keeps a connection for a client that sends in bursts (curl --next, a crawler's next batch) and lets a
 * flood of idle kept-alive connections go within seconds.
 */
#define JI_DEFAULT_KEEPALIVE_TIMEOUT_S 5
/**
 * --max-connections, when not given, is derived from the open-files limit (RLIMIT_NOFILE, after raising it):
 * (limit - JI_FD_RESERVE_FIXED - JI_FD_RESERVE_PER_THREAD x threads - JI_FD_RESERVE_PER_INGEST x --max-ingests) / 2,
 * at least JI_MIN_DEFAULT_MAX_CONNECTIONS. Halved because one connection may hold a second descriptor while it
 * is served (an image file it reads, an export's database connection).
 */
#define JI_FD_RESERVE_FIXED 32
/** Per event-loop thread: its epoll descriptor, its copy of the listening socket, h2o's wake-up pipe, and
 * JI_PG_KEEP_IDLE idle database connections, rounded up (idle ones beyond those stand for upload places). */
#define JI_FD_RESERVE_PER_THREAD 8
/** Per upload place (--max-ingests): its database connection and the image file it writes. */
#define JI_FD_RESERVE_PER_INGEST 2
/** The smallest derived --max-connections, however low the open-files limit (past it, accepting pauses instead). */
#define JI_MIN_DEFAULT_MAX_CONNECTIONS 16
/**
 * An unlimited hard RLIMIT_NOFILE is raised to this (Linux's default fs.nr_open: the kernel refuses more).
 */
#define JI_NOFILE_UNLIMITED_CAP 1048576
/** At most one log line per loop in this many ms counts the connections refused at --max-connections. */
#define JI_REFUSED_LOG_INTERVAL_MS 1000
/** Input bytes a connection refused at --max-connections has read and discarded before its 503 (not a reset). */
#define JI_REFUSED_DRAIN_BYTES 16384

/** Connections one loop accepts per readiness event before it serves the others. */
#define JI_ACCEPT_BATCH 16
/**
 * A loop holding more client connections than another leaves a new connection to that one for at most this long
 * (ms), then takes it itself: long enough for the other thread to be scheduled on a loaded machine, short enough
 * that a connection never waits noticeably when every other loop is busy.
 */
#define JI_ACCEPT_DEFER_MS 20
/** Out of file descriptors, accepting pauses this long (ms) instead of spinning on a readable listener. */
#define JI_ACCEPT_PAUSE_MS 100

/**
 * Default for --max-memory: what all requests of the process together may hold (a small VM's share). Uploads
 * reserve their worst case before their body is read; past the budget they get 503 with Retry-After.
 */
#define JI_DEFAULT_MAX_MEMORY (512ull * 1024 * 1024)
/**
 * What one upload holds besides its records, reserved from --max-memory: the inflate buffer, the COPY buffer and
 * its slack, two socket reads in the input buffer, and the parser's and ingest's own state, rounded up.
 */
#define JI_UPLOAD_FIXED_BYTES (1024u * 1024)
/**
 * A JSON Lines upload also reserves this many times --max-record-bytes: one record is held whole by yajl, whose
 * buffer grows by doubling, so it may take up to twice the record's bytes.
 */
#define JI_UPLOAD_RECORD_FACTOR 2

/* ---- database ---- */
/**
 * Idle database connections a worker keeps however long they stay unused. A worker keeps more idle, up to its
 * share of --max-ingests (rounded up), while they are in use again within JI_PG_IDLE_CLOSE_MS: with only these
 * few kept, every upload past them opened and closed a server process of its own, and under 16 connections from
 * clients (2 workers) that churn cost seconds-long stalls on a 2-core machine (docs/benchmarks.md, throughput).
 */
#define JI_PG_KEEP_IDLE 4
/** An idle connection beyond JI_PG_KEEP_IDLE of its worker that stays unused this long is closed (ms). */
#define JI_PG_IDLE_CLOSE_MS 5000
/** A connection attempt that has not finished after this long fails (ms). */
#define JI_PG_CONNECT_TIMEOUT_MS 10000
/** Lower bound of the connect timeout when libpq's connect_timeout asks for less (ms). */
#define JI_PG_CONNECT_TIMEOUT_MIN_MS 2000
/** Retry-After (seconds) of a 503 because the database is unavailable. */
#define JI_RETRY_AFTER_DB_S 5
/** Retry-After (seconds) of a 503 because a limit on work in progress is reached, or the server stops. */
#define JI_RETRY_AFTER_BUSY_S 1
/**
 * lock_timeout of the transactions of uploads, start-up and gc (ms): none of their statements waits for a lock
 * longer than this (a backstop: uploads with one Idempotency-Key do not wait at all, the second one gets 409).
 */
#define JI_PG_LOCK_TIMEOUT_MS 5000
/**
 * How long a connection given back after a failed request may take to end its COPY and roll back (ms); a
 * connection that takes longer is closed instead of going back to the pool.
 */
#define JI_PG_ROLLBACK_TIMEOUT_MS 10000
/** Between attempts to reach the database at start-up (seconds). */
#define JI_DB_RETRY_SECONDS 1

/* ---- the read side ---- */
/** Rows fetched by one export query (keyset pagination: WHERE user_id > last ORDER BY user_id LIMIT this). */
#define JI_EXPORT_PAGE_ROWS 1000
/** Bytes of an image file read and sent at a time. */
#define JI_IMAGE_CHUNK_BYTES (64u * 1024)
/** GET /readyz answers 503 when the database round trip takes longer than this many seconds. */
#define JI_READYZ_TIMEOUT_S 2

/* ---- the process ---- */
/** Most event-loop threads (--threads). */
#define JI_MAX_THREADS 256
/** How often a worker's loop wakes up to look for a stop request (ms). */
#define JI_STOP_POLL_MS 100
/** Default for --shutdown-grace (seconds): after SIGTERM, how long uploads in flight may take before they get 503. */
#define JI_DEFAULT_SHUTDOWN_GRACE_S 30
/** After the grace period, how long the 503 answers may take to be written before the process exits (ms). */
#define JI_STOP_ANSWER_MS 2000

/* ---- the command line ---- */
/**
 * Largest value of --max-ingests and of --idle-timeout (seconds): anything above is a typing mistake, and the
 * timeout in milliseconds must fit 32 bits.
 */
#define JI_MAX_FLAG_VALUE 1000000
/** Shortest bearer token accepted from --token-file (bytes): a short token can be guessed. */
#define JI_MIN_TOKEN_BYTES 16

/* ---- access log and request metrics ---- */
/**
 * Bytes of a request's path kept for its access-log line (the rest is cut, and the line says "path_truncated"):
 * every route's path is far shorter; only junk is longer, and the line must stay one atomic write.
 */
#define JI_ACCESS_LOG_PATH_BYTES 256
/**
 * Longest access-log line, newline included: PIPE_BUF on Linux. One line is one write(2); on a pipe (stderr
 * read by a supervisor) writes up to PIPE_BUF are atomic, so lines of several threads never interleave. A path
 * of JI_ACCESS_LOG_PATH_BYTES escaped at worst (6 bytes each) plus the other fields stays well under it.
 */
#define JI_ACCESS_LOG_LINE_BYTES 4096
/**
 * Upper bounds (seconds) of the buckets of jsonl_ingest_request_duration_seconds, from a health probe (ms) to a
 * multi-gigabyte upload (minutes); +Inf is implied. JI_REQUEST_DURATION_BUCKET_COUNT must match the list.
 */
#define JI_REQUEST_DURATION_BUCKETS 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300
#define JI_REQUEST_DURATION_BUCKET_COUNT 14

#endif
