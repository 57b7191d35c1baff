/*
 * picohttp.h — declarations of the picohttpparser functions that libh2o
 * 2.2.5 exports (no Debian package ships picohttpparser.h). The struct
 * layouts match v2.2.5's deps/picohttpparser/picohttpparser.h exactly and
 * must stay so: the library reads and writes them.
 */
#ifndef JI_PICOHTTP_H
#define JI_PICOHTTP_H

#include <stddef.h>
#include <sys/types.h>

struct phr_header {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
};

/* consumed bytes, -2 when the head is incomplete, -1 when malformed */
int phr_parse_request(const char *buf, size_t len, const char **method, size_t *method_len, const char **path,
                      size_t *path_len, int *minor_version, struct phr_header *headers, size_t *num_headers,
                      size_t last_len);

/* zero-filled before use */
struct phr_chunked_decoder {
    size_t bytes_left_in_chunk;
    char consume_trailer;
    char _hex_count;
    char _state;
};

/*
 * Decodes chunked data in place: on return *bufsz is the length of the decoded data at the start of buf.
 * -2: needs more input (every input byte was used), -1: malformed, >= 0: the body ended and that many bytes
 * following it (moved to buf + *bufsz) belong to what comes after.
 */
ssize_t phr_decode_chunked(struct phr_chunked_decoder *decoder, char *buf, size_t *bufsz);

#endif
