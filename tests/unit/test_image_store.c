/*
 * test_image_store.c — the images directory: files compared byte for byte
 * with the bytes that were encoded, type detection from magic bytes, data:
 * URLs, invalid base64 found early or midway, remove/commit/abort, gc after
 * a real crash (a child process that exits without commit or abort), gc
 * leaving a live batch alone, and disk full on a tiny tmpfs (in a private
 * mount namespace; skipped with a message when that is not allowed). Each
 * test works in its own mkdtemp directory under /tmp and removes it.
 *
 * Hardening: symlinks planted under the images directory (shards, a
 * .pending, a row's path, a journal line) never lead a write, a read or gc
 * outside it, with openat2 and with the walk that replaces it; files are
 * created 0640 and directories 0750 (less the umask).
 */
#include "image_store.h"
#include "unit.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <openssl/evp.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- helpers ---- */


/* Standard padded base64 of `raw` (malloc'd, NUL-terminated). */
static char *b64(const unsigned char *raw, size_t n, size_t *len)
{
    char *out = malloc(4 * (n / 3 + 2) + 1);
    *len = (size_t)EVP_EncodeBlock((unsigned char *)out, raw, (int)n);
    return out;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void rm_tree(const char *dir)
{
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

typedef struct {
    char parent[48]; /**< the mkdtemp directory, removed by teardown */
    char dir[80];    /**< the images directory, below it */
    ji_image_store_t store;
    ji_error_t err;
} fixture_t;

/* A fresh images directory below a new temporary directory under `base`. */
static bool setup_in(fixture_t *f, bool fsync, const char *base)
{
    memset(f, 0, sizeof(*f));
    snprintf(f->parent, sizeof(f->parent), "%s/ji-img-XXXXXX", base);
    if (mkdtemp(f->parent) == NULL) {
        CHECK(!"mkdtemp");
        return false;
    }
    /* a directory that does not exist yet: open creates it */
    snprintf(f->dir, sizeof(f->dir), "%s/images/sub", f->parent);
    CHECK_EQ_INT(ji_image_store_open(&f->store, f->dir, fsync, &f->err), 0);
    return f->store.dir_fd >= 0;
}

static bool setup(fixture_t *f, bool fsync)
{
    return setup_in(f, fsync, "/tmp");
}

/* Tests that plant thousands of entries use a tmpfs when there is one (a disk makes each one cost ~1 ms). */
static bool setup_fast(fixture_t *f)
{
    struct stat st;
    return setup_in(f, false,
                    stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && access("/dev/shm", W_OK) == 0 ? "/dev/shm"
                                                                                                       : "/tmp");
}

static void teardown(fixture_t *f)
{
    ji_image_store_close(&f->store);
    rm_tree(f->parent);
}

static int count_cb_n;
static int count_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    if (flag == FTW_F && strstr(path, "/.pending/") == NULL)
        count_cb_n++;
    return 0;
}

/* Image files under the store (everything but .pending). */
static int count_files(const fixture_t *f)
{
    count_cb_n = 0;
    nftw(f->dir, count_entry, 16, FTW_PHYS);
    return count_cb_n;
}

static int count_journals(const fixture_t *f)
{
    char path[128];
    int n = 0;
    DIR *d;
    struct dirent *de;

    snprintf(path, sizeof(path), "%s/.pending", f->dir);
    if ((d = opendir(path)) == NULL)
        return -1;
    while ((de = readdir(d)) != NULL)
        if (de->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static bool exists(const fixture_t *f, const char *rel)
{
    struct stat st;
    return fstatat(f->store.dir_fd, rel, &st, 0) == 0;
}

/* The file equals `raw`. */
static bool file_is(const fixture_t *f, const char *rel, const unsigned char *raw, size_t n)
{
    int fd = openat(f->store.dir_fd, rel, O_RDONLY);
    unsigned char *buf = malloc(n + 1);
    size_t got = 0;
    ssize_t r;
    bool ok;

    if (fd < 0) {
        free(buf);
        return false;
    }
    while ((r = read(fd, buf + got, n + 1 - got)) > 0)
        got += (size_t)r;
    close(fd);
    ok = got == n && memcmp(buf, raw, n) == 0;
    free(buf);
    return ok;
}

/* "ab/cd/abcd<28 hex>.<ext>" */
static bool path_shape(const char *p, const char *ext)
{
    size_t n = strlen(p);

    if (n != 6 + 32 + 1 + strlen(ext) || p[2] != '/' || p[5] != '/' || p[38] != '.' || strcmp(p + 39, ext) != 0)
        return false;
    for (int i = 6; i < 38; i++)
        if (!strchr("0123456789abcdef", p[i]))
            return false;
    return memcmp(p, p + 6, 2) == 0 && memcmp(p + 3, p + 8, 2) == 0;
}

/* Stores `raw` (as base64 text, wrapped or not) and checks the result; returns the write's result. */
static int store_bytes(fixture_t *f, ji_image_batch_t *b, const unsigned char *raw, size_t n, ji_image_info_t *info)
{
    size_t len;
    char *text = b64(raw, n, &len);
    int rc = ji_image_batch_write(b, 7, text, len, info, &f->err);
    if (rc == 0) {
        CHECK_EQ_INT(info->size, n);
        CHECK(file_is(f, info->path, raw, n));
    }
    free(text);
    return rc;
}

/* ---- tests ---- */

static void test_open(void)
{
    fixture_t f;
    ji_image_store_t s2;
    ji_error_t err;

    if (!setup(&f, false))
        return;
    CHECK(exists(&f, ".pending"));
    CHECK_EQ_STR(f.store.dir, f.dir);
    /* a second open of the same directory is fine */
    CHECK_EQ_INT(ji_image_store_open(&s2, f.dir, false, &err), 0);
    ji_image_store_close(&s2);
    /* a path through a regular file cannot be opened */
    {
        char bad[128];
        int fd;
        snprintf(bad, sizeof(bad), "%s/plain", f.dir);
        fd = open(bad, O_CREAT | O_WRONLY, 0644);
        close(fd);
        snprintf(bad, sizeof(bad), "%s/plain/images", f.dir);
        CHECK_EQ_INT(ji_image_store_open(&s2, bad, false, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_INTERNAL);
        CHECK(strstr(err.message, "plain/images") != NULL);
        unlink(bad);
    }
    teardown(&f);
}

static void test_magic(void)
{
    static const struct {
        const char *name;
        const char *magic;
        size_t magic_len;
        const char *ext, *mime;
    } cases[] = {
        {"png", "\x89PNG\r\n\x1a\n\0\0\0\rIHDR", 16, "png", "image/png"},
        {"jpeg", "\xff\xd8\xff\xe0\0\x10JFIF", 10, "jpg", "image/jpeg"},
        {"gif87", "GIF87a", 6, "gif", "image/gif"},
        {"gif89", "GIF89a", 6, "gif", "image/gif"},
        {"webp", "RIFF\x24\0\0\0WEBPVP8 ", 16, "webp", "image/webp"},
        {"riff-wave", "RIFF\x24\0\0\0WAVEfmt ", 16, "bin", "application/octet-stream"},
        {"bmp", "BM\x36\0\0\0", 6, "bmp", "image/bmp"},
        {"tiff-le", "II*\0\x08\0\0\0", 8, "tiff", "image/tiff"},
        {"tiff-be", "MM\0*\0\0\0\x08", 8, "tiff", "image/tiff"},
        {"ico", "\0\0\1\0\1\0\x10\x10", 8, "ico", "image/x-icon"},
        {"avif",
         "\0\0\0\x1c"
         "ftypavif\0\0\0\0avifmif1miaf",
         28, "avif", "image/avif"},
        {"avif-compat",
         "\0\0\0\x1c"
         "ftypmif1\0\0\0\0mif1avifmiaf",
         28, "avif", "image/avif"},
        {"heic",
         "\0\0\0\x18"
         "ftypheic\0\0\0\0mif1heic",
         24, "heic", "image/heic"},
        {"heic-compat",
         "\0\0\0\x18"
         "ftypmif1\0\0\0\0mif1heic",
         24, "heic", "image/heic"},
        {"mp4",
         "\0\0\0\x18"
         "ftypisom\0\0\0\0isomiso2",
         24, "bin", "application/octet-stream"},
        {"brand-past-box",
         "\0\0\0\x10"
         "ftypmif1\0\0\0\0heic",
         20, "bin", "application/octet-stream"},
        {"text", "hello world", 11, "bin", "application/octet-stream"},
        {"one-byte", "\x89", 1, "bin", "application/octet-stream"},
        {"jpeg-short", "\xff\xd8\xff", 3, "jpg", "image/jpeg"},
    };
    fixture_t f;
    rng_t r = {77};
    ji_image_batch_t *b;

    if (!setup(&f, false))
        return;
    CHECK((b = ji_image_batch_begin(&f.store, &f.err)) != NULL);
    if (b == NULL)
        goto out;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        /* the magic alone, then the magic followed by random bytes */
        for (int tail = 0; tail < 2; tail++) {
            size_t n = cases[i].magic_len + (tail ? 5000 : 0);
            unsigned char *raw = malloc(n);
            ji_image_info_t info;
            memcpy(raw, cases[i].magic, cases[i].magic_len);
            rng_fill(&r, raw + cases[i].magic_len, n - cases[i].magic_len);
            CHECK_EQ_INT(store_bytes(&f, b, raw, n, &info), 0);
            CHECK_EQ_STR(info.mime, cases[i].mime);
            CHECK(path_shape(info.path, cases[i].ext));
            if (strcmp(info.mime, cases[i].mime) != 0 || !path_shape(info.path, cases[i].ext))
                fprintf(stderr, "  case %s (tail %d): %s %s\n", cases[i].name, tail, info.path, info.mime);
            free(raw);
        }
    }
    CHECK_EQ_INT(ji_image_batch_count(b), 2 * sizeof(cases) / sizeof(cases[0]));
    ji_image_batch_commit(b);
    CHECK_EQ_INT(count_files(&f), 2 * sizeof(cases) / sizeof(cases[0]));
out:
    teardown(&f);
}

/* The type is decided on the first bytes even when whitespace delays them past the first decode step, or when the
 * first step ends after only a few decoded bytes. */
static void test_magic_after_whitespace(void)
{
    fixture_t f;
    ji_image_batch_t *b;
    ji_image_info_t info;
    const unsigned char png[] = "\x89PNG\r\n\x1a\n0123456789abcdef0123456789abcdef0123456789abcdef0123456789";
    size_t enc_len;
    char *enc = b64(png, sizeof(png) - 1, &enc_len);
    char *text = malloc(200000 + 2 * enc_len + 1);
    /* whitespace before the data: none, more than one 64 KiB decode step, and ending 1..12 characters of data
     * into the first step (so it decodes 0..9 bytes, fewer than the magic needs) */
    size_t pads[2 + 12] = {0, 200000};

    for (size_t k = 1; k <= 12; k++)
        pads[1 + k] = 65536 - k;
    if (!setup(&f, false))
        goto out;
    b = ji_image_batch_begin(&f.store, &f.err);
    for (size_t i = 0; i < sizeof(pads) / sizeof(pads[0]); i++) {
        for (int spread = 0; spread < 2; spread++) {
            size_t n = pads[i];
            memset(text, ' ', pads[i]);
            for (size_t j = 0; j < enc_len; j++) {
                text[n++] = enc[j];
                if (spread) /* a newline after every character */
                    text[n++] = '\n';
            }
            CHECK_EQ_INT(ji_image_batch_write(b, 1, text, n, &info, &f.err), 0);
            CHECK_EQ_STR(info.mime, "image/png");
            CHECK(file_is(&f, info.path, png, sizeof(png) - 1));
        }
    }
    ji_image_batch_commit(b);
    teardown(&f);
out:
    free(enc);
    free(text);
}

static void test_big_files_and_commit(void)
{
    enum { N = 24 };
    fixture_t f;
    rng_t r = {1234};
    ji_image_batch_t *b;
    ji_image_info_t infos[N];
    unsigned char *raws[N];
    size_t sizes[N];

    if (!setup(&f, false))
        return;
    b = ji_image_batch_begin(&f.store, &f.err);
    CHECK(b != NULL && strlen(ji_image_batch_key(b)) == 32);
    for (int i = 0; i < N; i++) {
        /* around the 64 KiB decode step, and big */
        static const size_t fixed[] = {0, 1, 2, 3, 47, 48, 49, 49151, 49152, 49153, 65536, 1u << 20};
        size_t n = i < (int)(sizeof(fixed) / sizeof(fixed[0])) ? fixed[i] : rng_next(&r) % 400000;
        size_t len;
        char *enc;
        int rc;

        raws[i] = malloc(n + 1);
        sizes[i] = n;
        rng_fill(&r, raws[i], n);
        enc = b64(raws[i], n, &len);
        if (i % 3 == 1) { /* unpadded */
            while (len > 0 && enc[len - 1] == '=')
                len--;
        }
        if (i % 3 == 2) { /* JSON-unescaped MIME base64: a "\n" every 76 characters */
            char *w = malloc(len + len / 76 + 2);
            size_t k = 0;
            for (size_t j = 0; j < len; j++) {
                if (j > 0 && j % 76 == 0)
                    w[k++] = '\n';
                w[k++] = enc[j];
            }
            free(enc);
            enc = w;
            len = k;
        }
        rc = ji_image_batch_write(b, (uint64_t)i + 1, enc, len, &infos[i], &f.err);
        free(enc);
        if (n == 0) {
            CHECK_EQ_INT(rc, 1); /* empty text: no image */
            infos[i].path[0] = '\0';
            continue;
        }
        CHECK_EQ_INT(rc, 0);
        if (rc != 0)
            fprintf(stderr, "  %zu bytes: %s\n", n, f.err.message);
        CHECK_EQ_INT(infos[i].size, n);
        CHECK(file_is(&f, infos[i].path, raws[i], n));
    }
    CHECK_EQ_INT(ji_image_batch_count(b), N - 1);
    CHECK_EQ_INT(count_journals(&f), 1);
    CHECK_EQ_INT(ji_image_batch_sync(b, &f.err), 0);
    ji_image_batch_commit(b);
    CHECK_EQ_INT(count_journals(&f), 0);
    CHECK_EQ_INT(count_files(&f), N - 1);
    for (int i = 0; i < N; i++) {
        if (infos[i].path[0] != '\0')
            CHECK(file_is(&f, infos[i].path, raws[i], sizes[i]));
        free(raws[i]);
    }
    teardown(&f);
}

static void test_fsync_on(void)
{
    fixture_t f;
    rng_t r = {99};
    unsigned char raw[100000];
    ji_image_info_t a, c;
    ji_image_batch_t *b;

    if (!setup(&f, true))
        return;
    rng_fill(&r, raw, sizeof(raw));
    b = ji_image_batch_begin(&f.store, &f.err);
    CHECK_EQ_INT(store_bytes(&f, b, raw, sizeof(raw), &a), 0);
    CHECK_EQ_INT(store_bytes(&f, b, raw, 5000, &c), 0);
    CHECK_EQ_INT(ji_image_batch_sync(b, &f.err), 0);
    ji_image_batch_commit(b);
    CHECK(file_is(&f, a.path, raw, sizeof(raw)));
    CHECK(file_is(&f, c.path, raw, 5000));
    CHECK_EQ_INT(count_journals(&f), 0);
    teardown(&f);
}

static void test_no_image(void)
{
    fixture_t f;
    ji_image_batch_t *b;
    ji_image_info_t info;
    static const char *texts[] = {"", " ", "\n\r\t ", "data:image/png;base64,", "data:image/png;base64, \n"};

    if (!setup(&f, false))
        return;
    b = ji_image_batch_begin(&f.store, &f.err);
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++)
        CHECK_EQ_INT(ji_image_batch_write(b, 3, texts[i], strlen(texts[i]), &info, &f.err), 1);
    CHECK_EQ_INT(ji_image_batch_count(b), 0);
    CHECK_EQ_INT(count_files(&f), 0);
    ji_image_batch_abort(b);
    CHECK_EQ_INT(count_journals(&f), 0);
    teardown(&f);
}

static void test_data_urls(void)
{
    fixture_t f;
    ji_image_batch_t *b;
    ji_image_info_t info;
    const unsigned char gif[] = "GIF89a\x01\0\x01\0\x80\0\0";
    size_t enc_len;
    char *enc = b64(gif, sizeof(gif) - 1, &enc_len);
    static const char *good[] = {"data:image/gif;base64,",
                                 "DATA:IMAGE/GIF;BASE64,",
                                 "data:;base64,",
                                 "data:image/png;base64,", /* the bytes decide, not the URL */
                                 "data:image/gif;name=a.gif;base64,",
                                 "Data:image/gif;Base64,"};
    static const char *bad[] =
        {"data:image/gif,",       "data:image/gif;base64",          "data:",  "data:base64,", "data:image/gif;base64x,",
         "data:image/gif;bas64,", "data:text/plain;charset=utf-8,", "data:,", "data:x,"};
    char text[256];

    if (!setup(&f, false))
        goto out;
    b = ji_image_batch_begin(&f.store, &f.err);
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        int n = snprintf(text, sizeof(text), "%s%s", good[i], enc);
        CHECK_EQ_INT(ji_image_batch_write(b, 5, text, (size_t)n, &info, &f.err), 0);
        CHECK_EQ_STR(info.mime, "image/gif");
        CHECK(file_is(&f, info.path, gif, sizeof(gif) - 1));
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int n = snprintf(text, sizeof(text), "%s%s", bad[i], enc);
        ji_error_clear(&f.err);
        CHECK_EQ_INT(ji_image_batch_write(b, 9, text, (size_t)n, &info, &f.err), -1);
        CHECK_EQ_INT(f.err.kind, JI_ERR_INVALID);
        CHECK_EQ_INT(ji_error_http_status(f.err.kind), 422);
        CHECK_EQ_INT(f.err.line, 9);
        CHECK_EQ_STR(f.err.field, "image");
        CHECK(strstr(f.err.message, "data URL is not base64") != NULL);
    }
    /* not a URL: "data" is fine base64, "data:" without the colon's meaning is invalid base64 */
    CHECK_EQ_INT(ji_image_batch_write(b, 1, "data", 4, &info, &f.err), 0);
    CHECK_EQ_INT(info.size, 3);
    CHECK_EQ_INT(ji_image_batch_write(b, 1, " data:image/gif;base64,R0lG", 27, &info, &f.err), -1);
    CHECK(strstr(f.err.message, "not valid base64") != NULL);
    CHECK_EQ_INT(ji_image_batch_count(b), sizeof(good) / sizeof(good[0]) + 1);
    ji_image_batch_commit(b);
    CHECK_EQ_INT(count_files(&f), sizeof(good) / sizeof(good[0]) + 1);
    teardown(&f);
out:
    free(enc);
}

static void test_invalid(void)
{
    fixture_t f;
    rng_t r = {5};
    ji_image_batch_t *b;
    ji_image_info_t info;
    size_t n = 300000, len;
    unsigned char *raw = malloc(n);
    char *enc;
    static const struct {
        const char *text;
        const char *why;
    } small[] = {
        {"QUJD!", "alphabet"}, {"QU-D", "URL-safe"}, {"QQ==QQ==", "after"}, {"QUJDR", "left over"},
        {"QQ=", "padding"},    {"Q", "left over"},   {"=", "padding"},      {"QUJD\xc3\xa9", "non-ASCII"},
    };

    if (!setup(&f, false))
        goto out;
    b = ji_image_batch_begin(&f.store, &f.err);
    for (size_t i = 0; i < sizeof(small) / sizeof(small[0]); i++) {
        ji_error_clear(&f.err);
        CHECK_EQ_INT(ji_image_batch_write(b, 11, small[i].text, strlen(small[i].text), &info, &f.err), -1);
        CHECK_EQ_INT(f.err.kind, JI_ERR_INVALID);
        CHECK_EQ_INT(f.err.line, 11);
        CHECK_EQ_STR(f.err.field, "image");
        CHECK(strncmp(f.err.message, "image is not valid base64: ", 27) == 0);
        CHECK(strstr(f.err.message, small[i].why) != NULL);
        if (strstr(f.err.message, small[i].why) == NULL)
            fprintf(stderr, "  \"%s\": %s\n", small[i].text, f.err.message);
    }
    CHECK_EQ_INT(count_files(&f), 0);

    /* found midway, after the file was created and partly written: the file goes */
    rng_fill(&r, raw, n);
    memcpy(raw, "\x89PNG\r\n\x1a\n", 8);
    enc = b64(raw, n, &len);
    enc[len - 1000] = '_';
    ji_error_clear(&f.err);
    CHECK_EQ_INT(ji_image_batch_write(b, 12, enc, len, &info, &f.err), -1);
    CHECK_EQ_INT(f.err.kind, JI_ERR_INVALID);
    CHECK_EQ_INT(f.err.line, 12);
    CHECK_EQ_INT(count_files(&f), 0);
    /* a lone extra character at the very end */
    enc[len - 1000] = 'A';
    enc[len - 1] = 'A';
    enc[len] = 'A';
    CHECK_EQ_INT(ji_image_batch_write(b, 13, enc, len + 1, &info, &f.err), -1);
    CHECK(strstr(f.err.message, "left over") != NULL || strstr(f.err.message, "padding") != NULL);
    CHECK_EQ_INT(count_files(&f), 0);
    CHECK_EQ_INT(ji_image_batch_count(b), 0);
    /* the batch still works after errors */
    CHECK_EQ_INT(ji_image_batch_write(b, 14, "QUJD", 4, &info, &f.err), 0);
    ji_image_batch_abort(b);
    CHECK_EQ_INT(count_files(&f), 0);
    CHECK_EQ_INT(count_journals(&f), 0);
    free(enc);
    teardown(&f);
out:
    free(raw);
}

static void test_remove_and_abort(void)
{
    enum { N = 10 };
    fixture_t f;
    rng_t r = {31};
    ji_image_batch_t *b;
    ji_image_info_t info[N];
    unsigned char raw[20000];

    if (!setup(&f, false))
        return;
    /* remove one, commit: the others stay */
    b = ji_image_batch_begin(&f.store, &f.err);
    for (int i = 0; i < 3; i++) {
        rng_fill(&r, raw, sizeof(raw));
        CHECK_EQ_INT(store_bytes(&f, b, raw, sizeof(raw), &info[i]), 0);
    }
    ji_image_batch_remove(b, &info[1]);
    CHECK_EQ_INT(ji_image_batch_count(b), 2);
    CHECK(!exists(&f, info[1].path));
    CHECK(exists(&f, info[0].path) && exists(&f, info[2].path));
    ji_image_batch_commit(b);
    CHECK(exists(&f, info[0].path) && exists(&f, info[2].path));
    CHECK_EQ_INT(count_files(&f), 2);
    CHECK_EQ_INT(count_journals(&f), 0);

    /* another batch: remove one, abort: all of this batch's files go, the committed ones stay */
    b = ji_image_batch_begin(&f.store, &f.err);
    for (int i = 3; i < N; i++) {
        rng_fill(&r, raw, sizeof(raw));
        CHECK_EQ_INT(store_bytes(&f, b, raw, (size_t)i * 100, &info[i]), 0);
    }
    CHECK_EQ_INT(count_files(&f), N - 1);
    /* the journal lists exactly this batch's files, one "path\n" each, in order */
    {
        char want[N * 64] = "", got[N * 64 + 1], jpath[128];
        ssize_t n;
        int fd;
        for (int i = 3; i < N; i++) {
            strcat(want, info[i].path);
            strcat(want, "\n");
        }
        snprintf(jpath, sizeof(jpath), ".pending/%s.list", ji_image_batch_key(b));
        fd = openat(f.store.dir_fd, jpath, O_RDONLY);
        CHECK(fd >= 0);
        n = read(fd, got, sizeof(got) - 1);
        close(fd);
        got[n > 0 ? n : 0] = '\0';
        CHECK_EQ_STR(got, want);
    }
    ji_image_batch_remove(b, &info[5]);
    CHECK_EQ_INT(ji_image_batch_count(b), N - 4);
    ji_image_batch_abort(b);
    CHECK_EQ_INT(count_files(&f), 2);
    CHECK(exists(&f, info[0].path) && exists(&f, info[2].path));
    CHECK_EQ_INT(count_journals(&f), 0);
    teardown(&f);
}

/* Abort of a batch with more files than the journal read buffer holds lines. */
static void test_abort_many(void)
{
    fixture_t f;
    ji_image_batch_t *b;
    ji_image_info_t info;

    if (!setup(&f, false))
        return;
    b = ji_image_batch_begin(&f.store, &f.err);
    for (int i = 0; i < 1000; i++)
        CHECK_EQ_INT(ji_image_batch_write(b, 1, "iVBORw0KGgo", 11, &info, &f.err), 0);
    CHECK_EQ_INT(ji_image_batch_count(b), 1000);
    CHECK_EQ_INT(count_files(&f), 1000);
    ji_image_batch_abort(b);
    CHECK_EQ_INT(count_files(&f), 0);
    CHECK_EQ_INT(count_journals(&f), 0);
    teardown(&f);
}

/* ---- gc ---- */

typedef struct {
    char keys[4][33];
    int verdicts[4];
    int asked[4];
    int others_asked;
} verdicts_t;

static int committed_cb(void *ctx, const char *key)
{
    verdicts_t *v = ctx;
    for (int i = 0; i < 4; i++) {
        if (strcmp(v->keys[i], key) == 0) {
            v->asked[i]++;
            return v->verdicts[i];
        }
    }
    v->others_asked++;
    return 0;
}

/* A child process begins a batch, stores `n` files, reports its key and paths through `pipe_fd`, and dies
 * without commit or abort (as a crash would). */
static void crash_child(const char *dir, int n, int pipe_fd)
{
    ji_image_store_t s;
    ji_error_t err;
    ji_image_batch_t *b;
    ji_image_info_t info;

    if (ji_image_store_open(&s, dir, false, &err) != 0 || (b = ji_image_batch_begin(&s, &err)) == NULL)
        _exit(1);
    if (write(pipe_fd, ji_image_batch_key(b), 32) != 32)
        _exit(1);
    for (int i = 0; i < n; i++) {
        if (ji_image_batch_write(b, 1, "/9j/4AAQSkZJRg==", 16, &info, &err) != 0)
            _exit(1);
        if (write(pipe_fd, info.path, sizeof(info.path)) != (ssize_t)sizeof(info.path))
            _exit(1);
    }
    _exit(0);
}

static bool crash(const fixture_t *f, int n, char key[33], char paths[][64])
{
    int fds[2], status;
    pid_t pid;
    bool ok;

    if (pipe(fds) != 0)
        return false;
    if ((pid = fork()) == 0) {
        close(fds[0]);
        crash_child(f->dir, n, fds[1]);
    }
    close(fds[1]);
    ok = read(fds[0], key, 32) == 32;
    key[32] = '\0';
    for (int i = 0; i < n && ok; i++)
        ok = read(fds[0], paths[i], 64) == 64;
    close(fds[0]);
    waitpid(pid, &status, 0);
    return ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static void test_gc(void)
{
    fixture_t f;
    verdicts_t v = {.verdicts = {1, 0, -1, 0}};
    char paths[4][5][64];
    ji_image_batch_t *live;
    ji_image_info_t live_info;
    uint64_t removed = 99;
    char p[200];
    int fd;

    if (!setup(&f, false))
        return;
    /* three crashed requests (committed, not committed, unknown), each with 3 files */
    for (int i = 0; i < 3; i++)
        CHECK(crash(&f, 3, v.keys[i], paths[i]));
    CHECK_EQ_INT(count_files(&f), 9);
    CHECK_EQ_INT(count_journals(&f), 3);

    /* the uncommitted one also lists a file that is already gone and lines that are not ours */
    CHECK(unlinkat(f.store.dir_fd, paths[1][2], 0) == 0);
    snprintf(p, sizeof(p), "%s/.pending/%s.list", f.dir, v.keys[1]);
    fd = open(p, O_WRONLY | O_APPEND);
    CHECK(fd >= 0);
    {
        static const char junk[] = "sentinel\n../sentinel\nab/cd/abcd0000000000000000000000000000.png.x\n"
                                   "ab/cd/abce0000000000000000000000000000.png\n/etc/hostname\n";
        CHECK(write(fd, junk, sizeof(junk) - 1) == (ssize_t)sizeof(junk) - 1);
        close(fd);
    }
    fd = openat(f.store.dir_fd, "sentinel", O_CREAT | O_WRONLY, 0644);
    close(fd);
    /* foreign entries in .pending are left alone */
    snprintf(p, sizeof(p), "%s/.pending/README", f.dir);
    close(open(p, O_CREAT | O_WRONLY, 0644));
    snprintf(p, sizeof(p), "%s/.pending/nothex.list", f.dir);
    close(open(p, O_CREAT | O_WRONLY, 0644));

    /* a request in flight in this process: its journal is locked */
    live = ji_image_batch_begin(&f.store, &f.err);
    snprintf(v.keys[3], sizeof(v.keys[3]), "%s", ji_image_batch_key(live));
    CHECK_EQ_INT(ji_image_batch_write(live, 1, "R0lGODlh", 8, &live_info, &f.err), 0);

    CHECK_EQ_INT(ji_image_store_gc(&f.store, committed_cb, &v, &removed, &f.err), 0);
    CHECK_EQ_INT(removed, 2); /* paths[1][0] and [1][1]; [1][2] was gone already */
    CHECK_EQ_INT(v.asked[0], 1);
    CHECK_EQ_INT(v.asked[1], 1);
    CHECK_EQ_INT(v.asked[2], 1);
    CHECK_EQ_INT(v.asked[3], 0); /* live: not even asked */
    CHECK_EQ_INT(v.others_asked, 0);
    for (int i = 0; i < 3; i++) {
        CHECK(exists(&f, paths[0][i]));  /* committed: kept */
        CHECK(!exists(&f, paths[1][i])); /* not committed: removed */
        CHECK(exists(&f, paths[2][i]));  /* unknown: kept */
    }
    CHECK(exists(&f, "sentinel"));
    CHECK(exists(&f, live_info.path));
    snprintf(p, sizeof(p), ".pending/%s.list", v.keys[0]);
    CHECK(!exists(&f, p));
    snprintf(p, sizeof(p), ".pending/%s.list", v.keys[1]);
    CHECK(!exists(&f, p));
    snprintf(p, sizeof(p), ".pending/%s.list", v.keys[2]);
    CHECK(exists(&f, p));
    snprintf(p, sizeof(p), ".pending/%s.list", v.keys[3]);
    CHECK(exists(&f, p));
    CHECK(exists(&f, ".pending/README") && exists(&f, ".pending/nothex.list"));

    /* the live request ends; the unknown one is now known as not committed */
    ji_image_batch_abort(live);
    CHECK(!exists(&f, live_info.path));
    v.verdicts[2] = 0;
    CHECK_EQ_INT(ji_image_store_gc(&f.store, committed_cb, &v, &removed, &f.err), 0);
    CHECK_EQ_INT(removed, 3);
    CHECK_EQ_INT(v.asked[3], 0);
    CHECK_EQ_INT(count_journals(&f), 2);  /* README and nothex.list */
    CHECK_EQ_INT(count_files(&f), 3 + 1); /* the committed request's files and the sentinel */

    /* nothing left to do */
    CHECK_EQ_INT(ji_image_store_gc(&f.store, committed_cb, &v, &removed, &f.err), 0);
    CHECK_EQ_INT(removed, 0);
    teardown(&f);
}

/* A batch without files touches nothing on disk: its journal appears with its first file. Every way to end a
 * batch then works without one (commit, forget, abort, sync with --fsync on). */
static void test_journal_with_the_first_file(void)
{
    fixture_t f;
    ji_image_batch_t *b;
    ji_image_info_t info;
    char p[PATH_MAX];

    if (!setup(&f, true))
        return;
    for (int end = 0; end < 3; end++) {
        b = ji_image_batch_begin(&f.store, &f.err);
        CHECK(b != NULL);
        if (b == NULL)
            break;
        CHECK_EQ_INT(count_journals(&f), 0);
        CHECK_EQ_INT(ji_image_batch_sync(b, &f.err), 0);
        if (end == 0)
            ji_image_batch_commit(b);
        else if (end == 1)
            ji_image_batch_forget(b);
        else
            ji_image_batch_abort(b);
        CHECK_EQ_INT(count_journals(&f), 0);
    }
    b = ji_image_batch_begin(&f.store, &f.err);
    CHECK(b != NULL);
    if (b != NULL) {
        snprintf(p, sizeof(p), ".pending/%s.list", ji_image_batch_key(b));
        CHECK(!exists(&f, p));
        CHECK_EQ_INT(ji_image_batch_write(b, 1, "R0lGODlh", 8, &info, &f.err), 0);
        CHECK(exists(&f, p)); /* the journal under the batch's key, before the file */
        CHECK_EQ_INT(ji_image_batch_write(b, 2, "iVBORw0KGgo", 11, &info, &f.err), 0);
        CHECK_EQ_INT(count_journals(&f), 1);
        CHECK_EQ_INT(ji_image_batch_sync(b, &f.err), 0);
        ji_image_batch_abort(b);
        CHECK_EQ_INT(count_journals(&f), 0);
        CHECK_EQ_INT(count_files(&f), 0);
    }
    teardown(&f);
}

/* forget: the outcome is unknown, so files and journal stay (unlocked) for gc to judge. */
static void test_forget(void)
{
    fixture_t f;
    verdicts_t v = {.verdicts = {1, 0, -1, -1}};
    ji_image_info_t info[2][2];
    uint64_t removed = 99;

    if (!setup(&f, false))
        return;
    for (int i = 0; i < 2; i++) {
        ji_image_batch_t *b = ji_image_batch_begin(&f.store, &f.err);
        snprintf(v.keys[i], sizeof(v.keys[i]), "%s", ji_image_batch_key(b));
        CHECK_EQ_INT(ji_image_batch_write(b, 1, "iVBORw0KGgo", 11, &info[i][0], &f.err), 0);
        CHECK_EQ_INT(ji_image_batch_write(b, 2, "R0lGODlh", 8, &info[i][1], &f.err), 0);
        ji_image_batch_forget(b);
    }
    CHECK_EQ_INT(count_files(&f), 4);
    CHECK_EQ_INT(count_journals(&f), 2);
    CHECK_EQ_INT(ji_image_store_gc(&f.store, committed_cb, &v, &removed, &f.err), 0);
    CHECK_EQ_INT(removed, 2);
    CHECK_EQ_INT(v.asked[0], 1);
    CHECK_EQ_INT(v.asked[1], 1);
    CHECK(exists(&f, info[0][0].path) && exists(&f, info[0][1].path));
    CHECK(!exists(&f, info[1][0].path) && !exists(&f, info[1][1].path));
    CHECK_EQ_INT(count_journals(&f), 0);
    teardown(&f);
}

/* ---- file modes ---- */

static mode_t mode_at(int dir_fd, const char *rel)
{
    struct stat st;
    return fstatat(dir_fd, rel, &st, AT_SYMLINK_NOFOLLOW) == 0 ? st.st_mode & 07777 : (mode_t)-1;
}

/* Under `mask`: the images directory, .pending, both shard levels, an image and a journal get the modes. */
static void check_modes(mode_t mask, mode_t file_mode, mode_t dir_mode)
{
    mode_t old = umask(mask);
    fixture_t f;
    ji_image_batch_t *b;
    ji_image_info_t info;
    char rel[80];

    if (!setup(&f, false)) /* creates the images directory (and a parent) under `mask` */
        goto out;
    b = ji_image_batch_begin(&f.store, &f.err);
    CHECK(b != NULL);
    if (b == NULL)
        goto done;
    CHECK_EQ_INT(ji_image_batch_write(b, 1, "iVBORw0KGgo", 11, &info, &f.err), 0);
    CHECK_EQ_INT(mode_at(AT_FDCWD, f.dir), dir_mode);
    CHECK_EQ_INT(mode_at(f.store.dir_fd, ".pending"), dir_mode);
    snprintf(rel, sizeof(rel), "%.2s", info.path);
    CHECK_EQ_INT(mode_at(f.store.dir_fd, rel), dir_mode);
    snprintf(rel, sizeof(rel), "%.5s", info.path);
    CHECK_EQ_INT(mode_at(f.store.dir_fd, rel), dir_mode);
    CHECK_EQ_INT(mode_at(f.store.dir_fd, info.path), file_mode);
    snprintf(rel, sizeof(rel), ".pending/%s.list", ji_image_batch_key(b));
    CHECK_EQ_INT(mode_at(f.store.dir_fd, rel), file_mode);
    ji_image_batch_commit(b);
done:
    teardown(&f);
out:
    umask(old);
}

static void test_modes(void)
{
    CHECK_EQ_INT(JI_IMAGE_FILE_MODE, 0640);
    CHECK_EQ_INT(JI_IMAGE_DIR_MODE, 0750);
    check_modes(022, 0640, 0750); /* the usual umask: nothing for others all the same */
    check_modes(0, 0640, 0750);   /* no umask at all: still not world-readable */
    check_modes(077, 0600, 0700); /* a stricter umask (a systemd UMask=) restricts further */
}

/* ---- symlinks under the images directory ---- */

/* "<parent of the images directory>/outside": a directory the images must never reach. */
static void outside_dir(const fixture_t *f, char *out, size_t cap)
{
    snprintf(out, cap, "%s/outside", f->parent);
    CHECK(mkdir(out, 0755) == 0 || errno == EEXIST);
}

/* Entries in `dir`, recursively (files, directories and links alike). */
static int count_all_n;
static int count_all_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)path;
    (void)st;
    (void)flag;
    count_all_n += ftw->level > 0;
    return 0;
}

static int count_all(const char *dir)
{
    count_all_n = 0;
    nftw(dir, count_all_entry, 16, FTW_PHYS);
    return count_all_n;
}

/* Every first-level shard "00".."ff" is a symlink to `outside`: no image can be stored, nothing lands outside. */
static void shard_links_first_level(bool openat2)
{
    fixture_t f;
    char outside[96], name[3];
    ji_image_batch_t *b;
    ji_image_info_t info;

    ji_image_store_use_openat2(openat2);
    if (!setup_fast(&f))
        goto out;
    outside_dir(&f, outside, sizeof(outside));
    for (int i = 0; i < 256; i++) {
        snprintf(name, sizeof(name), "%02x", i);
        CHECK(symlinkat(outside, f.store.dir_fd, name) == 0);
    }
    b = ji_image_batch_begin(&f.store, &f.err);
    CHECK(b != NULL);
    if (b == NULL)
        goto done;
    for (int i = 0; i < 20; i++) {
        ji_error_clear(&f.err);
        CHECK_EQ_INT(ji_image_batch_write(b, 3, "iVBORw0KGgo", 11, &info, &f.err), -1);
        CHECK_EQ_INT(f.err.kind, JI_ERR_INTERNAL);
        CHECK_EQ_INT(f.err.line, 3);
        CHECK(strstr(f.err.message, "image") != NULL);
    }
    fprintf(stderr, "  planted shard symlink (%s): %s\n", openat2 ? "openat2" : "walk", f.err.message);
    CHECK_EQ_INT(ji_image_batch_count(b), 0);
    ji_image_batch_abort(b);
    CHECK_EQ_INT(count_all(outside), 0);
    CHECK_EQ_INT(count_journals(&f), 0);
done:
    teardown(&f);
out:
    ji_image_store_use_openat2(true);
}

/* Second-level shards: under each real "00".."ff", one "cd" in 4 is a symlink to `outside` (some to a real "cd"
 * there). Each write either lands in a real directory of the store or fails; nothing is created outside. 100
 * writes miss every symlink with probability (3/4)^100 < 1e-12. */
static void shard_links_second_level(bool openat2)
{
    enum { WRITES = 100 };
    fixture_t f;
    char outside[96], name[8], target[128];
    ji_image_batch_t *b;
    ji_image_info_t info;
    int stored = 0, refused = 0;

    ji_image_store_use_openat2(openat2);
    if (!setup_fast(&f))
        goto out;
    outside_dir(&f, outside, sizeof(outside));
    snprintf(target, sizeof(target), "%s/cd", outside);
    CHECK(mkdir(target, 0755) == 0);
    for (int i = 0; i < 256; i++) {
        int fd;
        snprintf(name, sizeof(name), "%02x", i);
        CHECK(mkdirat(f.store.dir_fd, name, 0755) == 0);
        fd = openat(f.store.dir_fd, name, O_RDONLY | O_DIRECTORY);
        for (int j = i % 4; j < 256; j += 4) {
            snprintf(name, sizeof(name), "%02x", j);
            CHECK(symlinkat(j % 8 == 0 ? target : outside, fd, name) == 0);
        }
        close(fd);
    }
    b = ji_image_batch_begin(&f.store, &f.err);
    CHECK(b != NULL);
    if (b == NULL)
        goto done;
    for (int i = 0; i < WRITES; i++) {
        ji_error_clear(&f.err);
        if (ji_image_batch_write(b, 1, "R0lGODlh", 8, &info, &f.err) == 0) {
            char shard[6];
            struct stat st;
            stored++;
            snprintf(shard, sizeof(shard), "%.5s", info.path);
            CHECK(fstatat(f.store.dir_fd, shard, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                  S_ISDIR(st.st_mode)); /* not a link */
            CHECK(file_is(&f, info.path, (const unsigned char *)"GIF89a", 6));
        } else {
            refused++;
            CHECK(strstr(f.err.message, "symbolic link") != NULL);
        }
    }
    fprintf(stderr, "  second-level shard symlinks (%s): %d stored in real directories, %d refused\n",
            openat2 ? "openat2" : "walk", stored, refused);
    CHECK(refused > 0);
    CHECK(stored > 0);
    CHECK_EQ_INT(count_all(outside), 1); /* just its "cd", still empty */
    ji_image_batch_abort(b);
    CHECK_EQ_INT(count_all(outside), 1);
    CHECK_EQ_INT(count_journals(&f), 0);
done:
    teardown(&f);
out:
    ji_image_store_use_openat2(true);
}

/* A shard symlink that appears after the store drew a file there: remove and abort do not unlink through it. */
static void shard_link_swapped_in(bool openat2)
{
    fixture_t f;
    char outside[96], shard[3], victim[200], moved[200];
    ji_image_batch_t *b;
    ji_image_info_t info;
    int fd;

    ji_image_store_use_openat2(openat2);
    if (!setup(&f, false))
        goto out;
    outside_dir(&f, outside, sizeof(outside));
    b = ji_image_batch_begin(&f.store, &f.err);
    CHECK_EQ_INT(ji_image_batch_write(b, 1, "R0lGODlh", 8, &info, &f.err), 0);
    /* move the real shard away; "ab" now points outside, where a file of the same relative name waits */
    snprintf(shard, sizeof(shard), "%.2s", info.path);
    snprintf(moved, sizeof(moved), "%s/moved", f.dir);
    CHECK(renameat(f.store.dir_fd, shard, AT_FDCWD, moved) == 0);
    CHECK(symlinkat(outside, f.store.dir_fd, shard) == 0);
    snprintf(victim, sizeof(victim), "%s/%.2s", outside, info.path + 3);
    CHECK(mkdir(victim, 0755) == 0);
    snprintf(victim, sizeof(victim), "%s/%s", outside, info.path + 3);
    fd = open(victim, O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0);
    close(fd);
    ji_image_batch_remove(b, &info);
    CHECK(access(victim, F_OK) == 0);
    ji_image_batch_abort(b);
    CHECK(access(victim, F_OK) == 0);
    CHECK_EQ_INT(count_journals(&f), 0); /* a path through a symlink reaches no file of ours: done with it */
    teardown(&f);
out:
    ji_image_store_use_openat2(true);
}

static void test_shard_symlinks(void)
{
    for (int i = 0; i < 2; i++) {
        shard_links_first_level(i == 0);
        shard_links_second_level(i == 0);
        shard_link_swapped_in(i == 0);
    }
}

/* gc: a crashed request's journal names a file through a shard symlink (and a non-image path through another):
 * nothing outside is unlinked; the journal is done with (no file of ours is reachable that way). */
static void gc_through_symlink(bool openat2)
{
    static const char key[] = "0123456789abcdef0123456789abcdef";
    static const char image[] = "ab/cd/abcd0123456789abcdef0123456789ab.png";
    fixture_t f;
    verdicts_t v = {.verdicts = {0}};
    char outside[96], path[200], journal[128];
    uint64_t removed = 99;
    int fd;

    ji_image_store_use_openat2(openat2);
    if (!setup(&f, false))
        goto out;
    outside_dir(&f, outside, sizeof(outside));
    /* outside/cd/abcd....png and outside/passwd: what the links would reach */
    snprintf(path, sizeof(path), "%s/cd", outside);
    CHECK(mkdir(path, 0755) == 0);
    snprintf(path, sizeof(path), "%s/%s", outside, image + 3);
    close(open(path, O_CREAT | O_WRONLY, 0644));
    snprintf(path, sizeof(path), "%s/passwd", outside);
    close(open(path, O_CREAT | O_WRONLY, 0644));
    CHECK(symlinkat(outside, f.store.dir_fd, "ab") == 0);
    CHECK(symlinkat(outside, f.store.dir_fd, "etclink") == 0);
    /* the journal of a dead request (no lock held) */
    snprintf(v.keys[0], sizeof(v.keys[0]), "%s", key);
    snprintf(journal, sizeof(journal), "%s/.pending/%s.list", f.dir, key);
    fd = open(journal, O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0);
    snprintf(path, sizeof(path), "etclink/passwd\n%s\n", image);
    CHECK(write(fd, path, strlen(path)) == (ssize_t)strlen(path));
    close(fd);

    CHECK_EQ_INT(ji_image_store_gc(&f.store, committed_cb, &v, &removed, &f.err), 0);
    CHECK_EQ_INT(v.asked[0], 1);
    CHECK_EQ_INT(removed, 0);
    snprintf(path, sizeof(path), "%s/%s", outside, image + 3);
    CHECK(access(path, F_OK) == 0);
    snprintf(path, sizeof(path), "%s/passwd", outside);
    CHECK(access(path, F_OK) == 0);
    CHECK_EQ_INT(count_all(outside), 3);
    CHECK(access(journal, F_OK) != 0);
    teardown(&f);
out:
    ji_image_store_use_openat2(true);
}

/* .pending itself a symlink: the store does not open (journals would be written elsewhere). */
static void pending_link(bool openat2)
{
    char parent[] = "/tmp/ji-img-XXXXXX", dir[96], outside[96], pending[128];
    ji_image_store_t s;
    ji_error_t err;

    ji_image_store_use_openat2(openat2);
    if (mkdtemp(parent) == NULL) {
        CHECK(!"mkdtemp");
        goto out;
    }
    snprintf(dir, sizeof(dir), "%s/images", parent);
    snprintf(outside, sizeof(outside), "%s/outside", parent);
    snprintf(pending, sizeof(pending), "%s/.pending", dir);
    CHECK(mkdir(dir, 0750) == 0 && mkdir(outside, 0750) == 0);
    CHECK(symlink(outside, pending) == 0);
    CHECK_EQ_INT(ji_image_store_open(&s, dir, false, &err), -1);
    CHECK(strstr(err.message, ".pending") != NULL);
    fprintf(stderr, "  .pending symlink (%s): %s\n", openat2 ? "openat2" : "walk", err.message);
    rm_tree(parent);
out:
    ji_image_store_use_openat2(true);
}

static void test_gc_and_pending_symlinks(void)
{
    for (int i = 0; i < 2; i++) {
        gc_through_symlink(i == 0);
        pending_link(i == 0);
    }
}

/* ji_image_store_open_file: the read side's open. */
static void open_file_cases(bool openat2)
{
    fixture_t f;
    char outside[96], path[200], rel[80];
    ji_image_batch_t *b;
    ji_image_info_t info;
    unsigned char buf[64];
    int fd;

    ji_image_store_use_openat2(openat2);
    if (!setup(&f, false))
        goto out;
    outside_dir(&f, outside, sizeof(outside));
    b = ji_image_batch_begin(&f.store, &f.err);
    CHECK_EQ_INT(ji_image_batch_write(b, 1, "R0lGODlhAQ==", 12, &info, &f.err), 0);
    ji_image_batch_commit(b);

    /* a stored image: its bytes */
    fd = ji_image_store_open_file(&f.store, info.path, &f.err);
    CHECK(fd >= 0);
    if (fd >= 0) {
        CHECK_EQ_INT(read(fd, buf, sizeof(buf)), 7);
        CHECK(memcmp(buf, "GIF89a\x01", 7) == 0);
        CHECK((fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
        close(fd);
    }
    /* outside/passwd reachable through a directory symlink, a final symlink, and "..": all refused */
    snprintf(path, sizeof(path), "%s/passwd", outside);
    fd = open(path, O_CREAT | O_WRONLY, 0644);
    CHECK(write(fd, "root:x:0:0\n", 11) == 11);
    close(fd);
    CHECK(symlinkat(outside, f.store.dir_fd, "etclink") == 0);
    CHECK(symlinkat(path, f.store.dir_fd, "passwd") == 0);
    snprintf(rel, sizeof(rel), "%.5s/passwd", info.path);
    CHECK(symlinkat(path, f.store.dir_fd, rel) == 0);
    {
        static const struct {
            const char *path;
            int err;
        } refused[] = {
            {"etclink/passwd", ELOOP},
            {"passwd", ELOOP},
            {"etclink", ELOOP},
            {"../outside/passwd", EXDEV},
            {"ab/../../x", EXDEV},
            {"./passwd", EXDEV},
            {"ab//cd", EXDEV},
            {"/etc/passwd", EXDEV},
            {"", ENOENT},
            {"nosuch/file", ENOENT},
            {".pending", EINVAL},
        };
        for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
            ji_error_clear(&f.err);
            errno = 0;
            fd = ji_image_store_open_file(&f.store, refused[i].path, &f.err);
            CHECK_EQ_INT(fd, -1);
            CHECK_EQ_INT(errno, refused[i].err);
            CHECK_EQ_INT(f.err.kind, JI_ERR_INTERNAL);
            CHECK(f.err.message[0] != '\0');
            if (fd >= 0)
                close(fd);
        }
        ji_error_clear(&f.err);
        CHECK_EQ_INT(ji_image_store_open_file(&f.store, rel, &f.err), -1); /* ab/cd/passwd -> outside */
        CHECK_EQ_INT(errno, ELOOP);
        CHECK(strstr(f.err.message, "symbolic link") != NULL);
    }
    /* a FIFO does not block the open, and is not served */
    CHECK(mkfifoat(f.store.dir_fd, "fifo", 0640) == 0);
    ji_error_clear(&f.err);
    CHECK_EQ_INT(ji_image_store_open_file(&f.store, "fifo", &f.err), -1);
    CHECK(strstr(f.err.message, "not a regular file") != NULL);
    teardown(&f);
out:
    ji_image_store_use_openat2(true);
}

static void test_open_file(void)
{
    open_file_cases(true);
    open_file_cases(false);
}

/* ---- disk full ---- */

/* In a child with its own mount namespace: a 256 KiB tmpfs as the images directory. Exit 0 = all checks passed,
 * 77 = cannot mount here, else the number of failed checks. */
static void disk_full_child(const char *dir)
{
    ji_image_store_t s;
    ji_error_t err;
    ji_image_batch_t *b;
    ji_image_info_t info;
    size_t n = 1u << 20, len;
    unsigned char *raw = calloc(1, n);
    char *enc;
    int small_ok = 0;

    if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
        mount("tmpfs", dir, "tmpfs", 0, "size=256k") != 0)
        _exit(77);
    memcpy(raw, "\x89PNG\r\n\x1a\n", 8);
    enc = b64(raw, n, &len);
    CHECK_EQ_INT(ji_image_store_open(&s, dir, true, &err), 0);
    b = ji_image_batch_begin(&s, &err);
    CHECK(b != NULL);
    if (b == NULL)
        _exit(unit_failures);
    /* small files fit */
    for (int i = 0; i < 5; i++)
        small_ok += ji_image_batch_write(b, 1, "iVBORw0KGgo", 11, &info, &err) == 0;
    CHECK_EQ_INT(small_ok, 5);
    /* 1 MiB does not */
    ji_error_clear(&err);
    CHECK_EQ_INT(ji_image_batch_write(b, 42, enc, len, &info, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_DISK_FULL);
    CHECK_EQ_INT(ji_error_http_status(err.kind), 507);
    CHECK_EQ_INT(err.line, 42);
    CHECK_EQ_STR(err.field, "image");
    fprintf(stderr, "  disk full message: %s\n", err.message);
    CHECK_EQ_INT(ji_image_batch_count(b), 5);
    /* the partial file is gone: the space is free again, so the same small image still fits */
    CHECK_EQ_INT(ji_image_batch_write(b, 43, "iVBORw0KGgo", 11, &info, &err), 0);
    CHECK_EQ_INT(ji_image_batch_sync(b, &err), 0);
    ji_image_batch_abort(b);
    {
        fixture_t f = {.store = s};
        snprintf(f.dir, sizeof(f.dir), "%s", dir);
        CHECK_EQ_INT(count_files(&f), 0);
        CHECK_EQ_INT(count_journals(&f), 0);
    }
    ji_image_store_close(&s);
    free(enc);
    free(raw);
    umount(dir);
    _exit(unit_failures > 100 ? 100 : unit_failures);
}

static void test_disk_full(void)
{
    char dir[] = "/tmp/ji-img-full-XXXXXX";
    pid_t pid;
    int status;

    if (mkdtemp(dir) == NULL) {
        CHECK(!"mkdtemp");
        return;
    }
    if ((pid = fork()) == 0)
        disk_full_child(dir);
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status));
    if (WIFEXITED(status) && WEXITSTATUS(status) == 77)
        fprintf(stderr, "  SKIPPED disk_full: cannot mount a tmpfs in a private mount namespace here "
                        "(needs root / CAP_SYS_ADMIN); the integration tests cover it\n");
    else
        CHECK_EQ_INT(WEXITSTATUS(status), 0);
    rmdir(dir);
}

/* ---- speed (printed, not checked) ---- */

static void test_speed(void)
{
    enum { FILES = 100, RAW = 88 * 1024 };
    fixture_t f;
    rng_t r = {2024};
    unsigned char *raw = malloc(RAW);
    size_t len;
    char *enc;
    ji_image_batch_t *b;
    ji_image_info_t info;
    struct timespec t0, t1;
    int ok = 0;

    if (!setup(&f, false))
        goto out;
    rng_fill(&r, raw, RAW);
    memcpy(raw, "\xff\xd8\xff\xe0", 4);
    enc = b64(raw, RAW, &len);
    for (int round = 0; round < 3; round++) {
        b = ji_image_batch_begin(&f.store, &f.err);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int i = 0; i < FILES; i++)
            ok += ji_image_batch_write(b, 1, enc, len, &info, &f.err) == 0;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
        printf("image_store: %d files of %zu bytes of base64, fsync off: %.0f MB/s of base64, %.0f files/s\n", FILES,
               len, (double)len * FILES / 1e6 / s, FILES / s);
        ji_image_batch_abort(b);
    }
    CHECK_EQ_INT(ok, 3 * FILES);
    CHECK_EQ_INT(count_files(&f), 0);
    free(enc);
    teardown(&f);
out:
    free(raw);
}

UNIT_MAIN("image_store", {"open", test_open}, {"magic", test_magic},
          {"magic_after_whitespace", test_magic_after_whitespace}, {"big_files_and_commit", test_big_files_and_commit},
          {"fsync_on", test_fsync_on}, {"no_image", test_no_image}, {"data_urls", test_data_urls},
          {"invalid", test_invalid}, {"remove_and_abort", test_remove_and_abort}, {"abort_many", test_abort_many},
          {"gc", test_gc}, {"journal_with_the_first_file", test_journal_with_the_first_file}, {"forget", test_forget},
          {"modes", test_modes}, {"shard_symlinks", test_shard_symlinks},
          {"gc_and_pending_symlinks", test_gc_and_pending_symlinks}, {"open_file", test_open_file},
          {"disk_full", test_disk_full}, {"speed", test_speed})
