/*
 * array_scan.h — the pre-scan of a JSON-array body, run before yajl builds
 * its tree: a small tokenizer (aware of strings and escapes, validating
 * nothing else) that tracks nesting, counts values and the top-level elements,
 * and from them estimates what the tree will cost. The array mode refuses a
 * body that is nested too deep (yajl_tree_free recurses once per level) or
 * whose tree would not fit --max-array-memory, before the tree exists. It can
 * be fed in pieces: the result does not depend on where the text is cut.
 *
 * yajl_tree_parse accepts comments (it turns yajl_allow_comments on and offers
 * no way to turn it off). A comment may hold a '"' that is not a string, and
 * the tokenizer would lose track of nesting after it, so a '/' outside a
 * string stops the scan: comments are not JSON and the body is refused.
 */
#ifndef JI_ARRAY_SCAN_H
#define JI_ARRAY_SCAN_H

#include "common.h"

typedef enum {
    JI_ARRAY_SCAN_OK = 0,
    JI_ARRAY_SCAN_TOO_DEEP, /**< a container opened deeper than max_depth */
    JI_ARRAY_SCAN_TOO_MANY, /**< more than max_values values */
    JI_ARRAY_SCAN_COMMENT,  /**< a '/' outside a string */
} ji_array_scan_stop_t;

typedef struct st_ji_array_scan_t {
    /* limits (ji_array_scan_init) */
    size_t max_depth; /**< containers open at once, the outermost counting 1 */
    uint64_t max_values;

    /* what the text scanned so far holds */
    uint64_t values;        /**< scalars, containers and member names */
    uint64_t elements;      /**< values that started at depth 1: the elements of a top-level array */
    size_t depth;           /**< containers open now (closing more than were opened stays at 0) */
    size_t deepest;         /**< most containers open at once */
    size_t longest_escaped; /**< bytes (quotes included) of the longest string with a backslash in it */
    uint64_t scanned;       /**< bytes scanned */

    /* where it stopped: the rest of the text is not scanned */
    ji_array_scan_stop_t stop;
    uint64_t stop_offset;  /**< byte offset of the character that stopped it */
    uint64_t stop_element; /**< the top-level element it lies in (1-based; 0 when at the top level) */

    /* lexer state between pieces */
    bool in_string, escaped, string_has_escape, in_bare;
    uint64_t string_start;
} ji_array_scan_t;

/** Starts a scan: a container opened at depth > max_depth or a value beyond max_values stops it. */
void ji_array_scan_init(ji_array_scan_t *s, size_t max_depth, uint64_t max_values);

/** Scans the next piece of text. 0 = fine so far, -1 = stopped (see s->stop; later feeds do nothing). */
int ji_array_scan_feed(ji_array_scan_t *s, const char *data, size_t len) JI_MUST_CHECK;

/**
 * Bytes that yajl_tree_parse will allocate at its peak for the text scanned: JI_ARRAY_TREE_BYTES_PER_VALUE a
 * value, the bytes of the text (strings and numbers are copied), and the buffer in which yajl decodes a string
 * with escapes (it doubles: at most twice the longest one, 2 KiB at least). An upper bound, not an exact figure.
 */
uint64_t ji_array_scan_tree_bytes(const ji_array_scan_t *s);

/**
 * A cursor over the elements of a JSON array text that yajl accepted: each call gives the next top-level
 * element's bytes as sent (surrounding whitespace left out). Used to keep a rejected element byte for byte.
 */
typedef struct st_ji_array_elements_t {
    size_t pos;
    bool started; /**< past the '[' */
} ji_array_elements_t;

/** The next element of `text` in `*start`, `*len`; false after the last one (or on text that is not an array). */
bool ji_array_elements_next(ji_array_elements_t *c, const char *text, size_t text_len, const char **start, size_t *len);

#endif
