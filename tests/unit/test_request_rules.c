/* test_request_rules.c — head parsing and its verdicts, exact routes, Origin/Host/token, the client address. */
#include <arpa/inet.h>
#include <stdlib.h>

#include "client_addr.h"
#include "request_rules.h"
#include "routes.h"
#include "unit.h"

static int parse(const char *text, ji_request_head_t *h, ji_error_t *err)
{
    return ji_request_head_parse(h, text, strlen(text), err);
}

static void test_framing(void)
{
    ji_request_head_t h;
    ji_error_t err;

    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Length: 12\r\n\r\n", &h, &err), 0);
    CHECK(h.has_length && h.content_length == 12 && h.keep_alive && ji_request_has_body(&h));
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Len", &h, &err), 1);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", &h, &err),
                 -1);
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", &h, &err), -1);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Length: -1\r\n\r\n", &h, &err), -1);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", &h, &err), -1);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", &h, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_NOT_IMPLEMENTED);
    CHECK_EQ_INT(parse("POST /users HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", &h, &err), -1);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nExpect: 200-ok\r\n\r\n", &h, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_EXPECTATION);
    CHECK_EQ_INT(parse("GET /healthz HTTP/1.0\r\n\r\n", &h, &err), 0);
    CHECK(!h.keep_alive);
    CHECK_EQ_INT(parse("GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", &h, &err), 0);
    CHECK(h.keep_alive);
    CHECK_EQ_INT(parse("GET /healthz HTTP/1.1\r\nConnection: foo, close\r\n\r\n", &h, &err), 0);
    CHECK(!h.keep_alive);
    CHECK_EQ_INT(parse("GET /users?after_id=3 HTTP/1.1\r\n\r\n", &h, &err), 0);
    CHECK(h.path_len == 6 && h.query_len == 10 && memcmp(h.query, "after_id=3", 10) == 0);
}

static void test_duplicates_and_limits(void)
{
    ji_request_head_t h;
    ji_error_t err;
    char *big;
    size_t n = 0;

    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n", &h, &err),
                 -1);
    CHECK(strstr(err.message, "Authorization") != NULL);
    CHECK_EQ_INT(parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", &h, &err), -1);
    CHECK_EQ_INT(parse("GET / HTTP/1.1\r\nIdempotency-Key: a\r\nIdempotency-Key: a\r\n\r\n", &h, &err), -1);
    big = malloc(JI_MAX_HEAD_BYTES + 100);
    n += (size_t)sprintf(big, "GET / HTTP/1.1\r\n");
    while (n < JI_MAX_HEAD_BYTES + 10)
        n += (size_t)sprintf(big + n, "X: y\r\n");
    CHECK_EQ_INT(ji_request_head_parse(&h, big, n, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_HEAD_TOO_LARGE);
    n = (size_t)sprintf(big, "GET / HTTP/1.1\r\n");
    for (int i = 0; i < JI_MAX_HEADERS + 1; i++)
        n += (size_t)sprintf(big + n, "X%d: y\r\n", i);
    n += (size_t)sprintf(big + n, "\r\n");
    CHECK_EQ_INT(ji_request_head_parse(&h, big, n, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_HEAD_TOO_LARGE);
    free(big);
}

static int route(const char *method, const char *path, ji_route_t *r, ji_error_t *err)
{
    return ji_route_match(method, strlen(method), path, strlen(path), r, err);
}

static void test_routes(void)
{
    ji_route_t r;
    ji_error_t err;

    CHECK_EQ_INT(route("POST", "/users", &r, &err), 0);
    CHECK(r.upload && r.id == JI_ROUTE_USERS);
    CHECK_EQ_INT(route("GET", "/users", &r, &err), 0);
    CHECK(!r.upload);
    CHECK_EQ_INT(route("HEAD", "/users/12/image", &r, &err), 0);
    CHECK_EQ_INT(r.id, JI_ROUTE_USER_IMAGE);
    CHECK_EQ_INT(route("GET", "/users/abc", &r, &err), 0);
    CHECK_EQ_INT(r.id, JI_ROUTE_USER);
    CHECK_EQ_INT(route("POST", "/users/42", &r, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_METHOD);
    CHECK_EQ_STR(r.allow, "GET, HEAD");
    CHECK_EQ_INT(route("DELETE", "/users", &r, &err), -1);
    CHECK_EQ_STR(r.allow, "GET, HEAD, POST");
    static const char *const not_found[] =
        {"/users/",   "/./users", "/%75sers", "/x/../users", "/users/1/", "/users/1/imag", "/users//image", "/USERS",
         "/healthz/", "",         "/"};
    for (size_t i = 0; i < sizeof(not_found) / sizeof(not_found[0]); i++) {
        CHECK_EQ_INT(route("POST", not_found[i], &r, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_NOT_FOUND);
    }
    CHECK_EQ_INT(route("GET", "/healthz", &r, &err), 0);
    CHECK(r.probe);
    CHECK_EQ_INT(route("GET", "/metrics", &r, &err), 0);
    CHECK(!r.probe);
    CHECK_EQ_INT(route("GET", "/batches", &r, &err), 0);
    CHECK_EQ_INT(r.id, JI_ROUTE_BATCHES);
    CHECK_EQ_INT(route("HEAD", "/batches/7", &r, &err), 0);
    CHECK_EQ_INT(r.id, JI_ROUTE_BATCH);
    CHECK_EQ_INT(route("GET", "/batches/x/rejected", &r, &err), 0);
    CHECK_EQ_INT(r.id, JI_ROUTE_REJECTED);
    CHECK_EQ_INT(route("POST", "/batches/7/rejected", &r, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_METHOD);
    CHECK_EQ_STR(r.allow, "GET, HEAD");
    static const char *const no_batch[] = {"/batches/",        "/batches/7/",        "/batches/7/rejected/",
                                           "/batches/7/image", "/batches//rejected", "/batches.csv",
                                           "/batch/7"};
    for (size_t i = 0; i < sizeof(no_batch) / sizeof(no_batch[0]); i++) {
        CHECK_EQ_INT(route("GET", no_batch[i], &r, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_NOT_FOUND);
    }
}

static void test_policy(void)
{
    ji_request_policy_t p = {.token = "0123456789abcdef",
                             .token_len = 16,
                             .allowed_origins = "http://a.example, http://b.example:81",
                             .allowed_hosts = "localhost,127.0.0.1,[::1]"};
    ji_request_head_t h;
    ji_error_t err;

    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nHost: localhost:8000\r\nAuthorization: Bearer 0123456789abcdef\r\n\r\n",
                       &h, &err),
                 0);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, true, true, &err), 0);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nHost: localhost\r\nAuthorization: bearer   0123456789abcdef\r\n\r\n",
                       &h, &err),
                 0);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, true, true, &err), 0);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer 0123456789abcdeX\r\n\r\n", &h,
                       &err),
                 0);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, true, true, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_UNAUTHORIZED);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, false, true, &err), 0); /* a read route takes no token */
    CHECK_EQ_INT(parse("GET /users HTTP/1.1\r\nHost: evil.example\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, false, true, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_FORBIDDEN);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, false, false, &err), 0);
    CHECK_EQ_INT(parse("GET /users HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, false, true, &err), 0);
    CHECK_EQ_INT(parse("GET /users HTTP/1.1\r\nHost: localhost\r\nOrigin: http://b.example:81\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, false, true, &err), 0);
    CHECK_EQ_INT(parse("GET /users HTTP/1.1\r\nHost: localhost\r\nOrigin: http://b.example\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, false, true, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_FORBIDDEN);
    CHECK_EQ_INT(parse("GET /users HTTP/1.1\r\nHost: localhost\r\nOrigin: null\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, false, true, &err), -1);
    p.allowed_origins = NULL;
    CHECK_EQ_INT(parse("GET /users HTTP/1.1\r\nHost: localhost\r\nOrigin: http://a.example\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_request_check_policy(&h, &p, false, true, &err), -1);
}

static void test_upload_options(void)
{
    ji_request_head_t h;
    ji_upload_options_t o;
    ji_error_t err;

    CHECK_EQ_INT(parse("POST /users?on_error=skip&format=array HTTP/1.1\r\nContent-Encoding: gzip\r\n"
                       "Idempotency-Key: \"k-1\"\r\n\r\n",
                       &h, &err),
                 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), 0);
    CHECK(o.skip_errors && o.format == JI_FORMAT_ARRAY && o.encoding == JI_ENCODING_GZIP);
    CHECK_EQ_STR(o.idempotency_key, "k-1");
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Type: application/x-ndjson; charset=utf-8\r\n\r\n", &h, &err),
                 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), 0);
    CHECK_EQ_INT(o.format, JI_FORMAT_JSONL);
    CHECK_EQ_INT(parse("POST /users?format=xml HTTP/1.1\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_UNSUPPORTED);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Encoding: br\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_UNSUPPORTED);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Encoding: ZSTD\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), 0);
    CHECK_EQ_INT(o.encoding, JI_ENCODING_ZSTD);
    /* two different codings (both applied, in order) are not supported; identity next to one changes nothing */
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Encoding: zstd\r\n\r\n", &h, &err),
                 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_UNSUPPORTED);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Encoding: zstd\r\nContent-Encoding: identity\r\n\r\n", &h,
                       &err),
                 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), 0);
    CHECK_EQ_INT(o.encoding, JI_ENCODING_ZSTD);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nContent-Encoding: zstd, gzip\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_UNSUPPORTED);
    CHECK_EQ_INT(parse("POST /users HTTP/1.1\r\nIdempotency-Key: \xff\r\n\r\n", &h, &err), 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
    CHECK_EQ_INT(ji_body_is_array(" \r\n [", 5), 1);
    CHECK_EQ_INT(ji_body_is_array(" {", 2), 0);
    CHECK_EQ_INT(ji_body_is_array("  ", 2), -1);
}

static void v4(struct sockaddr_in *sa, const char *addr)
{
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    inet_pton(AF_INET, addr, &sa->sin_addr);
}

/** ji_client_address with X-Forwarded-For headers `xff` (NULL-terminated list of values, in order). */
static void client_of(const char *peer_addr, const ji_trusted_proxies_t *tp, const char *const *xff, char *out)
{
    struct phr_header h[4];
    struct sockaddr_in peer;
    size_t n = 0;

    h[n++] = (struct phr_header){"Host", 4, "x", 1};
    for (; xff != NULL && *xff != NULL; xff++) {
        const char *name = n % 2 ? "X-Forwarded-For" : "x-forwarded-for"; /* names are case-insensitive */
        h[n] = (struct phr_header){name, 15, *xff, strlen(*xff)};
        n++;
    }
    v4(&peer, peer_addr);
    ji_client_address((struct sockaddr *)&peer, tp, h, n, out);
}

static void test_client_address(void)
{
    ji_trusted_proxies_t tp;
    char out[JI_CLIENT_ADDR_LEN];
    ji_error_t err;

    CHECK_EQ_INT(ji_trusted_proxies_parse(&tp, "10.0.0.0/8, 127.0.0.1,::1", &err), 0);
    CHECK_EQ_INT(tp.count, 3);
    client_of("127.0.0.1", &tp, (const char *[]){"203.0.113.9, 10.1.2.3", NULL}, out);
    CHECK_EQ_STR(out, "203.0.113.9"); /* 10.1.2.3 is a trusted hop */
    client_of("127.0.0.1", &tp, (const char *[]){"198.51.100.1, 203.0.113.9", NULL}, out);
    CHECK_EQ_STR(out, "203.0.113.9"); /* the right-most untrusted hop, not what the client wrote on the left */
    client_of("192.0.2.1", &tp, (const char *[]){"203.0.113.9, 10.1.2.3", NULL}, out);
    CHECK_EQ_STR(out, "192.0.2.1"); /* an untrusted peer's X-Forwarded-For is ignored */
    client_of("127.0.0.1", &tp, (const char *[]){"10.0.0.1,10.0.0.2", NULL}, out);
    CHECK_EQ_STR(out, "10.0.0.1"); /* all trusted: the left-most */
    client_of("127.0.0.1", &tp, (const char *[]){"junk, 198.51.100.7", NULL}, out);
    CHECK_EQ_STR(out, "198.51.100.7");
    client_of("127.0.0.1", &tp, (const char *[]){"198.51.100.7, junk", NULL}, out);
    CHECK_EQ_STR(out, "127.0.0.1"); /* the nearest hop unreadable: the peer stands */
    client_of("127.0.0.1", &tp, NULL, out);
    CHECK_EQ_STR(out, "127.0.0.1");
    /* a proxy that adds its own header after the client's: the last header holds the nearest hops */
    client_of("127.0.0.1", &tp, (const char *[]){"6.6.6.6", "203.0.113.9", NULL}, out);
    CHECK_EQ_STR(out, "203.0.113.9");
    /* two proxies: the nearest header names only the trusted first proxy, the walk goes on to the left */
    client_of("127.0.0.1", &tp, (const char *[]){"6.6.6.6", "203.0.113.9", "10.9.9.9", NULL}, out);
    CHECK_EQ_STR(out, "203.0.113.9");
    client_of("192.0.2.1", &tp, (const char *[]){"6.6.6.6", "203.0.113.9", NULL}, out);
    CHECK_EQ_STR(out, "192.0.2.1");
    CHECK_EQ_INT(ji_trusted_proxies_parse(&tp, "10.0.0.0/33", &err), -1);
    CHECK_EQ_INT(ji_trusted_proxies_parse(&tp, "example.com", &err), -1);
    CHECK_EQ_INT(ji_trusted_proxies_parse(&tp, "10.0.0.0/", &err), -1);
    CHECK_EQ_INT(ji_trusted_proxies_parse(&tp, "10.0.0.0/8,,", &err), -1);
}

UNIT_MAIN("request_rules", {"framing", test_framing}, {"duplicates_and_limits", test_duplicates_and_limits},
          {"routes", test_routes}, {"policy", test_policy}, {"upload_options", test_upload_options},
          {"client_address", test_client_address})
