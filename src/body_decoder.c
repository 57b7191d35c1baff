/* body_decoder.c — placeholder until the module lands. */
#include "common.h"
