/* test_upload_headers.c — the headers of resumable uploads: parsing, creation and append verdicts, metadata, routes. */
#include <stdlib.h>

#include "routes.h"
#include "upload_headers.h"
#include "unit.h"

static int parse(const char *text, ji_request_head_t *h, ji_upload_headers_t *u, ji_error_t *err)
{
    if (ji_request_head_parse(h, text, strlen(text), err) != 0)
        return -2;
    return ji_upload_headers_parse(u, h, err);
}

static void test_parse(void)
{
    ji_request_head_t h;
    ji_upload_headers_t u;
    ji_error_t err;

    CHECK_EQ_INT(parse("PATCH /uploads/x HTTP/1.1\r\nUpload-Offset: 42\r\nUpload-Complete: ?1\r\n"
                       "Upload-Draft-Interop-Version: 6\r\nUpload-Length: 100\r\n\r\n",
                       &h, &u, &err),
                 0);
    CHECK(u.has_offset && u.offset == 42 && u.has_complete && u.complete && u.draft && u.has_length && u.length == 100);
    CHECK_EQ_INT(parse("PATCH /u HTTP/1.1\r\nUpload-Complete: ?0\r\nUpload-Defer-Length: 1\r\n\r\n", &h, &u, &err), 0);
    CHECK(u.has_complete && !u.complete && u.defer_length && !u.draft && !u.has_offset);
    /* malformed values and repeats: 400 */
    static const char *const bad[] = {
        "Upload-Offset: -1",
        "Upload-Offset: 1x",
        "Upload-Offset: ",
        "Upload-Complete: ?2",
        "Upload-Complete: true",
        "Upload-Defer-Length: 0",
        "Upload-Length: 1e3",
        "Upload-Draft-Interop-Version: 5",
        "Upload-Offset: 1\r\nUpload-Offset: 1",
        "Upload-Length: 1\r\nUpload-Defer-Length: 1",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char text[256];
        snprintf(text, sizeof(text), "PATCH /u HTTP/1.1\r\n%s\r\n\r\n", bad[i]);
        CHECK_EQ_INT(parse(text, &h, &u, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
    }
    CHECK_EQ_INT(ji_request_head_parse(&h, "POST /users HTTP/1.1\r\nUpload-Complete: ?1\r\n\r\n", 45, &err), 0);
    CHECK(!ji_upload_headers_draft_creation(&h));
    const char *d = "POST /users HTTP/1.1\r\nupload-complete: ?1\r\nUpload-Draft-Interop-Version: 6\r\n\r\n";
    CHECK_EQ_INT(ji_request_head_parse(&h, d, strlen(d), &err), 0);
    CHECK(ji_upload_headers_draft_creation(&h));
}

static int creation(const char *text, ji_upload_creation_t *c, bool draft, ji_error_t *err)
{
    ji_request_head_t h;
    ji_upload_headers_t u;

    if (parse(text, &h, &u, err) != 0)
        return -2;
    return ji_upload_creation_check(c, &h, &u, draft, 1000, err);
}

static void test_creation(void)
{
    ji_upload_creation_t c;
    ji_error_t err;

    CHECK_EQ_INT(creation("POST /uploads?max_errors=3 HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nUpload-Length: 1000\r\n"
                          "Idempotency-Key: \"k\"\r\n\r\n",
                          &c, false, &err),
                 0);
    CHECK(c.has_length && c.length == 1000 && c.options.skip_errors && c.options.max_errors == 3);
    CHECK_EQ_STR(c.options.idempotency_key, "k");
    CHECK_EQ_INT(creation("POST /uploads HTTP/1.1\r\nUpload-Length: 10\r\n\r\n", &c, false, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_PRECONDITION);
    CHECK_EQ_INT(creation("POST /uploads HTTP/1.1\r\nTus-Resumable: 1.0.1\r\nUpload-Length: 10\r\n\r\n", &c, false,
                          &err),
                 -1);
    CHECK_EQ_INT(err.kind, JI_ERR_PRECONDITION);
    CHECK_EQ_INT(creation("POST /uploads HTTP/1.1\r\nTus-Resumable: 1.0.0\r\n\r\n", &c, false, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
    CHECK_EQ_INT(creation("POST /uploads HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nUpload-Length: 1001\r\n\r\n", &c, false,
                          &err),
                 -1);
    CHECK_EQ_INT(err.kind, JI_ERR_TOO_LARGE);
    CHECK_EQ_INT(creation("POST /uploads HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nUpload-Defer-Length: 1\r\n"
                          "Content-Length: 3\r\nContent-Type: text/plain\r\n\r\n",
                          &c, false, &err),
                 -1);
    CHECK_EQ_INT(err.kind, JI_ERR_UNSUPPORTED);
    CHECK_EQ_INT(creation("POST /uploads HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nUpload-Defer-Length: 1\r\n"
                          "Content-Length: 3\r\nContent-Type: application/offset+octet-stream\r\n\r\n",
                          &c, false, &err),
                 0);
    CHECK(!c.has_length);
    CHECK_EQ_INT(creation("POST /users HTTP/1.1\r\nUpload-Draft-Interop-Version: 6\r\nUpload-Complete: ?1\r\n"
                          "Content-Encoding: gzip\r\nContent-Length: 3\r\n\r\n",
                          &c, true, &err),
                 -1);
    CHECK_EQ_INT(err.kind, JI_ERR_UNSUPPORTED);
    CHECK_EQ_INT(creation("POST /users HTTP/1.1\r\nUpload-Draft-Interop-Version: 6\r\nUpload-Complete: ?1\r\n"
                          "Content-Length: 3\r\n\r\n",
                          &c, true, &err),
                 0);
    CHECK(c.draft && c.complete && !c.has_length);
}

static void test_metadata(void)
{
    ji_upload_options_t o;
    ji_error_t err;

    memset(&o, 0, sizeof(o));
    /* on_error skip, max_errors 7, idempotency_key abc, a key without a value, another key */
    const char *md = "filename YS5qc29ubA==, on_error c2tpcA==,max_errors Nw==,idempotency_key YWJj,flag";
    CHECK_EQ_INT(ji_upload_metadata_apply(&o, md, strlen(md), &err), 0);
    CHECK(o.skip_errors && o.has_max_errors && o.max_errors == 7);
    CHECK_EQ_STR(o.idempotency_key, "abc");
    /* the header's key wins over the metadata's */
    memset(&o, 0, sizeof(o));
    strcpy(o.idempotency_key, "header");
    CHECK_EQ_INT(ji_upload_metadata_apply(&o, "idempotency_key YWJj", 20, &err), 0);
    CHECK_EQ_STR(o.idempotency_key, "header");
    static const char *const bad[] = {
        "on_error bWF5YmU=",                 /* maybe */
        "max_errors eA==",                   /* x */
        "on_error !!!!",                     /* not base64 */
        "idempotency_key YSBi",              /* "a b" */
        "on_error ZmFpbA==,max_errors Mw==", /* fail with max_errors */
        "max_errors Mz0mNA==",               /* "3=&4" */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        memset(&o, 0, sizeof(o));
        CHECK_EQ_INT(ji_upload_metadata_apply(&o, bad[i], strlen(bad[i]), &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
    }
}

static void test_append(void)
{
    ji_request_head_t h;
    ji_upload_headers_t u;
    ji_error_t err;
    const char *tus = "PATCH /u HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 5\r\n"
                      "Content-Type: application/offset+octet-stream\r\nContent-Length: 3\r\n\r\n";
    const char *draft = "PATCH /u HTTP/1.1\r\nUpload-Draft-Interop-Version: 6\r\nUpload-Offset: 5\r\n"
                        "Upload-Complete: ?0\r\nContent-Type: application/partial-upload\r\nContent-Length: 3\r\n\r\n";

    CHECK_EQ_INT(parse(tus, &h, &u, &err), 0);
    CHECK_EQ_INT(ji_upload_append_check(&h, &u, 1000, &err), 0);
    CHECK_EQ_INT(parse(draft, &h, &u, &err), 0);
    CHECK_EQ_INT(ji_upload_append_check(&h, &u, 1000, &err), 0);
    CHECK_EQ_INT(parse("PATCH /u HTTP/1.1\r\nUpload-Draft-Interop-Version: 6\r\nUpload-Offset: 5\r\n"
                       "Content-Type: application/partial-upload\r\n\r\n",
                       &h, &u, &err),
                 0);
    CHECK_EQ_INT(ji_upload_append_check(&h, &u, 1000, &err), -1); /* no Upload-Complete */
    CHECK_EQ_INT(parse("PATCH /u HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 5\r\nContent-Encoding: gzip\r\n"
                       "Content-Type: application/offset+octet-stream\r\nContent-Length: 3\r\n\r\n",
                       &h, &u, &err),
                 0);
    CHECK_EQ_INT(ji_upload_append_check(&h, &u, 1000, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_UNSUPPORTED);
    CHECK_EQ_INT(parse("PATCH /u HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 5\r\n"
                       "Content-Type: application/partial-upload\r\nContent-Length: 3\r\n\r\n",
                       &h, &u, &err),
                 0);
    CHECK_EQ_INT(ji_upload_append_check(&h, &u, 1000, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_UNSUPPORTED);
    CHECK_EQ_INT(parse("PATCH /u HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nContent-Length: 0\r\n\r\n", &h, &u, &err), 0);
    CHECK_EQ_INT(ji_upload_append_check(&h, &u, 1000, &err), -1); /* no Upload-Offset */
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
}

static int route(const char *method, const char *path, ji_route_t *r, ji_error_t *err)
{
    return ji_route_match(method, strlen(method), path, strlen(path), r, err);
}

static void test_routes(void)
{
    ji_route_t r;
    ji_error_t err;
    const char *tok = "/uploads/0123456789abcdef0123456789abcdef";

    CHECK_EQ_INT(route("OPTIONS", "/uploads", &r, &err), 0);
    CHECK(r.id == JI_ROUTE_UPLOADS && r.resumable);
    CHECK_EQ_INT(route("POST", "/uploads", &r, &err), 0);
    CHECK_EQ_INT(route("GET", "/uploads", &r, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_METHOD);
    CHECK_EQ_STR(r.allow, "OPTIONS, POST");
    for (const char *const *m = (const char *const[]){"HEAD", "GET", "PATCH", "DELETE", NULL}; *m != NULL; m++) {
        CHECK_EQ_INT(route(*m, tok, &r, &err), 0);
        CHECK(r.id == JI_ROUTE_UPLOAD && r.resumable);
    }
    CHECK_EQ_INT(route("POST", tok, &r, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_METHOD);
    CHECK_EQ_STR(ji_route_name(JI_ROUTE_UPLOAD), "/uploads/{token}");
    static const char *const not_tokens[] = {
        "/uploads/0123456789ABCDEF0123456789abcdef",  "/uploads/0123456789abcdef0123456789abcde",
        "/uploads/0123456789abcdef0123456789abcdef0", "/uploads/0123456789abcdef0123456789abcdeg",
        "/uploads/0123456789abcdef0123456789abcdef/", "/uploads/",
    };
    for (size_t i = 0; i < sizeof(not_tokens) / sizeof(not_tokens[0]); i++) {
        CHECK_EQ_INT(route("GET", not_tokens[i], &r, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_NOT_FOUND);
    }
}

UNIT_MAIN("upload_headers", {"parse", test_parse}, {"creation", test_creation}, {"metadata", test_metadata},
          {"append", test_append}, {"routes", test_routes})
