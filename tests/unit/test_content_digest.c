/* test_content_digest.c — the Content-Digest dictionary parser, and the digests checked streamed and whole. */
#include <openssl/evp.h>

#include "content_digest.h"
#include "request_rules.h"
#include "unit.h"

#define SHA256_HELLO "qUiQTy8PR5uPgZdpSzAYSw0u0cHNKh7A+4XSmaGSpEc="
#define SHA512_HELLO "2zl0qX8kB7fK4a5jfAAwaHoRkTJ01XhJJVjjnBbAF96E6s3Ixi/jTuThK0sUKIF/Cbaidgw/imZM6ulNJDSlkw=="
#define SHA256_EMPTY "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
static const char hello[] = "hello world\n";

static int parse(const char *value, ji_content_digest_expect_t *e, ji_error_t *err)
{
    return ji_content_digest_parse(e, value, strlen(value), err);
}

static void test_valid(void)
{
    static const char *const ok[] = {
        "sha-256=:" SHA256_HELLO ":",
        "sha-256=:" SHA256_HELLO ":, sha-512=:" SHA512_HELLO ":",
        "sha-512=:" SHA512_HELLO ":,sha-256=:" SHA256_HELLO ":",
        "  sha-256=:" SHA256_HELLO ":\t",
        "sha-256=:" SHA256_HELLO ":;p=1;q, md5=:AAAA:",
        "md5=:AAAA:, sha-256=:" SHA256_HELLO ":, crc32c=\"x\\\"y\", adler=?1, unixsum=-12.345, x=(a \"b\" 1);z, y, "
        "*t=tok/en:1",
        /* without padding: parsers should not refuse it (RFC 8941) */
        "sha-256=:qUiQTy8PR5uPgZdpSzAYSw0u0cHNKh7A+4XSmaGSpEc:",
    };
    ji_content_digest_expect_t e;
    ji_error_t err;

    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        int r = parse(ok[i], &e, &err);
        if (r != 0)
            fprintf(stderr, "refused %s: %s\n", ok[i], err.message);
        CHECK_EQ_INT(r, 0);
        CHECK(e.present[JI_DIGEST_SHA256]);
        CHECK_EQ_INT(ji_content_digest_check(&e, hello, strlen(hello), &err), 0);
    }
    CHECK_EQ_INT(parse("sha-256=:" SHA256_HELLO ":, sha-512=:" SHA512_HELLO ":", &e, &err), 0);
    CHECK(e.present[JI_DIGEST_SHA256] && e.present[JI_DIGEST_SHA512]);
    /* only unknown algorithms, or nothing: nothing to check */
    CHECK_EQ_INT(parse("md5=:AAAA:, sha=:AAAAAAAAAAAAAAAAAAAAAAAAAAA=:", &e, &err), 0);
    CHECK(!ji_content_digest_wanted(&e));
    CHECK_EQ_INT(parse("", &e, &err), 0);
    CHECK(!ji_content_digest_wanted(&e));
    CHECK_EQ_INT(parse("sha-384=:" SHA512_HELLO ":", &e, &err), 0);
    CHECK(!ji_content_digest_wanted(&e));
}

static void test_malformed(void)
{
    static const char *const bad[] = {
        "sha-256=" SHA256_HELLO,                                   /* no colons: a token cannot hold '=' */
        "sha-256=:" SHA256_HELLO,                                  /* not closed */
        "sha-256=" SHA256_HELLO ":",                               /* no opening colon */
        "sha-256=:qUiQTy8PR5uPgZdpSzAYSw0u0c*NKh7A+4XSmaGSpEc=:",  /* outside the alphabet */
        "sha-256=:qUiQ=Ty8PR5uPgZdpSzAYSw0u0cHNKh7A+4XSmaGSpEc:",  /* '=' inside */
        "sha-256=:qUiQTy8PR5uPgZdpSzAYSw0u0cHNKh7A+4XSmaGSpE=:",   /* padding on a length not a multiple of 4 */
        "sha-256=:qUiQTy8PR5uPgZdpSzAYSw0u0cHNKh7A+4XSmaGSpEcA=:", /* 33 bytes */
        "sha-256=:" SHA512_HELLO ":",                              /* a SHA-512 under sha-256 */
        "sha-512=:" SHA256_HELLO ":",
        "sha-256=:AAAA:",
        "sha-256=::",
        "sha-256", /* a boolean */
        "sha-256=?1",
        "sha-256=\"" SHA256_HELLO "\"",
        "sha-256=(:" SHA256_HELLO ":)",
        "sha-256=:" SHA256_HELLO ":, sha-256=:" SHA256_HELLO ":", /* twice */
        "SHA-256=:" SHA256_HELLO ":",                             /* keys are lowercase */
        "sha-256=:" SHA256_HELLO ":,",                            /* trailing comma */
        ",sha-256=:" SHA256_HELLO ":",
        "sha-256=:" SHA256_HELLO ": sha-512=:" SHA512_HELLO ":", /* no comma */
        "sha-256=:" SHA256_HELLO ":, md5=",                      /* unknown members must be valid too */
        "sha-256=:" SHA256_HELLO ":, md5=:AA=A:",
        "md5=(a b",
        "md5=\"unterminated",
        "md5=\"bad \\n escape\"",
        "md5=1234567890123456",
        "md5=1.2345",
        "md5=1.",
        "md5=-",
        "md5=?2",
        "md5=a;",
        "md5=#",
        "=:AAAA:",
        "sha-256=:" SHA256_HELLO ":;P=1",
    };
    ji_content_digest_expect_t e;
    ji_error_t err;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int r = parse(bad[i], &e, &err);
        if (r != -1)
            fprintf(stderr, "accepted %s\n", bad[i]);
        CHECK_EQ_INT(r, -1);
        CHECK(!ji_content_digest_wanted(&e));
        CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
        CHECK(strstr(err.message, "Content-Digest") != NULL);
    }
    CHECK_EQ_INT(parse("sha-256=:AAAA:", &e, &err), -1);
    CHECK_EQ_STR(err.message, "Content-Digest sha-256 must be 32 bytes, not 3");
}

static void test_limit(void)
{
    char value[JI_MAX_CONTENT_DIGEST_BYTES + 2];
    ji_content_digest_expect_t e;
    ji_error_t err;
    size_t n = strlen("sha-256=:" SHA256_HELLO ":, x=\"");

    memcpy(value, "sha-256=:" SHA256_HELLO ":, x=\"", n);
    memset(value + n, 'a', sizeof(value) - n);
    value[JI_MAX_CONTENT_DIGEST_BYTES - 1] = '"';
    value[JI_MAX_CONTENT_DIGEST_BYTES] = '\0';
    CHECK_EQ_INT(parse(value, &e, &err), 0); /* at the limit */
    value[JI_MAX_CONTENT_DIGEST_BYTES - 1] = 'a';
    value[JI_MAX_CONTENT_DIGEST_BYTES] = '"';
    value[JI_MAX_CONTENT_DIGEST_BYTES + 1] = '\0';
    CHECK_EQ_INT(parse(value, &e, &err), -1);
    CHECK(strstr(err.message, "JI_MAX_CONTENT_DIGEST_BYTES") != NULL);
}

static void test_streamed(void)
{
    ji_content_digest_expect_t e;
    ji_content_digest_t *d;
    ji_error_t err;

    /* in pieces, both algorithms */
    CHECK_EQ_INT(parse("sha-512=:" SHA512_HELLO ":, sha-256=:" SHA256_HELLO ":", &e, &err), 0);
    d = ji_content_digest_new(&e);
    CHECK(d != NULL);
    for (size_t i = 0; i < strlen(hello); i++)
        ji_content_digest_update(d, hello + i, 1);
    CHECK_EQ_INT(ji_content_digest_verify(d, &err), 0);
    CHECK_EQ_INT(ji_content_digest_verify(d, &err), 0); /* asked again: the same verdict */
    ji_content_digest_free(d);

    /* a byte short: the mismatch names the algorithm */
    d = ji_content_digest_new(&e);
    ji_content_digest_update(d, hello, strlen(hello) - 1);
    CHECK_EQ_INT(ji_content_digest_verify(d, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
    CHECK_EQ_STR(err.message, "Content-Digest sha-256 does not match the content");
    ji_content_digest_update(d, "\n", 1); /* ignored after the verdict */
    CHECK_EQ_INT(ji_content_digest_verify(d, &err), -1);
    ji_content_digest_free(d);

    /* sha-256 right, sha-512 wrong */
    CHECK_EQ_INT(parse("sha-256=:" SHA256_HELLO ":, sha-512=:" SHA512_HELLO ":", &e, &err), 0);
    e.value[JI_DIGEST_SHA512][5] ^= 1;
    CHECK_EQ_INT(ji_content_digest_check(&e, hello, strlen(hello), &err), -1);
    CHECK_EQ_STR(err.message, "Content-Digest sha-512 does not match the content");

    /* the empty content */
    CHECK_EQ_INT(parse("sha-256=:" SHA256_EMPTY ":", &e, &err), 0);
    CHECK_EQ_INT(ji_content_digest_check(&e, "", 0, &err), 0);
    d = ji_content_digest_new(&e);
    CHECK_EQ_INT(ji_content_digest_verify(d, &err), 0);
    ji_content_digest_free(d);
}

/** Bodies past JI_DIGEST_INLINE_BYTES go through the helper thread: pieces of any size, the ring wrapping. */
static void test_helper_thread(void)
{
    size_t len = 3 * JI_DIGEST_BUFFER_BYTES + 12345;
    unsigned char *body = malloc(len);
    unsigned char md256[32], md512[64];
    unsigned int n;
    ji_content_digest_expect_t e = {0};
    ji_content_digest_t *d;
    ji_error_t err;
    rng_t rng = {0x9e3779b97f4a7c15ull};

    rng_fill(&rng, body, len);
    CHECK(EVP_Digest(body, len, md256, &n, EVP_sha256(), NULL) == 1 && n == 32);
    CHECK(EVP_Digest(body, len, md512, &n, EVP_sha512(), NULL) == 1 && n == 64);
    e.present[JI_DIGEST_SHA256] = e.present[JI_DIGEST_SHA512] = true;
    memcpy(e.value[JI_DIGEST_SHA256], md256, 32);
    memcpy(e.value[JI_DIGEST_SHA512], md512, 64);
    CHECK_EQ_INT(ji_content_digest_check(&e, body, len, &err), 0);
    for (int round = 0; round < 4; round++) {
        /* round 0: pieces up to 64 KiB; 1: up to 5 MiB (more than the ring at once); 2: one byte short; 3: freed
         * half way, never verified */
        size_t max_piece = round == 1 ? 5u << 20 : 64u << 10, end = round == 2 ? len - 1 : len;
        d = ji_content_digest_new(&e);
        CHECK(d != NULL);
        for (size_t off = 0; off < end;) {
            size_t piece = 1 + rng_next(&rng) % max_piece;
            if (piece > end - off)
                piece = end - off;
            ji_content_digest_update(d, body + off, piece);
            off += piece;
            if (round == 3 && off > len / 2)
                break;
        }
        if (round < 2)
            CHECK_EQ_INT(ji_content_digest_verify(d, &err), 0);
        if (round == 2) {
            CHECK_EQ_INT(ji_content_digest_verify(d, &err), -1);
            CHECK_EQ_STR(err.message, "Content-Digest sha-256 does not match the content");
        }
        ji_content_digest_free(d);
    }
    free(body);
}

static void test_request_head(void)
{
    static const char two[] = "POST /users HTTP/1.1\r\nContent-Digest: sha-256=:" SHA256_HELLO
                              ":\r\nContent-Digest: sha-512=:" SHA512_HELLO ":\r\n\r\n";
    static const char one[] = "POST /users HTTP/1.1\r\ncontent-digest: sha-256=:" SHA256_HELLO ":\r\n\r\n";
    static const char bad[] = "POST /users HTTP/1.1\r\nContent-Digest: sha-256=" SHA256_HELLO "\r\n\r\n";
    ji_request_head_t h;
    ji_upload_options_t o;
    ji_error_t err;

    CHECK_EQ_INT(ji_request_head_parse(&h, two, strlen(two), &err), -1);
    CHECK_EQ_STR(err.message, "more than one Content-Digest header");
    CHECK_EQ_INT(ji_request_head_parse(&h, one, strlen(one), &err), 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), 0);
    CHECK(o.digest.present[JI_DIGEST_SHA256] && !o.digest.present[JI_DIGEST_SHA512]);
    CHECK_EQ_INT(ji_request_head_parse(&h, bad, strlen(bad), &err), 0);
    CHECK_EQ_INT(ji_upload_options_parse(&o, &h, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
}

UNIT_MAIN("content_digest", {"valid", test_valid}, {"malformed", test_malformed}, {"limit", test_limit},
          {"streamed", test_streamed}, {"helper_thread", test_helper_thread}, {"request_head", test_request_head})
