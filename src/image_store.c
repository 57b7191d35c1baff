/*
 * image_store.c — owns the images directory: base64 (or data: URL) text is
 * decoded piece by piece straight into a new, uniquely named file, and each
 * request's files are listed in an on-disk journal so that a failed or
 * crashed request leaves nothing behind. Memory per request is one fixed
 * decode buffer, whatever the number or size of its images.
 *
 * Files. A name is 128 bits from getrandom(2) as 32 lowercase hex, sharded
 * by its first two and next two hex digits ("ab/cd/abcd....png"; shard
 * directories are created when first needed and never removed). The type
 * comes from the first decoded bytes, so the file is created only once
 * JI_IMAGE_MAGIC_BYTES are decoded (or the text ended), with O_EXCL. A text
 * found invalid midway, or a write failing, removes the partial file.
 *
 * Journal. ".pending/<key>.list" gets "relative/path\n", appended with one
 * write(), BEFORE the file is created: a crash can leave a listed file that
 * does not exist, never an unlisted one. The journal itself is created when
 * the batch's first file is about to be (a request without images touches
 * no file at all: five system calls fewer per small request). commit unlinks the journal; abort
 * reads it back (bounded buffer) and unlinks every listed file, then the
 * journal; gc does the same for journals of dead requests. Missing files
 * (ji_image_batch_remove, or a crash before the create) are fine. Lines
 * that are not exactly one of our paths are ignored, so a damaged journal
 * can never make us unlink anything else.
 *
 * Appends. Each append to a resumable upload has a journal of its own,
 * ".pending/<upload key>.<seq>.<16 random hex>.list" (seq: the upload's
 * committed appends before it), kept after the append commits: its files
 * belong to staged rows. The next try of the same seq first removes the
 * files of every unlocked journal of that seq (a try that never
 * committed); the upload's end drops the journals (committed: files kept)
 * or removes their files too (failed, deleted, expired). gc asks about the
 * upload key at the start of the name.
 *
 * Live or dead. A batch holds flock(LOCK_EX) on its journal from its
 * creation until the batch's end, so gc (another thread, the `gc` subcommand,
 * another host on a filesystem with working locks) skips journals of requests
 * in flight. A journal gc grabbed between its creation and the batch's flock
 * (it lists nothing yet) is seen by the batch (lock refused, or link count 0)
 * and created again under the same name once gc removed it. Where flock is
 * not supported at all (ENOLCK...), the batch runs unlocked.
 *
 * Durability (--fsync on). Not one fsync per file: as each file is complete
 * its writeback starts with sync_file_range(SYNC_FILE_RANGE_WRITE) and it is
 * closed; ji_image_batch_sync then makes every file, directory entry and the
 * journal durable with a single syncfs(2) of the filesystem, called on the
 * batch's journal fd: syncfs reports writeback errors that happened since
 * that fd was opened (Linux >= 5.8), i.e. during this request, whereas the
 * shared directory fd would report each error to one caller only. The
 * journal append is not fsynced before the file is created: we rely on the
 * filesystem committing metadata in order (ext4 data=ordered, xfs), so after
 * power loss an image file never survives without its journal line. With
 * --fsync off, neither sync_file_range nor syncfs is called.
 *
 * No symlinks. Whoever can write into the images directory could plant a
 * symlink (a shard "ab" pointing to /etc, a row's image_path through one) to
 * make us write, serve or unlink files elsewhere; O_NOFOLLOW alone guards
 * only the last component. So every path below the directory is opened with
 * openat2(2) RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS (open_beneath): a symlink
 * in any component is ELOOP, a way out is EXDEV. Where openat2 is missing
 * (ENOSYS: Linux < 5.6; EPERM: some container seccomp filters) the same
 * rule is kept by a walk, one component at a time with O_NOFOLLOW (and
 * O_DIRECTORY for the directories). Unlinks open the parent that way and
 * unlink the last component, which unlinkat never follows. ".pending" is
 * opened that way once, at start, and its fd is used from then on. A
 * planted shard symlink makes the writes that draw that shard fail (500,
 * the journal line taken back), never land elsewhere; a journal line whose
 * path crosses a symlink (or a non-directory) is treated as a missing file:
 * no file of ours can be reached that way, and abort and gc must not stall
 * on it.
 *
 * Modes. Files are created JI_IMAGE_FILE_MODE (0640), directories
 * JI_IMAGE_DIR_MODE (0750), both less the process umask: images are not
 * world-readable. Existing files and directories keep their modes.
 */
#include "image_store.h"

#include "base64.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/** Base64 input decoded per step (the decode buffer is about 3/4 of it). */
#define JI_IMAGE_DECODE_CHUNK (64u * 1024)
/** Decoded bytes gathered before the type is decided and the file created. */
#define JI_IMAGE_MAGIC_BYTES 64u
/** Read buffer when a journal is read back (abort, gc). */
#define JI_IMAGE_JOURNAL_READ_BYTES 4096u
/** New keys or names tried when one is taken (by gc, or by an astronomically unlikely collision). */
#define JI_IMAGE_NAME_ATTEMPTS 3
/** openat2 answers EAGAIN when a rename races with the lookup: tries before giving up. */
#define JI_IMAGE_OPEN_ATTEMPTS 4
/** Longest path accepted below the images directory (ours are 45 bytes; a row's image_path may be anything). */
#define JI_IMAGE_MAX_PATH 1024

#define PENDING_DIR ".pending"
#define JOURNAL_SUFFIX ".list"
#define HEX_CHARS 32
/** "ab/cd/" + 32 hex + "." + extension */
#define PATH_PREFIX_LEN 6
#define PATH_EXT_OFFSET (PATH_PREFIX_LEN + HEX_CHARS + 1)
/** An append's journal: "<upload key>.<seq>.<16 hex>.list" (seq: up to 20 digits). */
#define APPEND_TAG_HEX 16
#define JOURNAL_NAME_CAP (HEX_CHARS + 1 + 20 + 1 + APPEND_TAG_HEX + sizeof(JOURNAL_SUFFIX))

struct st_ji_image_batch_t {
    ji_image_store_t *store;
    int journal_fd;      /**< -1 until the first file (open_journal) */
    bool journal_broken; /**< a failed append could not be undone: no more files */
    uint64_t journal_size;
    uint64_t count;
    char key[HEX_CHARS + 1];
    char journal[JOURNAL_NAME_CAP]; /**< its name in .pending */
    unsigned char buf[JI_IMAGE_MAGIC_BYTES + JI_BASE64_DECODED_MAX(JI_IMAGE_DECODE_CHUNK)];
};

/* ---- image types ---- */

typedef struct {
    const char *ext;
    const char *mime;
} image_type_t;

enum { T_PNG, T_JPG, T_GIF, T_WEBP, T_BMP, T_TIFF, T_ICO, T_AVIF, T_HEIC, T_BIN, T_COUNT };

static const image_type_t image_types[T_COUNT] = {
    [T_PNG] = {"png", "image/png"},    [T_JPG] = {"jpg", "image/jpeg"},
    [T_GIF] = {"gif", "image/gif"},    [T_WEBP] = {"webp", "image/webp"},
    [T_BMP] = {"bmp", "image/bmp"},    [T_TIFF] = {"tiff", "image/tiff"},
    [T_ICO] = {"ico", "image/x-icon"}, [T_AVIF] = {"avif", "image/avif"},
    [T_HEIC] = {"heic", "image/heic"}, [T_BIN] = {"bin", "application/octet-stream"},
};

static bool starts(const unsigned char *p, size_t n, const char *magic, size_t len)
{
    return n >= len && memcmp(p, magic, len) == 0;
}

static int heif_brand(const unsigned char *b)
{
    static const char avif[][5] = {"avif", "avis"};
    static const char heic[][5] = {"heic", "heix", "heim", "heis", "hevc", "hevx"};

    for (size_t i = 0; i < sizeof(avif) / sizeof(avif[0]); i++)
        if (memcmp(b, avif[i], 4) == 0)
            return T_AVIF;
    for (size_t i = 0; i < sizeof(heic) / sizeof(heic[0]); i++)
        if (memcmp(b, heic[i], 4) == 0)
            return T_HEIC;
    return -1;
}

/* An ISO-BMFF "ftyp" box: the major brand, then the compatible brands (HEIF files often say "mif1" first). */
static int ftyp_type(const unsigned char *p, size_t n)
{
    size_t box, end;
    int t;

    if (n < 12 || memcmp(p + 4, "ftyp", 4) != 0)
        return -1;
    if ((t = heif_brand(p + 8)) >= 0)
        return t;
    box = (size_t)p[0] << 24 | (size_t)p[1] << 16 | (size_t)p[2] << 8 | p[3];
    end = box < n ? box : n;
    for (size_t off = 16; off + 4 <= end; off += 4)
        if ((t = heif_brand(p + off)) >= 0)
            return t;
    return -1;
}

static const image_type_t *detect_type(const unsigned char *p, size_t n)
{
    int t;

    if (starts(p, n, "\x89PNG\r\n\x1a\n", 8))
        return &image_types[T_PNG];
    if (starts(p, n, "\xff\xd8\xff", 3))
        return &image_types[T_JPG];
    if (starts(p, n, "GIF87a", 6) || starts(p, n, "GIF89a", 6))
        return &image_types[T_GIF];
    if (n >= 12 && memcmp(p, "RIFF", 4) == 0 && memcmp(p + 8, "WEBP", 4) == 0)
        return &image_types[T_WEBP];
    if (starts(p, n, "BM", 2))
        return &image_types[T_BMP];
    if (starts(p, n, "II*\0", 4) || starts(p, n, "MM\0*", 4))
        return &image_types[T_TIFF];
    if (n >= 6 && memcmp(p, "\0\0\1\0", 4) == 0 && (p[4] | p[5]) != 0)
        return &image_types[T_ICO];
    if ((t = ftyp_type(p, n)) >= 0)
        return &image_types[t];
    return &image_types[T_BIN];
}

/* ---- names and paths ---- */

static int random_hex(char out[HEX_CHARS + 1])
{
    static const char digits[] = "0123456789abcdef";
    unsigned char raw[HEX_CHARS / 2];
    ssize_t n;

    do
        n = getrandom(raw, sizeof(raw), 0);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof(raw)) {
        if (n >= 0)
            errno = EIO;
        return -1;
    }
    for (size_t i = 0; i < sizeof(raw); i++) {
        out[2 * i] = digits[raw[i] >> 4];
        out[2 * i + 1] = digits[raw[i] & 15];
    }
    out[HEX_CHARS] = '\0';
    return 0;
}

static bool is_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

/* Exactly a path this module writes: "ab/cd/abcd<28 hex>.<known ext>". */
static bool is_image_path(const char *s, size_t n)
{
    if (n <= PATH_EXT_OFFSET || s[2] != '/' || s[5] != '/' || s[PATH_EXT_OFFSET - 1] != '.')
        return false;
    if (!is_hex(s + PATH_PREFIX_LEN, HEX_CHARS) || memcmp(s, s + PATH_PREFIX_LEN, 2) != 0 ||
        memcmp(s + 3, s + PATH_PREFIX_LEN + 2, 2) != 0)
        return false;
    for (size_t t = 0; t < T_COUNT; t++)
        if (n - PATH_EXT_OFFSET == strlen(image_types[t].ext) &&
            memcmp(s + PATH_EXT_OFFSET, image_types[t].ext, n - PATH_EXT_OFFSET) == 0)
            return true;
    return false;
}

static bool is_digits(const char *s, size_t n)
{
    if (n == 0 || n > 20)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

/* "<32 hex>.list" (a request), or "<32 hex>.<seq>.<16 hex>.list" (an append to the upload of that key) */
static bool is_journal_name(const char *name)
{
    size_t len = strlen(name), sfx = strlen(JOURNAL_SUFFIX);
    const char *dot;

    if (len < HEX_CHARS + sfx || !is_hex(name, HEX_CHARS) || strcmp(name + len - sfx, JOURNAL_SUFFIX) != 0)
        return false;
    if (len == HEX_CHARS + sfx)
        return true;
    /* the append form */
    if (name[HEX_CHARS] != '.' || (dot = strchr(name + HEX_CHARS + 1, '.')) == NULL)
        return false;
    return is_digits(name + HEX_CHARS + 1, (size_t)(dot - name - HEX_CHARS - 1)) &&
           (size_t)(name + len - sfx - (dot + 1)) == APPEND_TAG_HEX && is_hex(dot + 1, APPEND_TAG_HEX);
}

/* An append journal of the upload `key` ("<key>.<anything>.list"), with its seq in *seq. */
static bool is_upload_journal(const char *name, const char *key, uint64_t *seq)
{
    if (!is_journal_name(name) || strlen(name) == HEX_CHARS + strlen(JOURNAL_SUFFIX) ||
        memcmp(name, key, HEX_CHARS) != 0)
        return false;
    *seq = strtoull(name + HEX_CHARS + 1, NULL, 10);
    return true;
}

/* ---- opening beneath the images directory, no symlinks ---- */

/* false once openat2 answered ENOSYS (or a test asked for the walk). */
static atomic_bool openat2_usable = true;

void ji_image_store_use_openat2(bool use)
{
    atomic_store(&openat2_usable, use);
}

/* A relative path of non-empty components, none "." or "..". Else errno (EXDEV, ENOENT, ENAMETOOLONG). */
static int check_relative(const char *path)
{
    size_t len = strlen(path);

    if (len == 0)
        return ENOENT;
    if (len >= JI_IMAGE_MAX_PATH)
        return ENAMETOOLONG;
    if (path[0] == '/')
        return EXDEV;
    for (const char *p = path;;) {
        size_t n = strcspn(p, "/");
        if (n == 0 || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
            return EXDEV;
        if (p[n] == '\0')
            return 0;
        p += n + 1;
    }
}

/* The walk: each directory component opened O_DIRECTORY|O_NOFOLLOW from the previous one, the last O_NOFOLLOW. */
static int walk_open(int dir_fd, const char *path, int flags, mode_t mode)
{
    char name[JI_IMAGE_MAX_PATH];
    int cur = dir_fd, fd, e;

    for (;;) {
        size_t n = strcspn(path, "/");
        bool last = path[n] == '\0';
        struct stat st;

        memcpy(name, path, n);
        name[n] = '\0';
        if (last)
            fd = openat(cur, name, flags | O_NOFOLLOW, mode);
        else
            fd = openat(cur, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        /* O_DIRECTORY|O_NOFOLLOW on a symlink is ENOTDIR: say ELOOP, as openat2 does */
        if (fd < 0 && errno == ENOTDIR && fstatat(cur, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode))
            errno = ELOOP;
        if (fd < 0 || last)
            break;
        if (cur != dir_fd)
            close(cur);
        cur = fd;
        fd = -1;
        path += n + 1;
    }
    e = errno;
    if (cur != dir_fd)
        close(cur);
    errno = e;
    return fd;
}

/*
 * openat(dir_fd, path, flags, mode), but `path` must stay beneath dir_fd and may not go through a symlink in
 * any component. The fd, or -1 with errno set (ELOOP: a symlink on the way; EXDEV: not a plain relative path).
 */
static int open_beneath(int dir_fd, const char *path, int flags, mode_t mode)
{
    int e = check_relative(path), fd = -1;

    if (e != 0) {
        errno = e;
        return -1;
    }
    if (atomic_load_explicit(&openat2_usable, memory_order_relaxed)) {
        struct open_how how = {
            .flags = (uint64_t)(unsigned)flags,
            .mode = (flags & O_CREAT) != 0 ? (uint64_t)mode : 0,
            .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS,
        };
        for (int attempt = 0; attempt < JI_IMAGE_OPEN_ATTEMPTS; attempt++) {
            fd = (int)syscall(SYS_openat2, dir_fd, path, &how, sizeof(how));
            if (fd >= 0 || errno != EAGAIN)
                break;
        }
        if (fd >= 0 || (errno != ENOSYS && errno != EPERM))
            return fd;
        if (errno == ENOSYS)
            atomic_store(&openat2_usable, false);
        /* EPERM may be a seccomp filter that does not know openat2: the walk says whether it is real */
    }
    return walk_open(dir_fd, path, flags, mode);
}

/* unlinkat(dir_fd, path, 0) with the parent directory opened by open_beneath. 0, or -1 with errno set. */
static int unlink_beneath(int dir_fd, const char *path)
{
    const char *slash = strrchr(path, '/');
    char parent[JI_IMAGE_MAX_PATH];
    int fd, rc, e;

    if ((e = check_relative(path)) != 0) {
        errno = e;
        return -1;
    }
    if (slash == NULL)
        return unlinkat(dir_fd, path, 0);
    memcpy(parent, path, (size_t)(slash - path));
    parent[slash - path] = '\0';
    if ((fd = open_beneath(dir_fd, parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0)) < 0)
        return -1;
    rc = unlinkat(fd, slash + 1, 0);
    e = errno;
    close(fd);
    errno = e;
    return rc;
}

/* ---- errors ---- */

static int io_error(ji_error_t *err, uint64_t line, int e, const char *what)
{
    char buf[128];
    const char *why = e == ELOOP ? "a symbolic link on the way (none is followed under the images directory)"
                                 : strerror_r(e, buf, sizeof(buf));

    if (e == ENOSPC || e == EDQUOT)
        return ji_error_set(err, JI_ERR_DISK_FULL, line, line != 0 ? "image" : NULL, "images disk full: %s: %s", what,
                            why);
    return ji_error_set(err, JI_ERR_INTERNAL, line, line != 0 ? "image" : NULL, "%s: %s", what, why);
}

/* 0, or an errno value. */
static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ---- the store ---- */

/* mkdir -p: the intermediate errors are left to the final mkdir and open to report. */
static int make_dirs(const char *dir)
{
    char *copy = strdup(dir);
    int rc;

    if (copy == NULL)
        return -1;
    for (char *p = copy + 1; *p != '\0'; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        (void)mkdir(copy, JI_IMAGE_DIR_MODE);
        *p = '/';
    }
    rc = mkdir(copy, JI_IMAGE_DIR_MODE) == 0 || errno == EEXIST ? 0 : -1;
    free(copy);
    return rc;
}

int ji_image_store_open(ji_image_store_t *s, const char *dir, bool fsync, ji_error_t *err)
{
    char what[300];

    s->dir = NULL;
    s->dir_fd = -1;
    s->pending_fd = -1;
    s->fsync = fsync;
    /* The directory itself is the operator's choice (it may be reached through a symlink); what is below is ours. */
    snprintf(what, sizeof(what), "images directory %s", dir);
    if (make_dirs(dir) != 0)
        goto io_fail;
    if ((s->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
        goto io_fail;
    snprintf(what, sizeof(what), "images directory %s/" PENDING_DIR, dir);
    if (mkdirat(s->dir_fd, PENDING_DIR, JI_IMAGE_DIR_MODE) != 0 && errno != EEXIST)
        goto io_fail;
    if ((s->pending_fd = open_beneath(s->dir_fd, PENDING_DIR, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0)) < 0)
        goto io_fail;
    if ((s->dir = strdup(dir)) == NULL)
        goto io_fail;
    return 0;

io_fail:
    io_error(err, 0, errno, what);
    if (s->pending_fd >= 0)
        close(s->pending_fd);
    if (s->dir_fd >= 0)
        close(s->dir_fd);
    s->dir_fd = -1;
    s->pending_fd = -1;
    return -1;
}

void ji_image_store_close(ji_image_store_t *s)
{
    if (s->pending_fd >= 0)
        close(s->pending_fd);
    if (s->dir_fd >= 0)
        close(s->dir_fd);
    s->dir_fd = -1;
    s->pending_fd = -1;
    free(s->dir);
    s->dir = NULL;
}

int ji_image_store_open_file(const ji_image_store_t *s, const char *relative_path, ji_error_t *err)
{
    char what[128];
    struct stat st;
    int fd, e;

    snprintf(what, sizeof(what), "image file %.100s", relative_path);
    if ((fd = open_beneath(s->dir_fd, relative_path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, 0)) < 0) {
        e = errno;
        goto fail;
    }
    /* O_NONBLOCK only kept a FIFO from blocking the open; it changes nothing for a regular file */
    if (fstat(fd, &st) != 0) {
        e = errno;
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        e = EINVAL;
        ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "%s: not a regular file", what);
        goto close_fail;
    }
    return fd;

fail:
    if (e == EXDEV)
        ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "%s: not a plain relative path inside the images directory", what);
    else
        io_error(err, 0, e, what);
close_fail:
    if (fd >= 0)
        close(fd);
    errno = e;
    return -1;
}

/* ---- batches ---- */

/*
 * A new batch: its key and its journal's name (the journal is created with the first file, open_journal).
 * `upload_key` NULL: a request of its own (a fresh random key, "<key>.list"); else an append to that upload:
 * "<upload_key>.<seq>.<16 random hex>.list".
 */
static ji_image_batch_t *batch_begin(ji_image_store_t *s, const char *upload_key, uint64_t seq, ji_error_t *err)
{
    ji_image_batch_t *b = malloc(sizeof(*b));

    if (b == NULL) {
        ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "out of memory for an image batch");
        return NULL;
    }
    if (random_hex(b->key) != 0) {
        io_error(err, 0, errno, "getrandom");
        free(b);
        return NULL;
    }
    if (upload_key == NULL) {
        snprintf(b->journal, sizeof(b->journal), "%s" JOURNAL_SUFFIX, b->key);
    } else {
        snprintf(b->journal, sizeof(b->journal), "%.32s.%llu.%.16s" JOURNAL_SUFFIX, upload_key, (unsigned long long)seq,
                 b->key);
        memcpy(b->key, upload_key, HEX_CHARS);
    }
    b->store = s;
    b->journal_fd = -1;
    b->journal_broken = false;
    b->journal_size = 0;
    b->count = 0;
    return b;
}

/*
 * Creates and locks the batch's journal, before its first file. The name holds 128 random bits (a request's key,
 * or an append's tag): EEXIST is gc holding a journal it found unlocked between our create and our lock, about to
 * remove it (it lists nothing), so the same name is tried again. 0 or errno.
 */
static int open_journal(ji_image_batch_t *b)
{
    struct stat st;

    for (int attempt = 0; attempt < JI_IMAGE_NAME_ATTEMPTS; attempt++) {
        int fd = openat(b->store->pending_fd, b->journal, O_RDWR | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC,
                        JI_IMAGE_FILE_MODE);
        if (fd < 0) {
            if (errno == EEXIST) {
                sched_yield();
                continue;
            }
            return errno;
        }
        int locked = flock(fd, LOCK_EX | LOCK_NB);
        if ((locked != 0 && errno != EWOULDBLOCK) || (locked == 0 && fstat(fd, &st) == 0 && st.st_nlink > 0)) {
            b->journal_fd = fd; /* locked, or no locks on this filesystem: run unlocked */
            return 0;
        }
        /* gc took this journal between our create and our lock; it will remove it. */
        close(fd);
        sched_yield();
    }
    return EEXIST;
}

ji_image_batch_t *ji_image_batch_begin(ji_image_store_t *s, ji_error_t *err)
{
    return batch_begin(s, NULL, 0, err);
}

const char *ji_image_batch_key(const ji_image_batch_t *b)
{
    return b->key;
}

uint64_t ji_image_batch_count(const ji_image_batch_t *b)
{
    return b->count;
}

/* Appends "path\n" with one write. On failure the journal is cut back to its previous size. 0 or errno. */
static int journal_append(ji_image_batch_t *b, const char *path)
{
    char entry[sizeof(((ji_image_info_t *)0)->path) + 1];
    size_t n = (size_t)snprintf(entry, sizeof(entry), "%s\n", path);
    ssize_t w;
    int e;

    if (b->journal_fd < 0 && (e = open_journal(b)) != 0)
        return e;
    do
        w = write(b->journal_fd, entry, n);
    while (w < 0 && errno == EINTR);
    if (w == (ssize_t)n) {
        b->journal_size += n;
        return 0;
    }
    e = w < 0 ? errno : ENOSPC; /* a short append is the disk filling up */
    if (w > 0 && ftruncate(b->journal_fd, (off_t)b->journal_size) != 0)
        b->journal_broken = true; /* a torn line would swallow the next one */
    return e;
}

/* Takes the last entry back (the name was taken by someone else: that file is not ours to remove). */
static int journal_undo(ji_image_batch_t *b, const char *path)
{
    uint64_t size = b->journal_size - strlen(path) - 1;

    if (ftruncate(b->journal_fd, (off_t)size) != 0) {
        b->journal_broken = true;
        return -1;
    }
    b->journal_size = size;
    return 0;
}

/*
 * Creates the shard directories of `path` ("ab/cd/..."); an existing one is fine. mkdirat never follows its last
 * component, so "ab" is made from the images directory and "cd" from an fd of "ab" opened without symlinks: a
 * planted "ab" symlink is ELOOP, not a directory created elsewhere. 0 or errno.
 */
static int make_shard(int dir_fd, const char *path)
{
    char shard[PATH_PREFIX_LEN];
    int fd, e = 0;

    memcpy(shard, path, 2);
    shard[2] = '\0';
    if (mkdirat(dir_fd, shard, JI_IMAGE_DIR_MODE) != 0 && errno != EEXIST)
        return errno;
    if ((fd = open_beneath(dir_fd, shard, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0)) < 0)
        return errno;
    memcpy(shard, path + 3, 2);
    if (mkdirat(fd, shard, JI_IMAGE_DIR_MODE) != 0 && errno != EEXIST)
        e = errno;
    close(fd);
    return e;
}

/* Names, journals and creates a new file of `type`. The fd, or -1 with `err` filled. */
static int create_file(ji_image_batch_t *b, uint64_t line, const image_type_t *type, ji_image_info_t *info,
                       ji_error_t *err)
{
    int dir_fd = b->store->dir_fd, e;

    if (b->journal_broken)
        return ji_error_set(err, JI_ERR_INTERNAL, line, "image",
                            "image journal is damaged: no more images in this request");
    for (int attempt = 0; attempt < JI_IMAGE_NAME_ATTEMPTS; attempt++) {
        char hex[HEX_CHARS + 1];
        int fd;

        if (random_hex(hex) != 0)
            return io_error(err, line, errno, "getrandom");
        snprintf(info->path, sizeof(info->path), "%.2s/%.2s/%s.%s", hex, hex + 2, hex, type->ext);
        if ((e = journal_append(b, info->path)) != 0)
            return io_error(err, line, e, "cannot write the image journal");
        fd = open_beneath(dir_fd, info->path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, JI_IMAGE_FILE_MODE);
        if (fd < 0 && errno == ENOENT) {
            if ((e = make_shard(dir_fd, info->path)) != 0) {
                (void)journal_undo(b, info->path); /* nothing was created under that name */
                return io_error(err, line, e, "cannot create an image directory");
            }
            fd = open_beneath(dir_fd, info->path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, JI_IMAGE_FILE_MODE);
        }
        if (fd >= 0)
            return fd;
        if (errno != EEXIST) {
            e = errno;
            (void)journal_undo(b, info->path); /* nothing was created: abort and gc need not look for it */
            return io_error(err, line, e, "cannot create an image file");
        }
        if (journal_undo(b, info->path) != 0)
            return io_error(err, line, errno, "cannot write the image journal");
    }
    return ji_error_set(err, JI_ERR_INTERNAL, line, "image", "no free image name after %d attempts",
                        JI_IMAGE_NAME_ATTEMPTS);
}

/* `data:<mime>[;params];base64,<payload>` -> the payload. 0, or -1 when it is a data: URL but not a base64 one. */
static int strip_data_url(const char **text, size_t *len)
{
    static const char tag[] = ";base64";
    const size_t tag_len = sizeof(tag) - 1;
    const char *comma;
    size_t head;

    if (*len < 5 || strncasecmp(*text, "data:", 5) != 0)
        return 0;
    if ((comma = memchr(*text, ',', *len)) == NULL)
        return -1;
    head = (size_t)(comma - *text);
    if (head < 5 + tag_len || strncasecmp(comma - tag_len, tag, tag_len) != 0)
        return -1;
    *text = comma + 1;
    *len -= head + 1;
    return 0;
}

int ji_image_batch_write(ji_image_batch_t *b, uint64_t line, const char *text, size_t len, ji_image_info_t *out,
                         ji_error_t *err)
{
    const int dir_fd = b->store->dir_fd;
    ji_image_info_t info = {.size = 0};
    ji_base64_t dec;
    size_t pos = 0, have = 0;
    int fd = -1, e;

    if (strip_data_url(&text, &len) != 0)
        return ji_error_set(err, JI_ERR_INVALID, line, "image",
                            "data URL is not base64 (expected data:<type>;base64,...)");
    ji_base64_init(&dec);
    /* Decode JI_IMAGE_DECODE_CHUNK of text at a time; the first JI_IMAGE_MAGIC_BYTES decoded decide the type. */
    while (pos < len || (fd < 0 && have > 0)) {
        if (pos < len) {
            size_t n = len - pos < JI_IMAGE_DECODE_CHUNK ? len - pos : JI_IMAGE_DECODE_CHUNK;
            long got = ji_base64_decode(&dec, text + pos, n, b->buf + have);
            if (got < 0)
                goto invalid;
            pos += n;
            have += (size_t)got;
        }
        if (fd < 0) {
            if (have == 0 || (have < JI_IMAGE_MAGIC_BYTES && pos < len))
                continue;
            if (pos == len && ji_base64_finish(&dec) != 0)
                goto invalid; /* e.g. a lone last character: do not create a file for nothing */
            const image_type_t *type = detect_type(b->buf, have);
            info.mime = type->mime;
            if ((fd = create_file(b, line, type, &info, err)) < 0)
                return -1;
        }
        if ((e = write_all(fd, b->buf, have)) != 0) {
            io_error(err, line, e, "cannot write an image file");
            goto remove;
        }
        info.size += have;
        have = 0;
    }
    if (ji_base64_finish(&dec) != 0)
        goto invalid;
    if (fd < 0)
        return 1; /* nothing but whitespace */
    if (b->store->fsync && sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) != 0 &&
        (errno == EIO || errno == ENOSPC || errno == EDQUOT)) {
        io_error(err, line, errno, "cannot write an image file");
        goto remove;
    }
    e = close(fd);
    fd = -1;
    if (e != 0 && errno != EINTR) {
        io_error(err, line, errno, "cannot write an image file");
        goto remove;
    }
    b->count++;
    *out = info;
    return 0;

invalid:
    ji_error_set(err, JI_ERR_INVALID, line, "image", "image is not valid base64: %s", dec.error);
remove:
    if (fd >= 0) {
        close(fd);
        (void)unlink_beneath(dir_fd, info.path);
    } else if (info.path[0] != '\0') {
        (void)unlink_beneath(dir_fd, info.path); /* closed already (close failed) */
    }
    return -1;
}

void ji_image_batch_remove(ji_image_batch_t *b, const ji_image_info_t *info)
{
    if (unlink_beneath(b->store->dir_fd, info->path) == 0 || errno == ENOENT) {
        if (b->count > 0)
            b->count--;
    }
}

int ji_image_batch_sync(ji_image_batch_t *b, ji_error_t *err)
{
    if (!b->store->fsync || b->journal_fd < 0)
        return 0; /* no journal: no file either */
    /* The journal lives on the images filesystem; its fd's error cursor dates from this batch's begin. */
    if (syncfs(b->journal_fd) != 0)
        return io_error(err, 0, errno, "cannot make the images durable (syncfs)");
    return 0;
}

/* Unlinks every path listed in the journal `fd`, reading it in a bounded buffer. Missing files are fine, and so
 * are paths through a symlink (not followed: see "No symlinks").
 * 0, or -1 when the journal could not be read or a file could not be removed (then keep the journal). */
static int remove_listed(int dir_fd, int fd, uint64_t *removed)
{
    char buf[JI_IMAGE_JOURNAL_READ_BYTES];
    size_t have = 0;
    off_t off = 0;
    bool skipping = false; /* inside a line longer than the buffer: not ours */
    int rc = 0;

    for (;;) {
        ssize_t n = pread(fd, buf + have, sizeof(buf) - have, off);
        char *p = buf, *end, *nl;

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            break; /* a last line without '\n' is a torn append: its file was never created */
        off += n;
        end = buf + have + n;
        while ((nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
            if (!skipping && is_image_path(p, (size_t)(nl - p))) {
                *nl = '\0';
                if (unlink_beneath(dir_fd, p) == 0) {
                    if (removed != NULL)
                        (*removed)++;
                } else if (errno != ENOENT && errno != ELOOP && errno != ENOTDIR) {
                    rc = -1; /* through a symlink or a non-directory, no file of ours can be reached: as if gone */
                }
            }
            skipping = false;
            p = nl + 1;
        }
        have = (size_t)(end - p);
        if (have == sizeof(buf)) {
            skipping = true;
            have = 0;
        } else {
            memmove(buf, p, have);
        }
    }
    return rc;
}

void ji_image_batch_commit(ji_image_batch_t *b)
{
    if (b->journal_fd >= 0) {
        (void)unlinkat(b->store->pending_fd, b->journal, 0);
        close(b->journal_fd); /* releases the lock after the unlink: gc never sees a committed journal as dead */
    }
    free(b);
}

void ji_image_batch_forget(ji_image_batch_t *b)
{
    /* Files and journal stay; closing the journal drops the lock, so gc may now judge the batch. */
    if (b->journal_fd >= 0)
        close(b->journal_fd);
    free(b);
}

void ji_image_batch_abort(ji_image_batch_t *b)
{
    /* If a file could not be removed, the journal stays for gc (which will find it unlocked and uncommitted). */
    if (b->journal_fd >= 0) {
        if (remove_listed(b->store->dir_fd, b->journal_fd, NULL) == 0)
            (void)unlinkat(b->store->pending_fd, b->journal, 0);
        close(b->journal_fd);
    }
    free(b);
}

/* ---- walking the journals ---- */

/**
 * What to do with the journals of .pending: `wanted` picks them by name; `settle` gets each picked one that is a
 * regular file nobody holds (opened, locked) and answers 1 = remove the journal, 0 = leave it, -1 = leave it with
 * `err` filled. Files it removes are added to *removed.
 */
typedef struct {
    bool (*wanted)(void *ctx, const char *name);
    int (*settle)(ji_image_store_t *s, void *ctx, const char *name, int fd, uint64_t *removed, ji_error_t *err);
    void *ctx;
} journal_visitor_t;

/*
 * Calls the visitor for each journal of .pending it wants that no request holds: a locked journal belongs to a
 * request in flight, one of link count 0 was just ended (commit, abort, another walk), one that is not a regular
 * file is not ours; all are left alone. It goes through every journal it can, counts removed files in *removed,
 * and returns 0, or -1 with `err` filled by the first failure.
 */
static int walk_journals(ji_image_store_t *s, const journal_visitor_t *v, uint64_t *removed, ji_error_t *err)
{
    uint64_t count = 0;
    int pending_fd, rc = 0;
    struct dirent *de;
    DIR *dir;

    /* a fresh open file description of .pending (its own directory offset: walks may run in several threads) */
    if ((pending_fd = openat(s->pending_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
        return io_error(err, 0, errno, "cannot open the image journals (" PENDING_DIR ")");
    if ((dir = fdopendir(pending_fd)) == NULL) {
        io_error(err, 0, errno, "cannot read the image journals (" PENDING_DIR ")");
        close(pending_fd);
        return -1;
    }
    for (errno = 0; (de = readdir(dir)) != NULL; errno = 0) {
        ji_error_t failure;
        struct stat st;
        int fd, verdict;

        if (!v->wanted(v->ctx, de->d_name))
            continue;
        /* O_NONBLOCK: a FIFO planted under a journal's name must not block the walk (it is skipped below) */
        if ((fd = openat(pending_fd, de->d_name, O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)) < 0) {
            if (errno != ENOENT && rc == 0)
                rc = io_error(err, 0, errno, "cannot open an image journal");
            continue;
        }
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
            (flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK) || fstat(fd, &st) != 0 || st.st_nlink == 0) {
            close(fd);
            continue;
        }
        verdict = v->settle(s, v->ctx, de->d_name, fd, &count, &failure);
        if (verdict < 0 && rc == 0) {
            *err = failure;
            rc = -1;
        }
        if (verdict == 1 && unlinkat(pending_fd, de->d_name, 0) != 0 && errno != ENOENT && rc == 0)
            rc = io_error(err, 0, errno, "cannot remove an image journal");
        close(fd);
    }
    if (errno != 0 && rc == 0)
        rc = io_error(err, 0, errno, "cannot read the image journals (" PENDING_DIR ")");
    closedir(dir);
    if (removed != NULL)
        *removed = count;
    return rc;
}

/* Removes the files a journal lists (then the walk removes the journal). */
static int remove_journal_files(ji_image_store_t *s, const char *name, int fd, uint64_t *removed, ji_error_t *err)
{
    if (remove_listed(s->dir_fd, fd, removed) != 0) {
        ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "cannot remove the files of image journal %s", name);
        return -1;
    }
    return 1;
}

/* ---- the journals of a resumable upload ---- */

typedef enum {
    UPLOAD_REMOVE_FILES, /**< remove the listed files, then the journal */
    UPLOAD_KEEP_FILES,   /**< drop the journal only (the upload committed) */
} upload_settle_t;

/** The journals of one upload: its key, all appends or only `only_seq` (when `one_seq`), and what to do. */
typedef struct {
    const char *key;
    bool one_seq;
    uint64_t only_seq;
    upload_settle_t how;
} upload_journals_t;

static bool is_upload_journal_wanted(void *ctx, const char *name)
{
    const upload_journals_t *u = ctx;
    uint64_t seq;

    return is_upload_journal(name, u->key, &seq) && (!u->one_seq || seq == u->only_seq);
}

static int settle_upload_journal(ji_image_store_t *s, void *ctx, const char *name, int fd, uint64_t *removed,
                                 ji_error_t *err)
{
    const upload_journals_t *u = ctx;

    return u->how == UPLOAD_REMOVE_FILES ? remove_journal_files(s, name, fd, removed, err) : 1;
}

/*
 * Settles the unlocked append journals of the upload `key` (all of them, or only those of append `only_seq` when
 * `one_seq`): locked ones belong to an append in flight, which settles its own. Counts removed files in *removed.
 * 0, or -1 with `err` filled (it still went through every journal it could).
 */
static int settle_upload(ji_image_store_t *s, const char *key, bool one_seq, uint64_t only_seq, upload_settle_t how,
                         uint64_t *removed, ji_error_t *err)
{
    upload_journals_t u = {.key = key, .one_seq = one_seq, .only_seq = only_seq, .how = how};
    journal_visitor_t v = {is_upload_journal_wanted, settle_upload_journal, &u};

    if (strlen(key) != HEX_CHARS || !is_hex(key, HEX_CHARS))
        return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "not an upload key");
    return walk_journals(s, &v, removed, err);
}

ji_image_batch_t *ji_image_batch_begin_append(ji_image_store_t *s, const char *upload_key, uint64_t seq,
                                              ji_error_t *err)
{
    ji_error_t ignored;

    /* a rolled-back append of the same seq (a crash, a kill) left its journal: its files were never staged */
    if (settle_upload(s, upload_key, true, seq, UPLOAD_REMOVE_FILES, NULL, &ignored) != 0)
        fprintf(stderr, "upload %s: %s\n", upload_key, ignored.message);
    return batch_begin(s, upload_key, seq, err);
}

int ji_image_store_drop_upload(ji_image_store_t *s, const char *upload_key, uint64_t *removed, ji_error_t *err)
{
    return settle_upload(s, upload_key, false, 0, UPLOAD_REMOVE_FILES, removed, err);
}

int ji_image_store_keep_upload(ji_image_store_t *s, const char *upload_key, ji_error_t *err)
{
    return settle_upload(s, upload_key, false, 0, UPLOAD_KEEP_FILES, NULL, err);
}

/* gc: the committed() question and its context. */
typedef struct {
    int (*committed)(void *ctx, const char *key);
    void *ctx;
} gc_question_t;

static bool is_any_journal(void *ctx, const char *name)
{
    (void)ctx;
    return is_journal_name(name); /* not ours: left alone */
}

/* committed() answers for the key at the start of the name: 0 = dead (files go), 1 = keep files, else leave. */
static int settle_gc_journal(ji_image_store_t *s, void *ctx, const char *name, int fd, uint64_t *removed,
                             ji_error_t *err)
{
    const gc_question_t *q = ctx;
    char key[HEX_CHARS + 1];
    int verdict;

    memcpy(key, name, HEX_CHARS);
    key[HEX_CHARS] = '\0';
    verdict = q->committed(q->ctx, key);
    if (verdict == 0)
        return remove_journal_files(s, key, fd, removed, err);
    return verdict == 1 ? 1 : 0;
}

int ji_image_store_gc(ji_image_store_t *s, int (*committed)(void *ctx, const char *key), void *ctx, uint64_t *removed,
                      ji_error_t *err)
{
    gc_question_t q = {committed, ctx};
    journal_visitor_t v = {is_any_journal, settle_gc_journal, &q};

    return walk_journals(s, &v, removed, err);
}
