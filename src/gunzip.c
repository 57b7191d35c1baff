/* gunzip.c — placeholder until the gzip stage lands. */
#include "gunzip.h"
