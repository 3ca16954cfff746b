/* The item kernel compiled for avx512bf16 (selected at run time by CPUID; the rest of the
 * extension is built for the baseline ISA, so images stay portable: no -march=native). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
#define SUFFIX avx512bf16
#define WIDE 1
#define USE_DPBF16 1
#include "attn_impl.h"
#else
#include "tkg_native.h"
/* Not an x86 target: this variant is never selected. */
void tkg_item_avx512bf16(const tkg_problem *p, int item, tkg_partial part, float *ws) { tkg_item_generic(p, item, part, ws); }
#endif
