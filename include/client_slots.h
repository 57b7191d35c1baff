/*
 * client_slots.h — how many uploads each client runs at once, process-wide
 * (--max-client-ingests): one client cannot take every upload place. A small
 * table of client addresses with counts, shared by the workers under a mutex
 * (taken twice per upload, never on the per-byte path).
 */
#ifndef JI_CLIENT_SLOTS_H
#define JI_CLIENT_SLOTS_H

#include <pthread.h>
#include "common.h"

typedef struct st_ji_client_slot_t {
    char client[64]; /**< "" when the entry is free */
    unsigned count;
} ji_client_slot_t;

typedef struct st_ji_client_slots_t {
    pthread_mutex_t mutex;
    ji_client_slot_t *entries; /**< `cap` entries (at least the process's --max-ingests, so one always fits) */
    size_t cap;
    unsigned max_per_client; /**< 0: no cap */
} ji_client_slots_t;

/** 0, or -1 when out of memory. */
int ji_client_slots_init(ji_client_slots_t *t, size_t cap, unsigned max_per_client) JI_MUST_CHECK;
void ji_client_slots_dispose(ji_client_slots_t *t);

/** Takes a place for `client`. 0, or -1 with `err` (JI_ERR_BUSY) when the client already runs its maximum. */
int ji_client_slots_take(ji_client_slots_t *t, const char *client, ji_error_t *err) JI_MUST_CHECK;
/** Gives back a place taken with ji_client_slots_take. */
void ji_client_slots_release(ji_client_slots_t *t, const char *client);

#endif
