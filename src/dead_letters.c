/*
 * dead_letters.c — owns the spool of one skip-mode upload's rejected records
 * (dead_letters.h): the capture of the line being read, the kept records,
 * and their COPY rows.
 *
 * Spool layout, record after record from offset 0 to `kept_end`:
 *   spool_header_t | record bytes (len) | field (field_len) | error (error_len)
 * The line being read sits at `kept_end`: its first JI_DEAD_LETTER_MEMORY_BYTES
 * in `buf`, the rest already in the spool after room for its header and that
 * first part, so keeping it writes only the header, the first part and the
 * two texts. Forgetting it costs nothing: the next line overwrites it.
 */
#include "dead_letters.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "service_limits.h"

_Static_assert(JI_DEAD_LETTER_KEEP_BYTES <= JI_DEAD_LETTER_MEMORY_BYTES,
               "a truncated record is the part of its line held in memory");

typedef struct {
    uint64_t line;
    uint64_t len; /**< record bytes */
    uint32_t error_len;
    uint16_t field_len;
    uint8_t truncated;
    uint8_t pad;
} spool_header_t;

struct st_ji_dead_letters_t {
    int dir_fd;
    int fd; /**< the spool, -1 until first needed */
    uint64_t kept_end;
    uint64_t count;

    /* the line being read */
    uint64_t line_len;
    char last_byte;

    /* reading back (ji_dead_letters_copy_rows) */
    uint64_t read_off;    /**< header of the record being written out */
    bool row_open;        /**< its first columns are out, its bytes are being written */
    spool_header_t cur;   /**< its header */
    uint64_t cur_written; /**< its record bytes written out so far */

    char buf[JI_DEAD_LETTER_MEMORY_BYTES]; /**< the line's first bytes; then the read-back buffer */
};

ji_dead_letters_t *ji_dead_letters_new(int dir_fd)
{
    ji_dead_letters_t *d = malloc(sizeof(*d));

    if (d == NULL)
        return NULL;
    memset(d, 0, offsetof(ji_dead_letters_t, buf));
    d->dir_fd = dir_fd;
    d->fd = -1;
    return d;
}

void ji_dead_letters_free(ji_dead_letters_t *d)
{
    if (d == NULL)
        return;
    if (d->fd != -1)
        close(d->fd);
    free(d);
}

/** Opens the unnamed spool file (a named one unlinked at once where O_TMPFILE is not supported). */
static int open_spool(ji_dead_letters_t *d, ji_error_t *err)
{
    char name[64];

    if (d->fd != -1)
        return 0;
    d->fd = openat(d->dir_fd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (d->fd != -1)
        return 0;
    if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
        return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "cannot create the dead-letter spool: %s", strerror(errno));
    for (unsigned i = 0; i < 16; i++) {
        snprintf(name, sizeof(name), ".dead-letters-%ld-%p-%u", (long)getpid(), (void *)d, i);
        d->fd = openat(d->dir_fd, name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (d->fd != -1) {
            unlinkat(d->dir_fd, name, 0);
            return 0;
        }
        if (errno != EEXIST)
            break;
    }
    return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "cannot create the dead-letter spool: %s", strerror(errno));
}

static int write_at(ji_dead_letters_t *d, const void *data, size_t len, uint64_t off, ji_error_t *err)
{
    const char *p = data;

    while (len > 0) {
        ssize_t n = pwrite(d->fd, p, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return ji_error_set(err, n < 0 && (errno == ENOSPC || errno == EDQUOT) ? JI_ERR_DISK_FULL : JI_ERR_INTERNAL,
                                0, NULL, "writing the dead-letter spool failed: %s",
                                n < 0 ? strerror(errno) : "no progress");
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/** Writes the `n` parts at `off`, in order, back to back. */
static int write_parts_at(ji_dead_letters_t *d, const struct iovec *parts, int n, uint64_t off, ji_error_t *err)
{
    size_t total = 0, done;
    ssize_t w;

    for (int i = 0; i < n; i++)
        total += parts[i].iov_len;
    do
        w = pwritev(d->fd, parts, n, (off_t)off);
    while (w < 0 && errno == EINTR);
    if (w == (ssize_t)total)
        return 0;
    if (w < 0)
        return ji_error_set(err, errno == ENOSPC || errno == EDQUOT ? JI_ERR_DISK_FULL : JI_ERR_INTERNAL, 0, NULL,
                            "writing the dead-letter spool failed: %s", strerror(errno));
    /* a short write: the rest part by part */
    done = (size_t)w;
    for (int i = 0; i < n; i++) {
        size_t len = parts[i].iov_len;
        if (done >= len) {
            done -= len;
            off += len;
            continue;
        }
        if (write_at(d, (const char *)parts[i].iov_base + done, len - done, off + done, err) != 0)
            return -1;
        off += len;
        done = 0;
    }
    return 0;
}

static int read_at(ji_dead_letters_t *d, void *data, size_t len, uint64_t off, ji_error_t *err)
{
    char *p = data;

    while (len > 0) {
        ssize_t n = pread(d->fd, p, len, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "reading the dead-letter spool failed: %s",
                                n < 0 ? strerror(errno) : "it is shorter than written");
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

int ji_dead_letters_line_data(ji_dead_letters_t *d, const char *data, size_t len, ji_error_t *err)
{
    if (len == 0)
        return 0;
    if (d->line_len < sizeof(d->buf)) {
        size_t n = sizeof(d->buf) - (size_t)d->line_len;
        if (n > len)
            n = len;
        memcpy(d->buf + d->line_len, data, n);
        d->line_len += n;
        d->last_byte = data[n - 1];
        data += n;
        len -= n;
        if (len == 0)
            return 0;
    }
    /* past the part in memory: straight to its place in the spool */
    if (open_spool(d, err) != 0 || write_at(d, data, len, d->kept_end + sizeof(spool_header_t) + d->line_len, err) != 0)
        return -1;
    d->line_len += len;
    d->last_byte = data[len - 1];
    return 0;
}

uint64_t ji_dead_letters_line_bytes(const ji_dead_letters_t *d)
{
    return d->line_len;
}

void ji_dead_letters_line_forget(ji_dead_letters_t *d)
{
    d->line_len = 0;
}

int ji_dead_letters_keep(ji_dead_letters_t *d, const ji_error_t *why, bool truncated, ji_error_t *err)
{
    spool_header_t h = {.line = why->line, .len = d->line_len, .truncated = truncated};
    uint64_t off = d->kept_end;

    if (truncated && h.len > JI_DEAD_LETTER_KEEP_BYTES)
        h.len = JI_DEAD_LETTER_KEEP_BYTES;
    if (!truncated && h.len > 0 && d->last_byte == '\r')
        h.len--; /* CRLF: the line end is not part of the record */
    h.field_len = (uint16_t)strnlen(why->field, sizeof(why->field));
    h.error_len = (uint32_t)strnlen(why->message, sizeof(why->message));
    size_t held = h.len < sizeof(d->buf) ? (size_t)h.len : sizeof(d->buf);
    struct iovec parts[4] = {{&h, sizeof(h)},
                             {d->buf, held},
                             {(void *)why->field, h.field_len},
                             {(void *)why->message, h.error_len}};

    if (open_spool(d, err) != 0)
        goto fail;
    if (held == h.len) { /* all of it was in memory: one write */
        if (write_parts_at(d, parts, 4, off, err) != 0)
            goto fail;
    } else if (write_parts_at(d, parts, 2, off, err) != 0 ||
               write_parts_at(d, parts + 2, 2, off + sizeof(h) + h.len, err) != 0) { /* the rest is in place */
        goto fail;
    }
    d->kept_end = off + sizeof(h) + h.len + h.field_len + h.error_len;
    d->count++;
    d->line_len = 0;
    return 0;

fail:
    d->line_len = 0;
    return -1;
}

uint64_t ji_dead_letters_count(const ji_dead_letters_t *d)
{
    return d->count;
}

/* ---- reading back ---- */

/** Appends `s` escaped for COPY text (backslash, tab, newline, carriage return); `dst` has room for 2 * n. */
static size_t put_copy_text(char *dst, const char *s, size_t n)
{
    size_t len = 0;

    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\\' || c == '\t' || c == '\n' || c == '\r') {
            dst[len++] = '\\';
            c = c == '\t' ? 't' : c == '\n' ? 'n' : c == '\r' ? 'r' : '\\';
        }
        dst[len++] = c;
    }
    return len;
}

/** The first columns of the record at read_off, up to the bytea's "\\x". Bytes written, or -1. */
static ptrdiff_t open_row(ji_dead_letters_t *d, int64_t batch_id, char *dst, ji_error_t *err)
{
    char texts[sizeof(((ji_error_t *)0)->field) + sizeof(((ji_error_t *)0)->message)];
    size_t len;

    if (read_at(d, &d->cur, sizeof(d->cur), d->read_off, err) != 0)
        return -1;
    if (d->cur.field_len + (size_t)d->cur.error_len > sizeof(texts))
        return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "the dead-letter spool is damaged");
    if (read_at(d, texts, d->cur.field_len + (size_t)d->cur.error_len, d->read_off + sizeof(d->cur) + d->cur.len,
                err) != 0)
        return -1;
    len = (size_t)sprintf(dst, "%" PRId64 "\t%" PRIu64 "\t", batch_id, d->cur.line);
    len += put_copy_text(dst + len, texts + d->cur.field_len, d->cur.error_len);
    dst[len++] = '\t';
    if (d->cur.field_len == 0) {
        memcpy(dst + len, "\\N", 2);
        len += 2;
    } else {
        len += put_copy_text(dst + len, texts, d->cur.field_len);
    }
    memcpy(dst + len, "\t\\\\x", 4);
    len += 4;
    d->row_open = true;
    d->cur_written = 0;
    return (ptrdiff_t)len;
}

/** Room a row's first columns may take: two numbers, the escaped texts, separators. */
#define ROW_OPEN_MAX (64 + 2 * (sizeof(((ji_error_t *)0)->field) + sizeof(((ji_error_t *)0)->message)))
/** Room a row's end takes: "\tt\n". */
#define ROW_CLOSE_MAX 4
_Static_assert(ROW_OPEN_MAX + ROW_CLOSE_MAX + 2 <= JI_DEAD_LETTERS_COPY_MIN, "a row's frame fits the minimum room");

ptrdiff_t ji_dead_letters_copy_rows(ji_dead_letters_t *d, int64_t batch_id, char *dst, size_t cap, ji_error_t *err)
{
    static const char hex[] = "0123456789abcdef";
    size_t len = 0;

    while (d->read_off < d->kept_end) {
        if (!d->row_open) {
            if (cap - len < ROW_OPEN_MAX + ROW_CLOSE_MAX + 2)
                break;
            ptrdiff_t n = open_row(d, batch_id, dst + len, err);
            if (n < 0)
                return -1;
            len += (size_t)n;
        }
        while (d->cur_written < d->cur.len) {
            size_t room = (cap - len) / 2, n = sizeof(d->buf);
            if (room == 0)
                return (ptrdiff_t)len;
            if (n > room)
                n = room;
            if (n > d->cur.len - d->cur_written)
                n = (size_t)(d->cur.len - d->cur_written);
            if (read_at(d, d->buf, n, d->read_off + sizeof(d->cur) + d->cur_written, err) != 0)
                return -1;
            for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char)d->buf[i];
                dst[len++] = hex[c >> 4];
                dst[len++] = hex[c & 15];
            }
            d->cur_written += n;
        }
        if (cap - len < ROW_CLOSE_MAX)
            break;
        memcpy(dst + len, d->cur.truncated ? "\tt\n" : "\tf\n", 3);
        len += 3;
        d->row_open = false;
        d->read_off += sizeof(d->cur) + d->cur.len + d->cur.field_len + d->cur.error_len;
    }
    return (ptrdiff_t)len;
}
