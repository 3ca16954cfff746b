/* The item kernel compiled for avx2 (selected at run time by CPUID; the rest of the
 * extension is built for the baseline ISA, so images stay portable: no -march=native). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")
#define SUFFIX avx2
#define USE_DPBF16 0
#include "attn_impl.h"
#else
#include "tkg_native.h"
/* Not an x86 target: this variant is never selected. */
void tkg_item_avx2(const tkg_problem *p, int item, tkg_partial part, float *ws) { tkg_item_generic(p, item, part, ws); }
#endif
