/* routes.c — the table of exact routes: path shape and allowed methods. */
#include "routes.h"

#include <string.h>

static const char ALLOW_READ[] = "GET, HEAD";
static const char ALLOW_USERS[] = "GET, HEAD, POST";
static const char ALLOW_UPLOADS[] = "OPTIONS, POST";
static const char ALLOW_UPLOAD[] = "DELETE, GET, HEAD, PATCH";

static bool span_is(const char *s, size_t len, const char *lit)
{
    return len == strlen(lit) && memcmp(s, lit, len) == 0;
}

/**
 * `<prefix>{segment}` (the item) or `<prefix>{segment}<sub>`: the read side judges the segment (400 for a bad id).
 * -1 when the path has neither shape.
 */
static int route_of_item(const char *p, size_t len, const char *prefix, const char *sub, ji_route_id_t item,
                         ji_route_id_t below, ji_route_id_t *id)
{
    size_t prefix_len = strlen(prefix), seg_len;
    const char *seg, *slash;

    if (len <= prefix_len || memcmp(p, prefix, prefix_len) != 0)
        return -1;
    seg = p + prefix_len;
    slash = memchr(seg, '/', len - prefix_len);
    seg_len = slash != NULL ? (size_t)(slash - seg) : len - prefix_len;
    if (seg_len == 0)
        return -1;
    if (slash == NULL) {
        *id = item;
        return 0;
    }
    if (span_is(slash, len - (size_t)(slash - p), sub)) {
        *id = below;
        return 0;
    }
    return -1;
}

/** `/uploads/{token}` with a token of the right shape (JI_UPLOAD_TOKEN_CHARS lowercase hex digits). */
static bool is_upload_path(const char *p, size_t len)
{
    static const char prefix[] = "/uploads/";

    if (len != sizeof(prefix) - 1 + JI_UPLOAD_TOKEN_CHARS || memcmp(p, prefix, sizeof(prefix) - 1) != 0)
        return false;
    for (size_t i = sizeof(prefix) - 1; i < len; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f')))
            return false;
    return true;
}

/** The route of a path, by shape alone. -1 when no route has that path. */
static int route_of_path(const char *p, size_t len, ji_route_id_t *id)
{
    static const struct {
        const char *path;
        ji_route_id_t id;
    } fixed[] = {
        {"/users", JI_ROUTE_USERS},     {"/users.csv", JI_ROUTE_USERS_CSV}, {"/healthz", JI_ROUTE_HEALTHZ},
        {"/readyz", JI_ROUTE_READYZ},   {"/metrics", JI_ROUTE_METRICS},     {"/batches", JI_ROUTE_BATCHES},
        {"/uploads", JI_ROUTE_UPLOADS},
    };

    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
        if (span_is(p, len, fixed[i].path)) {
            *id = fixed[i].id;
            return 0;
        }
    }
    if (is_upload_path(p, len)) {
        *id = JI_ROUTE_UPLOAD;
        return 0;
    }
    if (route_of_item(p, len, "/users/", "/image", JI_ROUTE_USER, JI_ROUTE_USER_IMAGE, id) == 0)
        return 0;
    return route_of_item(p, len, "/batches/", "/rejected", JI_ROUTE_BATCH, JI_ROUTE_REJECTED, id);
}

int ji_route_match(const char *method, size_t method_len, const char *path, size_t path_len, ji_route_t *route,
                   ji_error_t *err)
{
    bool read = span_is(method, method_len, "GET") || span_is(method, method_len, "HEAD");

    memset(route, 0, sizeof(*route));
    if (route_of_path(path, path_len, &route->id) != 0)
        return ji_error_set(err, JI_ERR_NOT_FOUND, 0, NULL, "no such route");
    route->allow = route->id == JI_ROUTE_USERS     ? ALLOW_USERS
                   : route->id == JI_ROUTE_UPLOADS ? ALLOW_UPLOADS
                   : route->id == JI_ROUTE_UPLOAD  ? ALLOW_UPLOAD
                                                   : ALLOW_READ;
    route->probe = route->id == JI_ROUTE_HEALTHZ || route->id == JI_ROUTE_READYZ;
    route->resumable = route->id == JI_ROUTE_UPLOADS || route->id == JI_ROUTE_UPLOAD;
    if (route->id == JI_ROUTE_UPLOADS) {
        if (span_is(method, method_len, "OPTIONS") || span_is(method, method_len, "POST"))
            return 0;
    } else if (route->id == JI_ROUTE_UPLOAD) {
        if (read || span_is(method, method_len, "PATCH") || span_is(method, method_len, "DELETE"))
            return 0;
    } else if (read) {
        return 0;
    }
    if (route->id == JI_ROUTE_USERS && span_is(method, method_len, "POST")) {
        route->upload = true;
        return 0;
    }
    return ji_error_set(err, JI_ERR_METHOD, 0, NULL, "method %.*s is not allowed here (allowed: %s)",
                        (int)(method_len < 16 ? method_len : 16), method, route->allow);
}

const char *ji_route_name(ji_route_id_t id)
{
    static const char *const names[JI_ROUTE_COUNT + 1] = {
        [JI_ROUTE_USERS] = "/users",
        [JI_ROUTE_USERS_CSV] = "/users.csv",
        [JI_ROUTE_USER] = "/users/{id}",
        [JI_ROUTE_USER_IMAGE] = "/users/{id}/image",
        [JI_ROUTE_HEALTHZ] = "/healthz",
        [JI_ROUTE_READYZ] = "/readyz",
        [JI_ROUTE_METRICS] = "/metrics",
        [JI_ROUTE_UPLOADS] = "/uploads",
        [JI_ROUTE_UPLOAD] = "/uploads/{token}",
        [JI_ROUTE_COUNT] = "other",
    };
    return (unsigned)id <= JI_ROUTE_COUNT && names[id] != NULL ? names[id] : "other";
}
