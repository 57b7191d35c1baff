/* main.c — entry point: `jsonl-ingest [flags]` serves, `jsonl-ingest gc [flags]` cleans up. */
#include <stdio.h>

#include "config.h"
#include "server.h"

int main(int argc, char **argv)
{
    ji_config_t config;

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
