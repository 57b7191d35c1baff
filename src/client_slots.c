/* client_slots.c — the per-client count of running uploads (--max-client-ingests). */
#include "client_slots.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ji_client_slots_init(ji_client_slots_t *t, size_t cap, unsigned max_per_client)
{
    memset(t, 0, sizeof(*t));
    t->cap = cap > 0 ? cap : 1;
    t->max_per_client = max_per_client;
    if ((t->entries = calloc(t->cap, sizeof(*t->entries))) == NULL)
        return -1;
    pthread_mutex_init(&t->mutex, NULL);
    return 0;
}

void ji_client_slots_dispose(ji_client_slots_t *t)
{
    if (t->entries != NULL) {
        pthread_mutex_destroy(&t->mutex);
        free(t->entries);
        t->entries = NULL;
    }
}

/** The entry of `client`, or a free one when `take_free`, or NULL. Called with the mutex held. */
static ji_client_slot_t *find(ji_client_slots_t *t, const char *client, bool take_free)
{
    ji_client_slot_t *free_entry = NULL;

    for (size_t i = 0; i < t->cap; i++) {
        ji_client_slot_t *e = &t->entries[i];
        if (e->client[0] == '\0') {
            if (free_entry == NULL)
                free_entry = e;
        } else if (strcmp(e->client, client) == 0) {
            return e;
        }
    }
    return take_free ? free_entry : NULL;
}

int ji_client_slots_take(ji_client_slots_t *t, const char *client, ji_error_t *err)
{
    ji_client_slot_t *e;
    int ret = 0;

    if (t->max_per_client == 0)
        return 0;
    pthread_mutex_lock(&t->mutex);
    if ((e = find(t, client, true)) == NULL) {
        ret = ji_error_set(err, JI_ERR_BUSY, 0, NULL, "too many uploads in progress: retry later");
    } else if (e->count >= t->max_per_client) {
        ret = ji_error_set(err, JI_ERR_BUSY, 0, NULL,
                           "this client already runs %u uploads (--max-client-ingests): retry later", e->count);
    } else {
        if (e->count++ == 0)
            snprintf(e->client, sizeof(e->client), "%s", client);
    }
    pthread_mutex_unlock(&t->mutex);
    return ret;
}

void ji_client_slots_release(ji_client_slots_t *t, const char *client)
{
    ji_client_slot_t *e;

    if (t->max_per_client == 0)
        return;
    pthread_mutex_lock(&t->mutex);
    if ((e = find(t, client, false)) != NULL && --e->count == 0)
        e->client[0] = '\0';
    pthread_mutex_unlock(&t->mutex);
}
