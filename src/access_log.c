/*
 * access_log.c — the access log's destination (stderr, a file reopened on
 * SIGHUP, or nothing) and the JSON line of one request. See access_log.h for
 * what concurrent writers rely on.
 */
#include "access_log.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define ACCESS_LOG_FILE_MODE 0640

static int open_file(const char *path, ji_error_t *err)
{
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, ACCESS_LOG_FILE_MODE);

    if (fd == -1)
        ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "--access-log %s: %s", path, strerror(errno));
    return fd;
}

int ji_access_log_open(ji_access_log_t *log, const char *spec, ji_error_t *err)
{
    memset(log, 0, sizeof(*log));
    if (spec == NULL || strcmp(spec, "-") == 0) {
        log->fd = STDERR_FILENO;
        return 0;
    }
    if (strcmp(spec, "off") == 0) {
        log->fd = -1;
        return 0;
    }
    log->path = spec;
    if ((log->fd = open_file(spec, err)) == -1)
        return -1;
    if (log->fd <= STDERR_FILENO) { /* a standard descriptor was closed: keep the log off their numbers */
        int fd = fcntl(log->fd, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
        close(log->fd);
        if ((log->fd = fd) == -1)
            return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "--access-log %s: %s", spec, strerror(errno));
    }
    return 0;
}

int ji_access_log_reopen(ji_access_log_t *log, ji_error_t *err)
{
    int fd;

    if (log->path == NULL)
        return 0;
    if ((fd = open_file(log->path, err)) == -1)
        return -1; /* lines go on into the old file */
    if (dup3(fd, log->fd, O_CLOEXEC) == -1) {
        ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "--access-log %s: %s", log->path, strerror(errno));
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

void ji_access_log_close(ji_access_log_t *log)
{
    if (log->fd > STDERR_FILENO)
        close(log->fd);
    log->fd = -1;
}

/* ------------------------------------------------------------------ the histogram */

const double ji_request_duration_bounds[JI_REQUEST_DURATION_BUCKET_COUNT] = {JI_REQUEST_DURATION_BUCKETS};
_Static_assert(sizeof((double[]){JI_REQUEST_DURATION_BUCKETS}) / sizeof(double) == JI_REQUEST_DURATION_BUCKET_COUNT,
               "JI_REQUEST_DURATION_BUCKET_COUNT must count JI_REQUEST_DURATION_BUCKETS");

void ji_request_durations_observe(ji_request_durations_t *d, int route_index, int status, double seconds)
{
    unsigned b = 0;
    int cls = status / 100 - 2;

    if (cls < 0 || cls >= JI_STATUS_CLASS_COUNT)
        return;
    if (route_index < 0 || route_index > JI_ROUTE_COUNT)
        route_index = JI_ROUTE_COUNT;
    while (b < JI_REQUEST_DURATION_BUCKET_COUNT && seconds > ji_request_duration_bounds[b])
        b++;
    atomic_fetch_add_explicit(&d->buckets[route_index][cls][b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&d->sum_us[route_index][cls], (uint64_t)(seconds * 1e6 + 0.5), memory_order_relaxed);
    atomic_fetch_add_explicit(&d->count[route_index][cls], 1, memory_order_relaxed);
}

/* ------------------------------------------------------------------ the line */

/** A bounded writer into the line's buffer; `len` stops growing at `cap - 1`. */
typedef struct {
    char *buf;
    size_t cap, len;
} line_t;

static void put(line_t *l, const char *s, size_t n)
{
    if (n > l->cap - 1 - l->len)
        n = l->cap - 1 - l->len;
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

static void puts_(line_t *l, const char *s)
{
    put(l, s, strlen(s));
}

static void putf(line_t *l, const char *fmt, ...) JI_PRINTF(2, 3);
static void putf(line_t *l, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n > 0)
        put(l, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/**
 * A JSON string of arbitrary bytes, in printable ASCII only: '"' and '\' escaped, every byte outside 0x20-0x7e
 * written as \u00XX (its value). Paths are ASCII on the wire (percent-encoded); any other byte is junk worth
 * seeing as it came, and the line stays valid JSON and valid UTF-8 whatever the client sent.
 */
static void put_json_string(line_t *l, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";

    put(l, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            put(l, esc, 2);
        } else if (c < 0x20 || c > 0x7e) {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            put(l, esc, 6);
        } else {
            put(l, (const char *)&c, 1);
        }
    }
    put(l, "\"", 1);
}

static void put_time(line_t *l, const struct timespec *ts)
{
    struct tm tm;
    char tmp[40];
    time_t t = ts->tv_sec;

    gmtime_r(&t, &tm);
    strftime(tmp, sizeof(tmp), "%Y-%m-%dT%H:%M:%S", &tm);
    putf(l, "\"%s.%03ldZ\"", tmp, (long)(ts->tv_nsec / 1000000));
}

double ji_access_entry_seconds(const struct timespec *start, const struct timespec *end)
{
    double s = (double)(end->tv_sec - start->tv_sec) + (double)(end->tv_nsec - start->tv_nsec) / 1e9;
    return s > 0 ? s : 0;
}

size_t ji_access_log_format(const ji_access_entry_t *e, const char *client, const struct timespec *end, char *buf,
                            size_t cap)
{
    line_t l = {buf, cap, 0};

    puts_(&l, "{\"time\":");
    put_time(&l, &e->wall);
    puts_(&l, ",\"client\":");
    put_json_string(&l, client, strlen(client));
    if (e->has_head) {
        puts_(&l, ",\"method\":");
        put_json_string(&l, e->method, strlen(e->method));
        puts_(&l, ",\"path\":");
        put_json_string(&l, e->path, e->path_len);
    } else {
        puts_(&l, ",\"method\":null,\"path\":null");
    }
    if (e->path_truncated)
        puts_(&l, ",\"path_truncated\":true");
    puts_(&l, ",\"route\":");
    put_json_string(&l, e->route, strlen(e->route));
    if (e->status != 0)
        putf(&l, ",\"status\":%d", e->status);
    else
        puts_(&l, ",\"status\":null");
    putf(&l, ",\"body_bytes\":%" PRIu64, e->body_bytes);
    if (e->upload)
        putf(&l, ",\"rows\":%" PRIu64 ",\"images\":%" PRIu64, e->rows, e->images);
    else
        puts_(&l, ",\"rows\":null,\"images\":null");
    putf(&l, ",\"ms\":%.3f", ji_access_entry_seconds(&e->start, end) * 1000.0);
    if (e->batch_id != 0)
        putf(&l, ",\"batch_id\":%" PRId64, e->batch_id);
    else
        puts_(&l, ",\"batch_id\":null");
    /* the closing brace and the newline always fit: the fields above are bounded far below `cap` */
    if (l.len > cap - 3)
        l.len = cap - 3;
    memcpy(l.buf + l.len, "}\n", 3);
    return l.len + 2;
}

void ji_access_log_write(ji_access_log_t *log, const ji_access_entry_t *e, const char *client,
                         const struct timespec *end)
{
    char buf[JI_ACCESS_LOG_LINE_BYTES];
    size_t len;
    ssize_t n;

    if (log->fd == -1)
        return;
    len = ji_access_log_format(e, client, end, buf, sizeof(buf));
    do
        n = write(log->fd, buf, len); /* one write: a retry after a short write could interleave with others */
    while (n == -1 && errno == EINTR);
    if (n == (ssize_t)len)
        atomic_fetch_add_explicit(&log->lines_written, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&log->lines_failed, 1, memory_order_relaxed);
}
