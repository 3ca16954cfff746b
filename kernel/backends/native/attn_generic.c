/* The item kernel for the baseline instruction set of the target (SSE2 on x86-64). */
#define SUFFIX generic
#define USE_DPBF16 0
#include "attn_impl.h"
