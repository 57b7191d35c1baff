/*
 * dead_letters.h — the rejected records of one skip-mode upload, from their
 * bytes to the COPY rows of rejected_records (schema.h).
 *
 * While the body streams, the line being read is captured: its first
 * JI_DEAD_LETTER_MEMORY_BYTES in memory, the rest in the request's spool
 * file (unnamed: it disappears when closed or when the process dies, so a
 * crash leaves nothing to collect). A line that turns out good is forgotten
 * at its end; a rejected one is kept in the spool with its line number,
 * error and field. A line over --max-record-bytes keeps its first
 * JI_DEAD_LETTER_KEEP_BYTES, marked truncated. After the users COPY the
 * spool is read back in slices into COPY text rows. Memory is two fixed
 * buffers whatever the number or size of the rejected lines; the disk holds
 * the rejected lines once, plus the longest line being read.
 *
 * Ownership: the ingest owns its ji_dead_letters_t (new/free); the spool's
 * descriptor is the object's own. Nothing here blocks on the network: the
 * spool is a local file in the images directory.
 */
#ifndef JI_DEAD_LETTERS_H
#define JI_DEAD_LETTERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "common.h"

typedef struct st_ji_dead_letters_t ji_dead_letters_t;

/** Starts an empty set whose spool file lives in the directory `dir_fd` (opened on first need). NULL: no memory. */
ji_dead_letters_t *ji_dead_letters_new(int dir_fd);
void ji_dead_letters_free(ji_dead_letters_t *d);

/** Bytes of the current line (in order, the line end excluded). 0, or -1 with `err` (the spool failed). */
int ji_dead_letters_line_data(ji_dead_letters_t *d, const char *data, size_t len, ji_error_t *err) JI_MUST_CHECK;

/** Bytes of the current line captured so far. */
uint64_t ji_dead_letters_line_bytes(const ji_dead_letters_t *d);

/** The current line was good (or empty): forget its bytes. */
void ji_dead_letters_line_forget(ji_dead_letters_t *d);

/**
 * The current line was rejected with `why` (its message, field and line): keep it. `truncated`: the line was
 * longer than --max-record-bytes, only its first JI_DEAD_LETTER_KEEP_BYTES are kept. A trailing '\r' (of a CRLF
 * line end) is not part of the record. 0, or -1 with `err`.
 */
int ji_dead_letters_keep(ji_dead_letters_t *d, const ji_error_t *why, bool truncated, ji_error_t *err) JI_MUST_CHECK;

/** Records kept so far. */
uint64_t ji_dead_letters_count(const ji_dead_letters_t *d);

/**
 * Reading back: writes COPY text rows of rejected_records (columns of JI_COPY_REJECTED_SQL) for `batch_id` into
 * `dst` (room `cap`, at least JI_DEAD_LETTERS_COPY_MIN bytes), going on from where the previous call stopped.
 * Returns the bytes written (0 when every record was written), or -1 with `err` (the spool could not be read).
 */
#define JI_DEAD_LETTERS_COPY_MIN 4096
#define JI_COPY_REJECTED_SQL "COPY rejected_records (batch_id, line, error, field, record, truncated) FROM STDIN"
ptrdiff_t ji_dead_letters_copy_rows(ji_dead_letters_t *d, int64_t batch_id, char *dst, size_t cap, ji_error_t *err);

#endif
