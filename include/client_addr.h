/*
 * client_addr.h — who the client is: the peer's address, or, when the peer is
 * a proxy listed in --trusted-proxies, the nearest address in X-Forwarded-For
 * that is not itself a trusted proxy. Used for per-client limits and logs.
 */
#ifndef JI_CLIENT_ADDR_H
#define JI_CLIENT_ADDR_H

#include <netinet/in.h>
#include <sys/socket.h>
#include "common.h"
#include "picohttp.h"

/** Most CIDR blocks in --trusted-proxies. */
#define JI_MAX_TRUSTED_PROXIES 32
/** Room for an address in text form. */
#define JI_CLIENT_ADDR_LEN 64

typedef struct st_ji_cidr_t {
    int family; /**< AF_INET or AF_INET6 */
    unsigned char addr[16];
    unsigned prefix;
} ji_cidr_t;

typedef struct st_ji_trusted_proxies_t {
    ji_cidr_t blocks[JI_MAX_TRUSTED_PROXIES];
    size_t count;
} ji_trusted_proxies_t;

/** Parses "10.0.0.0/8,::1,192.168.1.7" (a bare address is a /32 or /128). 0, or -1 with `err` filled. */
int ji_trusted_proxies_parse(ji_trusted_proxies_t *tp, const char *list, ji_error_t *err) JI_MUST_CHECK;

/**
 * The client's address in text form into `out`. `peer` itself, unless it is in `tp`: then X-Forwarded-For
 * decides (`headers`: the request's headers, NULL when there are none; several X-Forwarded-For headers count as
 * one list in their order): the right-most hop that is not a trusted proxy (or the left-most one when all are;
 * a hop that is not a bare IP address ends the walk, the hop to its right stands). The header of a peer that is
 * not trusted is ignored: anyone can write one.
 */
void ji_client_address(const struct sockaddr *peer, const ji_trusted_proxies_t *tp, const struct phr_header *headers,
                       size_t num_headers, char out[JI_CLIENT_ADDR_LEN]);

#endif
