/* client_addr.c — --trusted-proxies and the client address behind them. */
#include "client_addr.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/** Parses one address (no prefix) of either family. */
static bool parse_addr(const char *s, int *family, unsigned char addr[16])
{
    if (inet_pton(AF_INET, s, addr) == 1) {
        *family = AF_INET;
        return true;
    }
    if (inet_pton(AF_INET6, s, addr) == 1) {
        *family = AF_INET6;
        return true;
    }
    return false;
}

int ji_trusted_proxies_parse(ji_trusted_proxies_t *tp, const char *list, ji_error_t *err)
{
    const char *p = list;

    memset(tp, 0, sizeof(*tp));
    while (*p != '\0') {
        char item[80], *slash;
        size_t n = strcspn(p, ",");
        ji_cidr_t *b;
        while (n > 0 && (*p == ' ' || *p == '\t')) {
            p++;
            n--;
        }
        if (n == 0 || n >= sizeof(item))
            return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "--trusted-proxies: bad entry near '%.20s'", p);
        memcpy(item, p, n);
        item[n] = '\0';
        while (n > 0 && (item[n - 1] == ' ' || item[n - 1] == '\t'))
            item[--n] = '\0';
        if (tp->count == JI_MAX_TRUSTED_PROXIES)
            return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL,
                                "--trusted-proxies: more than JI_MAX_TRUSTED_PROXIES (" JI_STR(
                                    JI_MAX_TRUSTED_PROXIES) ") entries");
        b = &tp->blocks[tp->count];
        if ((slash = strchr(item, '/')) != NULL)
            *slash = '\0';
        if (!parse_addr(item, &b->family, b->addr))
            return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "--trusted-proxies: '%s' is not an address", item);
        b->prefix = b->family == AF_INET ? 32 : 128;
        if (slash != NULL) {
            char *end;
            unsigned long v = strtoul(slash + 1, &end, 10);
            if (slash[1] < '0' || slash[1] > '9' || *end != '\0' || v > b->prefix)
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "--trusted-proxies: bad prefix length in '%s/%s'",
                                    item, slash + 1);
            b->prefix = (unsigned)v;
        }
        tp->count++;
        p += strcspn(p, ",");
        if (*p == ',')
            p++;
    }
    return 0;
}

static bool in_block(const ji_cidr_t *b, int family, const unsigned char *addr)
{
    unsigned full = b->prefix / 8, rest = b->prefix % 8;

    if (b->family != family || memcmp(b->addr, addr, full) != 0)
        return false;
    return rest == 0 || ((b->addr[full] ^ addr[full]) & (unsigned char)(0xff << (8 - rest))) == 0;
}

static bool trusted(const ji_trusted_proxies_t *tp, int family, const unsigned char *addr)
{
    unsigned char v4[4];

    if (family == AF_INET6 && memcmp(addr, "\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0) {
        memcpy(v4, addr + 12, 4); /* an IPv4-mapped peer is judged as IPv4 */
        family = AF_INET;
        addr = v4;
    }
    for (size_t i = 0; i < tp->count; i++)
        if (in_block(&tp->blocks[i], family, addr))
            return true;
    return false;
}

/**
 * Walks one X-Forwarded-For value from the right: each hop was appended by the proxy that received from it.
 * Each readable hop goes to `out`; true when the walk ends here (a hop that is not trusted, or one that cannot be
 * read: the last good one stands), false when every hop was a trusted proxy (the next header to the left goes on).
 */
static bool walk_hops(const char *value, size_t len, const ji_trusted_proxies_t *tp, char out[JI_CLIENT_ADDR_LEN])
{
    const char *end = value + len;

    for (;;) {
        const char *start = end;
        char hop[JI_CLIENT_ADDR_LEN];
        unsigned char hop_addr[16];
        int hop_family;
        size_t n;
        while (start > value && start[-1] != ',')
            start--;
        while (start < end && (*start == ' ' || *start == '\t'))
            start++;
        n = (size_t)(end - start);
        while (n > 0 && (start[n - 1] == ' ' || start[n - 1] == '\t'))
            n--;
        if (n == 0 || n >= sizeof(hop))
            return true;
        memcpy(hop, start, n);
        hop[n] = '\0';
        if (!parse_addr(hop, &hop_family, hop_addr))
            return true;
        snprintf(out, JI_CLIENT_ADDR_LEN, "%s", hop);
        if (!trusted(tp, hop_family, hop_addr))
            return true;
        while (start > value && start[-1] != ',')
            start--;
        if (start == value)
            return false;
        end = start - 1; /* before the comma */
    }
}

void ji_client_address(const struct sockaddr *peer, const ji_trusted_proxies_t *tp, const struct phr_header *headers,
                       size_t num_headers, char out[JI_CLIENT_ADDR_LEN])
{
    const unsigned char *addr = NULL;
    int family = peer != NULL ? peer->sa_family : AF_UNSPEC;

    snprintf(out, JI_CLIENT_ADDR_LEN, "unknown");
    if (family == AF_INET)
        addr = (const unsigned char *)&((const struct sockaddr_in *)peer)->sin_addr;
    else if (family == AF_INET6)
        addr = (const unsigned char *)&((const struct sockaddr_in6 *)peer)->sin6_addr;
    else
        return;
    inet_ntop(family, addr, out, JI_CLIENT_ADDR_LEN);
    if (tp->count == 0 || !trusted(tp, family, addr))
        return; /* X-Forwarded-For from anyone else is whatever the client wrote: ignored */
    /* several X-Forwarded-For headers are one list in order (RFC 9110 5.3): a proxy may add its own header after
     * the client's instead of appending to it (HAProxy's option forwardfor does), so the walk starts at the last */
    for (size_t i = num_headers; i-- > 0;) {
        const struct phr_header *h = &headers[i];
        if (h->name_len != sizeof("x-forwarded-for") - 1 ||
            strncasecmp(h->name, "x-forwarded-for", sizeof("x-forwarded-for") - 1) != 0)
            continue;
        if (walk_hops(h->value, h->value_len, tp, out))
            return;
    }
}
