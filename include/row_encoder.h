/*
 * row_encoder.h — one user row in PostgreSQL's COPY text format, in the
 * column order of JI_COPY_USERS_SQL. Knows nothing of JSON or sockets.
 */
#ifndef JI_ROW_ENCODER_H
#define JI_ROW_ENCODER_H

#include "common.h"

/** The COPY statement the encoded rows are meant for. */
#define JI_COPY_USERS_SQL "COPY users (batch_id, name, email, image_path, image_type, image_size) FROM STDIN"

typedef struct st_ji_row_t {
    int64_t batch_id;
    const char *name;
    size_t name_len;
    const char *email;
    size_t email_len;
    const char *image_path; /**< NULL: no image (then image_type and image_size are NULL too) */
    const char *image_type;
    uint64_t image_size;
} ji_row_t;

/** Upper bound of one encoded row for fields of at most name_len + email_len bytes (each escaped byte doubles). */
#define JI_ROW_MAX_BYTES(name_len, email_len) (2 * ((name_len) + (email_len)) + 256)

/** Writes the row with its trailing '\n' into dst. Returns bytes written, or 0 when `cap` is too small. */
size_t ji_row_encode(char *dst, size_t cap, const ji_row_t *row);

#endif
