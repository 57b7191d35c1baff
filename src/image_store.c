/* image_store.c — placeholder until the module lands. */
#include "common.h"
