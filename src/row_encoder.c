/* row_encoder.c — placeholder until the module lands. */
#include "common.h"
