/*
 * image_store.h — the images directory: decoding base64 images straight into
 * uniquely named files, and the per-request bookkeeping that makes a request
 * all-or-nothing on disk.
 *
 * Layout under the images directory:
 *   ab/cd/abcd<28 more hex>.<ext>   one image; the name is 128 random bits
 *                                   (getrandom), the extension comes from the
 *                                   decoded file's magic bytes
 *   .pending/<batch key>.list       journal of one open request: each file's
 *                                   relative path, written before the file is
 *                                   created; removed once the request commits
 *                                   or its files are removed
 *   .pending/<upload key>.<seq>.<16 hex>.list
 *                                   journal of one append to a resumable
 *                                   upload (seq: the upload's appends
 *                                   before it); kept after the append
 *                                   commits, since its files belong to
 *                                   staged rows, until the upload ends
 * A journal left behind by a crash names every file a request may have
 * written; `gc` removes those files unless the request committed.
 *
 * Nothing under the images directory is reached through a symbolic link:
 * every open, create and unlink below it resolves beneath the directory with
 * no symlink in any component (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS,
 * or an equivalent walk where openat2 is missing). Files are created
 * JI_IMAGE_FILE_MODE and directories JI_IMAGE_DIR_MODE, less the umask.
 */
#ifndef JI_IMAGE_STORE_H
#define JI_IMAGE_STORE_H

#include "common.h"

/** Mode of every file created under the images directory (before the umask): owner rw, group r, others nothing. */
#define JI_IMAGE_FILE_MODE 0640
/** Mode of every directory created for the images (before the umask): owner rwx, group rx, others nothing. */
#define JI_IMAGE_DIR_MODE 0750

/** The images directory. Opened once per process, read-only afterwards, shared by every thread. */
typedef struct st_ji_image_store_t {
    char *dir;      /**< path given at open (owned) */
    int dir_fd;     /**< O_DIRECTORY fd of it */
    int pending_fd; /**< O_DIRECTORY fd of its .pending, opened without following a symlink */
    bool fsync;     /**< --fsync: make files durable before a request commits */
} ji_image_store_t;

/** Creates the directory (and .pending) if missing and opens it. 0, or -1 with `err` filled. */
int ji_image_store_open(ji_image_store_t *s, const char *dir, bool fsync, ji_error_t *err) JI_MUST_CHECK;
void ji_image_store_close(ji_image_store_t *s);

/**
 * Opens `relative_path` (e.g. a row's image_path) for reading, beneath the images directory: an absolute path,
 * an empty, "." or ".." component, a symbolic link in ANY component, or anything but a regular file is refused
 * (a FIFO cannot block the caller: the open is non-blocking). The fd (O_RDONLY, close-on-exec, owned by the
 * caller), or -1 with `err` filled (JI_ERR_INTERNAL: the rows of committed requests always name a file) and
 * errno set (ELOOP for a symlink, EXDEV for a path that leaves the directory, ENOENT, ...).
 */
int ji_image_store_open_file(const ji_image_store_t *s, const char *relative_path, ji_error_t *err);

/**
 * For tests: false makes every open under the images directory use the component-by-component walk that
 * replaces openat2(2) on kernels without it (before Linux 5.6); true (the default) uses openat2 when present.
 */
void ji_image_store_use_openat2(bool use);

/** What one stored image turned out to be. */
typedef struct st_ji_image_info_t {
    char path[64];    /**< relative to the images directory, e.g. "ab/cd/abcd....png" */
    const char *mime; /**< e.g. "image/png"; "application/octet-stream" when the magic bytes are unknown */
    uint64_t size;    /**< decoded bytes */
} ji_image_info_t;

/** The files of one request. Memory does not grow with the number of files. */
typedef struct st_ji_image_batch_t ji_image_batch_t;

/** Starts a request's batch: a fresh random key; its journal is created with its first file. NULL with `err` filled
 * on failure. */
ji_image_batch_t *ji_image_batch_begin(ji_image_store_t *s, ji_error_t *err);

/** The batch key: 32 lowercase hex characters, unique across threads, restarts and hosts. */
const char *ji_image_batch_key(const ji_image_batch_t *b);

/**
 * Decodes one image into a new file. `text` is standard base64 (padding optional; spaces, tabs, CR and LF
 * anywhere are ignored) or a `data:<mime>;base64,<base64>` URL. Anything else is JI_ERR_INVALID naming field
 * "image" and `line`; ENOSPC/EDQUOT is JI_ERR_DISK_FULL; other I/O errors JI_ERR_INTERNAL. On error no file
 * is left behind. A text that holds no base64 characters at all stores nothing and returns 1 (no image).
 * 0 = stored (`out` filled), 1 = no image, -1 = error.
 */
int ji_image_batch_write(ji_image_batch_t *b, uint64_t line, const char *text, size_t len, ji_image_info_t *out,
                         ji_error_t *err) JI_MUST_CHECK;

/** Removes one file this batch wrote (a record skipped after its image was stored). */
void ji_image_batch_remove(ji_image_batch_t *b, const ji_image_info_t *info);

/** Number of files written and still kept. */
uint64_t ji_image_batch_count(const ji_image_batch_t *b);

/** With fsync on: makes every file of the batch and its directory entries durable. Call before COMMIT. */
int ji_image_batch_sync(ji_image_batch_t *b, ji_error_t *err) JI_MUST_CHECK;

/** The request committed: keeps the files, drops the journal, frees `b`. */
void ji_image_batch_commit(ji_image_batch_t *b);

/**
 * The outcome of the request is unknown (COMMIT sent, answer lost): keeps the files AND the journal, so that
 * gc decides later from the batches table; frees `b`.
 */
void ji_image_batch_forget(ji_image_batch_t *b);

/** The request failed: removes every file of the batch and the journal, frees `b`. */
void ji_image_batch_abort(ji_image_batch_t *b);

/**
 * Starts the files of one append to the resumable upload whose batch key is `upload_key` (32 lowercase hex), the
 * append being the upload's `seq`-th (its count of committed appends). First removes the files of every unlocked
 * journal of that same seq: an earlier try of this append that rolled back (a crash, a kill, a takeover) left
 * them, and none of its rows were staged. ji_image_batch_key gives `upload_key`. After the append commits while
 * the upload stays open, ji_image_batch_forget keeps files and journal; after the upload commits,
 * ji_image_batch_commit drops the journal. NULL with `err` filled on failure.
 */
ji_image_batch_t *ji_image_batch_begin_append(ji_image_store_t *s, const char *upload_key, uint64_t seq,
                                              ji_error_t *err);

/**
 * The upload `upload_key` ended without committing (deleted, expired, failed): removes the files listed in each of
 * its append journals and the journals. A journal locked by an append still in flight is left to it (it removes
 * its own files when it fails, and gc settles it otherwise). Counts removed files in `*removed` (may be NULL).
 * 0, or -1 with `err` filled (it still went through every journal it could).
 */
int ji_image_store_drop_upload(ji_image_store_t *s, const char *upload_key, uint64_t *removed,
                               ji_error_t *err) JI_MUST_CHECK;

/**
 * The upload `upload_key` committed: drops its append journals, keeping their files (rows of users name them).
 * 0, or -1 with `err` filled.
 */
int ji_image_store_keep_upload(ji_image_store_t *s, const char *upload_key, ji_error_t *err) JI_MUST_CHECK;

/**
 * Removes what crashed requests left: for each journal in .pending, asks `committed(ctx, key)`; 1 keeps the
 * files, 0 removes them, -1 (cannot tell, or the upload of an append journal is still open) leaves that journal
 * alone; an append journal is asked with its upload's key. Then drops the journal. Journals of
 * batches still open (in any process: they hold a lock on their journal) are skipped without asking. A
 * half-written file is listed in its batch's journal like any other and goes with it. Counts removed files in
 * `*removed`. 0, or -1 with `err` filled (gc still went through every journal it could).
 */
int ji_image_store_gc(ji_image_store_t *s, int (*committed)(void *ctx, const char *key), void *ctx, uint64_t *removed,
                      ji_error_t *err) JI_MUST_CHECK;

#endif
