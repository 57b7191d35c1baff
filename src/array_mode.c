/*
 * array_mode.c — the JSON-array mode as an ordinary h2o handler: admits the
 * request (an upload place and its share of the array memory budget),
 * checks the Content-Digest over the body as received, decodes a gzip or zstd body, pre-scans the text (nesting, values: what the tree
 * will cost) and refuses what is too deep or too big, copies the buffered
 * body, checks it whole (strict UTF-8, the `\u` escapes yajl would mangle),
 * lets yajl_tree_parse build the tree, then walks the elements into an ingest
 * in record mode, pausing the walk when the database is backed up. In this
 * mode "line" in answers is the element's position in the array (1-based).
 */
#include "array_mode.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yajl/yajl_tree.h>

#include "array_scan.h"
#include "content_decoder.h"
#include "content_digest.h"
#include "escape_scan.h"
#include "h2o_bridge.h"
#include "handler_reply.h"
#include "json_text.h"
#include "utf8.h"

typedef struct st_array_req_t {
    h2o_req_t *req;
    ji_ingest_t *ingest;
    char *text; /**< NUL-terminated copy of the body (yajl_tree_parse wants one); kept in skip mode */
    size_t text_len;
    ji_array_elements_t elements; /**< skip mode: where the next element's bytes are (its dead letter) */
    yajl_val root;
    size_t next; /**< index of the next element to store */
    ji_worker_t *worker;
    ji_array_admission_t admission; /**< its share of the array budget, given back once the tree is freed */
} array_req_t;

/** Frees the tree and the text: the memory the budget counts. */
static void give_back(array_req_t *a)
{
    if (a->root != NULL)
        yajl_tree_free(a->root);
    a->root = NULL;
    free(a->text);
    a->text = NULL;
}

static void array_dispose(void *p)
{
    array_req_t *a = p;

    if (a->ingest != NULL)
        ji_ingest_free(a->ingest); /* the client went away: abort */
    give_back(a);
    ji_array_mode_release(&a->admission);
}

/**
 * Where a byte offset lies: the 1-based position of the top-level element, and the member name it is in or
 * after (at the element's own level). A small tokenizer: strings, escapes, nesting; no validation.
 */
static void locate(const char *s, size_t upto, uint64_t *element, char *member, size_t member_cap)
{
    int depth = 0;
    bool in_string = false, escaped = false, key_next = false, in_key = false, seen_value = false;
    size_t key_len = 0;

    *element = 0;
    member[0] = '\0';
    for (size_t i = 0; i < upto; i++) {
        char c = s[i];
        if (in_string) {
            if (escaped)
                escaped = false;
            else if (c == '\\')
                escaped = true;
            else if (c == '"')
                in_string = in_key = false;
            if (in_string && in_key && key_len + 1 < member_cap) {
                member[key_len++] = c;
                member[key_len] = '\0';
            }
            continue;
        }
        switch (c) {
        case '"':
            in_string = true;
            if (depth == 2 && key_next) {
                in_key = true;
                key_next = false;
                key_len = 0;
                member[0] = '\0';
            }
            break;
        case '{':
        case '[':
            depth++;
            if (depth == 2) {
                key_next = c == '{';
                member[0] = '\0';
            }
            break;
        case '}':
        case ']':
            depth--;
            break;
        case ',':
            if (depth == 1)
                seen_value = false;
            if (depth == 2)
                key_next = true;
            break;
        default:
            break;
        }
        if (depth >= 1 && !seen_value && c != ' ' && c != '\t' && c != '\r' && c != '\n' && c != ',' &&
            !(depth == 1 && c == '[')) {
            seen_value = true;
            (*element)++;
        }
    }
}

/** Checks what yajl's tree would hide: invalid UTF-8 (400) and `\u0000` or unpaired surrogates (422). */
static int check_text(const char *text, size_t len, ji_error_t *err)
{
    size_t bad = ji_utf8_invalid_at(text, len);
    ji_escape_scan_t scan;
    uint64_t element;
    char member[32];

    if (bad != SIZE_MAX) {
        locate(text, bad, &element, member, sizeof(member));
        return ji_error_set(err, JI_ERR_MALFORMED, element, NULL, "invalid UTF-8");
    }
    ji_escape_scan_reset(&scan);
    ji_escape_scan_feed(&scan, text, len);
    ji_escape_scan_finish(&scan);
    if (scan.bad_at != SIZE_MAX) {
        locate(text, scan.bad_at, &element, member, sizeof(member));
        if (strcmp(member, "user") == 0 || strcmp(member, "username") == 0)
            strcpy(member, "name");
        return ji_error_set(err, JI_ERR_INVALID, element, member, "%s in a string is not allowed", scan.why);
    }
    return 0;
}

static bool is_name_key(const char *k)
{
    return strcmp(k, "name") == 0 || strcmp(k, "user") == 0 || strcmp(k, "username") == 0;
}

/** Reads one element into the record's fields. 0, or -1 with `err` filled. */
static int read_element(yajl_val v, uint64_t line, yajl_val *name, yajl_val *email, yajl_val *image, ji_error_t *err)
{
    *name = *email = *image = NULL;
    if (!YAJL_IS_OBJECT(v))
        return ji_error_set(err, JI_ERR_MALFORMED, line, NULL, "expected a JSON object as element %llu",
                            (unsigned long long)line);
    for (size_t i = 0; i < v->u.object.len; i++) {
        const char *k = v->u.object.keys[i];
        yajl_val *slot = is_name_key(k)            ? name
                         : strcmp(k, "email") == 0 ? email
                         : strcmp(k, "image") == 0 ? image
                                                   : NULL;
        const char *field = slot == name ? "name" : slot == email ? "email" : "image";
        if (slot == NULL)
            continue;
        if (*slot != NULL)
            return ji_error_set(err, JI_ERR_INVALID, line, field, "duplicate member \"%s\"", k);
        *slot = v->u.object.values[i];
    }
    if (*name == NULL)
        return ji_error_set(err, JI_ERR_INVALID, line, "name", "missing field \"name\"");
    if (!YAJL_IS_STRING(*name))
        return ji_error_set(err, JI_ERR_INVALID, line, "name", "name must be a string");
    if (*email == NULL)
        return ji_error_set(err, JI_ERR_INVALID, line, "email", "missing field \"email\"");
    if (!YAJL_IS_STRING(*email))
        return ji_error_set(err, JI_ERR_INVALID, line, "email", "email must be a string");
    if (*image != NULL && !YAJL_IS_STRING(*image) && !YAJL_IS_NULL(*image))
        return ji_error_set(err, JI_ERR_INVALID, line, "image", "image must be a string or null");
    return 0;
}

/** Stores elements until the database backs up, the request fails, or the array ends. */
static void walk(array_req_t *a)
{
    while (a->next < a->root->u.array.len) {
        yajl_val v = a->root->u.array.values[a->next], name, email, image;
        uint64_t line = ++a->next;
        const char *img;
        ji_error_t err;
        int r;

        if (a->text != NULL) { /* skip mode: the element as sent, kept if it is rejected */
            const char *el = a->text;
            size_t el_len = 0;
            if (!ji_array_elements_next(&a->elements, a->text, a->text_len, &el, &el_len))
                el_len = 0;
            if (ji_ingest_record_text(a->ingest, el, el_len) != 0)
                return;
        }
        if (read_element(v, line, &name, &email, &image, &err) != 0) {
            if (ji_ingest_record_error(a->ingest, &err) != 0)
                return;
            continue;
        }
        img = image != NULL && YAJL_IS_STRING(image) ? image->u.string : NULL;
        r = ji_ingest_put_record(a->ingest, line, name->u.string, strlen(name->u.string), email->u.string,
                                 strlen(email->u.string), img, img != NULL ? strlen(img) : 0);
        if (r != 0)
            return; /* 1: resume comes when the database drained; -1: done comes */
    }
    ji_ingest_end(a->ingest);
}

static void on_resume(ji_ingest_t *in, void *owner)
{
    (void)in;
    walk(owner);
}

static void on_done(ji_ingest_t *in, void *owner, int status, const char *body, size_t len, unsigned retry_after)
{
    array_req_t *a = owner;
    h2o_iovec_t copy = h2o_strdup(&a->req->pool, body, len);
    ji_array_request_t *ar = ji_bridge_route_data(a->req);

    if (ar != NULL)
        ji_ingest_outcome(in, &ar->outcome);
    a->ingest = NULL;
    ji_ingest_free(in);
    give_back(a); /* the tree is the big part: give it back before answering */
    ji_array_mode_release(&a->admission);
    ji_reply_json(a->req, status, copy.base, copy.len, retry_after);
}

static const ji_ingest_callbacks_t array_callbacks = {on_resume, on_done};

/** First size of the buffer a gzip or zstd body is decoded into; it doubles up to the cap. */
#define INFLATE_FIRST_BYTES (1u << 20)

/**
 * Decodes a gzip or zstd entity whole (this mode holds everything anyway) into a NUL-terminated text of at most
 * `max` bytes; `flag` names the limit in the error. `*text_alloc` receives the size of the block that holds it.
 * The decoder (a zstd window: at most 2^JI_MAX_ZSTD_WINDOW_LOG bytes) lives only while it runs.
 */
static int inflate_entity(h2o_req_t *req, ji_content_encoding_t encoding, size_t max, const char *flag, char **text,
                          size_t *text_len, size_t *text_alloc, ji_error_t *err)
{
    ji_content_decoder_t *g;
    size_t room, cap, len = 0, off = 0, used, out;
    char *buf, *bigger;

    if (max > SIZE_MAX / 4)
        max = SIZE_MAX / 4; /* no size below can wrap around, whatever the flags say */
    g = ji_content_decoder_new(encoding, max);
    room = max + 1; /* one byte more than the cap: the inflater sees going over it */
    cap = room < INFLATE_FIRST_BYTES ? room : INFLATE_FIRST_BYTES;
    buf = malloc(cap + 1);
    if (g == NULL || buf == NULL)
        goto NoMemory;
    while (!ji_content_decoder_finished(g)) {
        if (ji_content_decoder_check_end(g, 0, off == req->entity.len, err) != 0)
            goto Error;
        if (len == cap) { /* never at `room`: the inflater fails first */
            size_t next = cap > room / 2 ? room : cap * 2;
            if ((bigger = realloc(buf, next + 1)) == NULL)
                goto NoMemory;
            buf = bigger;
            cap = next;
        }
        if (ji_content_decoder_run(g, req->entity.base + off, req->entity.len - off, &used, buf + len, cap - len, &out,
                                   err) != 0) {
            if (err->kind == JI_ERR_TOO_LARGE && ji_content_decoder_total_out(g) > max)
                ji_error_set(err, JI_ERR_TOO_LARGE, 0, NULL, "inflated body is larger than %s (%zu bytes)", flag, max);
            goto Error;
        }
        off += used;
        len += out;
    }
    if (ji_content_decoder_check_end(g, req->entity.len - off, true, err) != 0)
        goto Error;
    ji_content_decoder_free(g);
    buf[len] = '\0';
    *text = buf;
    *text_len = len;
    *text_alloc = cap + 1;
    return 0;
NoMemory:
    ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
Error:
    ji_content_decoder_free(g);
    free(buf);
    return -1;
}

/* ---- admission and the budget ---- */

int ji_array_mode_admit(ji_worker_t *w, ji_array_admission_t *adm, ji_error_t *err)
{
    ji_server_t *server = w->server;
    uint64_t cap = server->config->max_array_memory;

    memset(adm, 0, sizeof(*adm));
    if (!ji_budget_reserve(&server->array_budget, cap)) {
        return ji_error_set(err, JI_ERR_BUSY, 0, NULL,
                            "JSON-array requests in progress hold the --array-memory-budget (%zu bytes): retry later",
                            server->config->array_memory_budget);
    }
    adm->worker = w;
    adm->reserved = cap;
    return 0;
}

void ji_array_mode_release(ji_array_admission_t *adm)
{
    if (adm->worker == NULL)
        return;
    if (adm->reserved != 0)
        ji_budget_release(&adm->worker->server->array_budget, adm->reserved);
    memset(adm, 0, sizeof(*adm));
}

/** Keeps only `need` bytes of the request's reservation (it never grows). */
static void keep_reserved(array_req_t *a, uint64_t need)
{
    if (need < a->admission.reserved) {
        ji_budget_release(&a->worker->server->array_budget, a->admission.reserved - need);
        a->admission.reserved = need;
    }
}

/**
 * The Content-Digest header, if any, over the body as received (after chunked framing, before gzip): the whole
 * body is at hand, so it is checked before anything is built from it. The head's rules refused a malformed or
 * repeated header already. 0, or -1 with `err` (400 on a mismatch).
 */
static int check_digest(h2o_req_t *req, ji_error_t *err)
{
    ssize_t i = h2o_find_header_by_str(&req->headers, H2O_STRLIT("content-digest"), -1);
    ji_content_digest_expect_t expect;

    if (i == -1)
        return 0;
    if (ji_content_digest_parse(&expect, req->headers.entries[i].value.base, req->headers.entries[i].value.len, err) !=
        0)
        return -1;
    return ji_content_digest_check(&expect, req->entity.base != NULL ? req->entity.base : "", req->entity.len, err);
}

/** Answers with `err` after giving back everything the request holds. */
static int fail(array_req_t *a, const ji_error_t *err)
{
    give_back(a);
    ji_array_mode_release(&a->admission);
    ji_reply_error(a->req, err);
    return 0;
}

/**
 * The pre-scan of the text to be parsed: a record nested deeper than JI_MAX_JSON_DEPTH, a comment, or a tree that
 * would take the request over --max-array-memory (`held`: what it holds already) fail it. On success the request
 * keeps just what it needs of its reservation. 0, or -1 with `err` filled.
 */
static int prescan(array_req_t *a, const char *text, size_t len, uint64_t held, ji_error_t *err)
{
    uint64_t max = a->worker->server->config->max_array_memory, need;
    ji_array_scan_t scan;

    if (held > max) {
        atomic_fetch_add_explicit(&a->worker->server->array_budget.over_request_cap, 1, memory_order_relaxed);
        return ji_error_set(err, JI_ERR_TOO_LARGE, 0, NULL,
                            "a JSON-array body of %zu bytes needs %llu bytes, more than --max-array-memory (%llu "
                            "bytes)",
                            len, (unsigned long long)held, (unsigned long long)max);
    }
    /* the outer array is one level more than its elements, the records */
    ji_array_scan_init(&scan, JI_MAX_JSON_DEPTH + 1, (max - held) / JI_ARRAY_TREE_BYTES_PER_VALUE + 1);
    if (ji_array_scan_feed(&scan, text, len) != 0) {
        if (scan.stop == JI_ARRAY_SCAN_TOO_DEEP)
            return ji_error_set(err, JI_ERR_MALFORMED, scan.stop_element, NULL,
                                "record nested deeper than JI_MAX_JSON_DEPTH (" JI_STR(JI_MAX_JSON_DEPTH) ")");
        if (scan.stop == JI_ARRAY_SCAN_COMMENT)
            return ji_error_set(err, JI_ERR_MALFORMED, scan.stop_element, NULL,
                                "malformed JSON: '/' outside a string (comments are not JSON)");
    }
    need = held + ji_array_scan_tree_bytes(&scan);
    if (scan.stop == JI_ARRAY_SCAN_TOO_MANY || need > max) {
        atomic_fetch_add_explicit(&a->worker->server->array_budget.over_request_cap, 1, memory_order_relaxed);
        return ji_error_set(err, JI_ERR_TOO_LARGE, 0, NULL,
                            "a JSON-array body of %zu bytes with %s%llu values would need %s%llu bytes with its tree, "
                            "more than --max-array-memory (%llu bytes)",
                            len, scan.stop != JI_ARRAY_SCAN_OK ? "over " : "", (unsigned long long)scan.values,
                            scan.stop != JI_ARRAY_SCAN_OK ? "over " : "", (unsigned long long)need,
                            (unsigned long long)max);
    }
    keep_reserved(a, need);
    return 0;
}

int ji_array_mode_handle(ji_worker_t *w, h2o_req_t *req, const ji_ingest_params_t *params, ji_array_admission_t *adm)
{
    const ji_config_t *cfg = w->server->config;
    array_req_t *a = h2o_mem_alloc_shared(&req->pool, sizeof(*a), array_dispose);
    ssize_t ce = h2o_find_header(&req->headers, H2O_TOKEN_CONTENT_ENCODING, -1);
    char yajl_error[256];
    ji_error_t err;
    size_t len = req->entity.len, alloc;
    uint64_t held = req->entity.len; /* the body as received: the connection holds it until the request is disposed */

    memset(a, 0, sizeof(*a));
    a->req = req;
    a->worker = w;
    /* its memory before anything is built (the upload place is the caller's) */
    if (adm != NULL) {
        a->admission = *adm;
        memset(adm, 0, sizeof(*adm));
    } else if (ji_array_mode_admit(w, &a->admission, &err) != 0) {
        ji_reply_error(req, &err);
        return 0;
    }
    if (check_digest(req, &err) != 0)
        return fail(a, &err);
    if (ce != -1 &&
        !h2o_lcstris(req->headers.entries[ce].value.base, req->headers.entries[ce].value.len, H2O_STRLIT("identity"))) {
        h2o_iovec_t v = req->headers.entries[ce].value;
        bool by_bytes = cfg->max_array_bytes <= cfg->max_array_memory;
        ji_content_encoding_t encoding;
        if (ji_content_encoding_parse(v.base, v.len, &encoding) != 0) {
            ji_error_set(&err, JI_ERR_UNSUPPORTED, 0, NULL, "unsupported Content-Encoding");
            return fail(a, &err);
        }
        if (inflate_entity(req, encoding, by_bytes ? cfg->max_array_bytes : cfg->max_array_memory,
                           by_bytes ? "--max-array-bytes" : "--max-array-memory", &a->text, &len, &alloc, &err) != 0)
            return fail(a, &err);
        if (prescan(a, a->text, len, held + alloc, &err) != 0)
            return fail(a, &err);
        goto Parse;
    }
    if (len > cfg->max_array_bytes) {
        ji_error_set(&err, JI_ERR_TOO_LARGE, 0, NULL, "body is larger than --max-array-bytes (%zu bytes)",
                     cfg->max_array_bytes);
        return fail(a, &err);
    }
    /* scanned where it lies; copied (yajl_tree_parse wants a NUL-terminated text) only once it fits */
    if (prescan(a, req->entity.base, len, held + len + 1, &err) != 0)
        return fail(a, &err);
    if ((a->text = malloc(len + 1)) == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        return fail(a, &err);
    }
    memcpy(a->text, req->entity.base, len);
    a->text[len] = '\0';
Parse:
    if (check_text(a->text, len, &err) != 0)
        return fail(a, &err);
    if (memchr(a->text, '\0', len) != NULL) {
        ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "NUL byte in the body");
        return fail(a, &err);
    }
    if ((a->root = yajl_tree_parse(a->text, yajl_error, sizeof(yajl_error))) == NULL) {
        char *nl = strchr(yajl_error, '\n');
        if (nl != NULL)
            *nl = '\0';
        ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "%s", yajl_error[0] ? yajl_error : "malformed JSON");
        return fail(a, &err);
    }
    if (!YAJL_IS_ARRAY(a->root)) {
        ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "expected a JSON array of records");
        return fail(a, &err);
    }
    if (params->skip_errors) {
        a->text_len = len; /* rejected elements are kept as sent: the text stays until the walk ends */
    } else {
        free(a->text); /* the tree holds its own copies of the strings */
        a->text = NULL;
    }
    if ((a->ingest = ji_ingest_new(&w->ingest_env, params, &array_callbacks, a)) == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        return fail(a, &err);
    }
    return 0;
}
