/* main.c — entry point: `jsonl-ingest [flags]` serves, `jsonl-ingest gc [flags]` cleans up. */
#include <malloc.h>
#include <stdio.h>

#include "config.h"
#include "server.h"

int main(int argc, char **argv)
{
    ji_config_t config;

    /* Per-record buffers (yajl's string buffer, socket input) of a few hundred KiB are allocated and freed for
     * every record; above glibc's default 128 KiB they would be mmap'd and unmapped each time, and every page
     * faulted in again. Keep them in the heap, and keep the freed top of the heap for the next record. */
    mallopt(M_MMAP_THRESHOLD, 1024 * 1024);
    mallopt(M_TRIM_THRESHOLD, 4 * 1024 * 1024);

    if (ji_config_parse(&config, argc, argv) != 0)
        return 2;
    switch (config.command) {
    case JI_CMD_HELP:
        ji_config_usage(argv[0], stdout);
        return 0;
    case JI_CMD_GC:
        return ji_server_gc(&config);
    case JI_CMD_SERVE:
        break;
    }
    return ji_server_run(&config);
}
