/* escape_scan.c — placeholder until the module lands. */
#include "common.h"
