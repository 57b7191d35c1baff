/* reads.c — placeholder: the read side is not served yet. */
#include "reads.h"

int ji_reads_handle_users(ji_worker_t *w, h2o_req_t *req)
{
    (void)w;
    (void)req;
    return -1;
}

void ji_reads_register(h2o_hostconf_t *host)
{
    (void)host;
}
