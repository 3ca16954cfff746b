/* The item kernel with AMX-BF16 tiles for the products of the bf16 fast path (selected at run time
 * by CPUID and the kernel's leave to use tile data, see module.c); every other path is the
 * avx512bf16 variant's code. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,fma,f16c,amx-tile,amx-bf16")
#define SUFFIX amx
#define WIDE 1
#define USE_DPBF16 1
#define USE_AMX 1
#include "attn_impl.h"
#else
#include "tkg_native.h"
/* Not an x86 target: this variant is never selected. */
void tkg_item_amx(const tkg_problem *p, int item, tkg_partial part, float *ws) { tkg_item_generic(p, item, part, ws); }
#endif
