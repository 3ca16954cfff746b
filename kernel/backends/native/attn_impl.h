/* The decode-attention item kernel, written once with GCC vector extensions and compiled once
 * per instruction set (attn_<isa>.c set the target with #pragma GCC target and define SUFFIX).
 * A 16-float vector becomes one zmm on AVX-512, two ymm on AVX2 and four xmm on baseline x86-64.
 *
 * Per item: keys are walked in chunks of TKG_CHUNK tokens straight out of the pool blocks (no
 * gathered copy of the cache). Each chunk of K is converted to fp32 once and scored against all
 * nq queries of the task (the q heads of a kv head share every key load), then an online
 * softmax (running max m, denominator l, fp32 accumulator) folds in the chunk's V.
 */
#include <math.h>
#include <string.h>
#if USE_DPBF16
#include <immintrin.h>
#endif
#ifndef USE_AMX
#define USE_AMX 0
#endif

#include "tkg_native.h"

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)

typedef float vf __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh_u __attribute__((vector_size(32), aligned(2)));
typedef _Float16 vhf_u __attribute__((vector_size(32), aligned(2)));

#define AI static inline __attribute__((always_inline))

/* WIDE: 32 vector registers of 16 floats (AVX-512). Narrower ISAs split each 16-float vector
 * into 2 (AVX2) or 4 (SSE) registers, so they use register-frugal loop shapes. */
#ifndef WIDE
#define WIDE 0
#endif
#if WIDE || defined(__AVX2__)
#define PVB 4
#else
#define PVB 2
#endif

AI vf splat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

typedef uint8_t vb_u __attribute__((vector_size(16), aligned(1)));

AI int elem_bytes(int dtype) { return dtype == TKG_F32 ? 4 : dtype == TKG_FP8 ? 1 : 2; }

/* 16 float8_e4m3 (sign, 4 exponent bits biased by 7, 3 mantissa bits) to fp32, exactly: the
 * magnitude bits move under the fp32 exponent (rebiased by 120); subnormals (exponent 0) take
 * the implicit 1 and subtract it back as 2^-6; exponent 15 is inf (mantissa 0) or NaN. */
AI vf fp8x16_to_f32(vu w) {
    vu mag = w & 0x7fu;
    vu sign = (w & 0x80u) << 24;
    vu sub = (vu)(mag < 8u);
    vu bits = (mag << 20) + (120u << 23) + (sub & (1u << 23));
    vu f = (vu)((vf)bits - (vf)(sub & 0x3c800000u)); /* 0x3c800000 = 2^-6 */
    vu special = (vu)(mag >= 0x78u);
    vu spec = (vu)(mag == 0x78u) & 0x7f800000u;
    spec |= ~(vu)(mag == 0x78u) & 0x7fc00000u;
    return (vf)(((f & ~special) | (spec & special)) | sign);
}

typedef uint16_t vh16 __attribute__((vector_size(64)));
typedef uint16_t vh16_u __attribute__((vector_size(64), aligned(2)));
typedef uint8_t vb32_u __attribute__((vector_size(32), aligned(1)));

/* A float8_e4m3 row of d (a multiple of 32) elements to bf16 bits, exactly (every e4m3 value is a
 * bf16 number), 32 at a time in 16-bit lanes: normal magnitudes move under the bf16 exponent
 * (rebiased by 120), the 8 subnormals come from a table, exponent 15 is inf or NaN. */
static const vh16 FP8_SUBNORMAL_BF16 = {0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};

AI void fp8_row_to_bf16(uint16_t *dst, const uint8_t *src, int d) {
    for (int c = 0; c < d; c += 32) {
        vh16 w = __builtin_convertvector(*(const vb32_u *)(src + c), vh16);
        vh16 mag = w & 0x7f;
        vh16 sign = (w & 0x80) << 8;
        vh16 r = (mag << 4) + 0x3C00;
        vh16 sub = (vh16)(mag < 8);
        r = (r & ~sub) | (__builtin_shuffle(FP8_SUBNORMAL_BF16, mag & 7) & sub);
        vh16 special = (vh16)(mag >= 0x78), inf = (vh16)(mag == 0x78);
        r = (r & ~special) | (((inf & 0x7F80) | (~inf & 0x7FC0)) & special);
        *(vh16_u *)(dst + c) = r | sign;
    }
}

#if USE_DPBF16
/* With AVX-512-VBMI, 64 fp8 values at a time: the bf16 bits of every e4m3 magnitude come from two
 * 128-entry byte tables (high and low byte, vpermi2b), the sign is or-ed into the high byte, and
 * the byte pairs are interleaved into words; the input bytes are first permuted so that the
 * in-lane interleave leaves the words in natural order. Tables: bf16(e4m3(m)) for m = 0..127. */
static const uint8_t FP8_BF16_HI[128] __attribute__((aligned(64))) = {
    0x00, 0x3b, 0x3b, 0x3b, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x3c,
    0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d, 0x3d,
    0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e, 0x3e,
    0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f,
    0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40,
    0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41, 0x41,
    0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42, 0x42,
    0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x43, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f,
};
static const uint8_t FP8_BF16_LO[128] __attribute__((aligned(64))) = {
    0x00, 0x00, 0x80, 0xc0, 0x00, 0x20, 0x40, 0x60, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0, 0xe0, 0xf0,
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0,
};
static const uint8_t FP8_VBMI_ORDER[64] __attribute__((aligned(64))) = {
    0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36, 37, 38, 39,
    8, 9, 10, 11, 12, 13, 14, 15, 40, 41, 42, 43, 44, 45, 46, 47,
    16, 17, 18, 19, 20, 21, 22, 23, 48, 49, 50, 51, 52, 53, 54, 55,
    24, 25, 26, 27, 28, 29, 30, 31, 56, 57, 58, 59, 60, 61, 62, 63,
};

/* The byte tables of the VBMI decode, loaded once per row (or per chunk on the AMX path). */
typedef struct {
    __m512i hi0, hi1, lo0, lo1, order, m80;
} fp8_tables;

#define FP8_VBMI __attribute__((target("avx512f,avx512bw,avx512vbmi")))

FP8_VBMI AI fp8_tables fp8_load_tables(void) {
    fp8_tables t = {_mm512_load_si512(FP8_BF16_HI), _mm512_load_si512(FP8_BF16_HI + 64),
                    _mm512_load_si512(FP8_BF16_LO), _mm512_load_si512(FP8_BF16_LO + 64),
                    _mm512_load_si512(FP8_VBMI_ORDER), _mm512_set1_epi8((char)0x80)};
    return t;
}

/* 64 fp8 values at src to bf16 bits: out[0] their first 32, out[1] the rest. */
FP8_VBMI AI void fp8x64_to_bf16(const fp8_tables *t, const void *src, __m512i out[2]) {
    __m512i x = _mm512_permutexvar_epi8(t->order, _mm512_loadu_si512(src));
    /* vpermi2b indexes 128 bytes by bits 0-6: the sign bit needs no masking. The sign goes back
     * in with one vpternlogd (table | (x & 0x80)). */
    __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t->hi0, x, t->hi1), x, t->m80, 0xF8);
    __m512i lo = _mm512_permutex2var_epi8(t->lo0, x, t->lo1);
    out[0] = _mm512_unpacklo_epi8(lo, hi);
    out[1] = _mm512_unpackhi_epi8(lo, hi);
}

/* The first d / 64 * 64 values of an fp8 row to bf16 bits; returns how many that is. */
FP8_VBMI AI int fp8_row_to_bf16_tables(const fp8_tables *t, uint16_t *dst, const uint8_t *src, int d) {
    int c = 0;
    for (; c + 64 <= d; c += 64) {
        __m512i w[2];
        fp8x64_to_bf16(t, src + c, w);
        _mm512_storeu_si512(dst + c, w[0]);
        _mm512_storeu_si512(dst + c + 32, w[1]);
    }
    return c;
}

FP8_VBMI static void fp8_row_to_bf16_vbmi(uint16_t *dst, const uint8_t *src, int d) {
    const fp8_tables t = fp8_load_tables();
    int c = fp8_row_to_bf16_tables(&t, dst, src, d);
    if (c < d) fp8_row_to_bf16(dst + c, src + c, d - c); /* a last 32 */
}
#endif

/* An fp8 row to bf16 bits by the fastest exact way this CPU has. */
AI void fp8_to_bf16(const tkg_problem *p, uint16_t *dst, const uint8_t *src, int d) {
#if USE_DPBF16
    if (p->vbmi) {
        fp8_row_to_bf16_vbmi(dst, src, d);
        return;
    }
#endif
    (void)p;
    fp8_row_to_bf16(dst, src, d);
}

/* 16 elements of a pool row to fp32. */
AI vf load16(const void *src, int dtype) {
    if (dtype == TKG_FP8) return fp8x16_to_f32(__builtin_convertvector(*(const vb_u *)src, vu));
    if (dtype == TKG_BF16) {
        vu w = __builtin_convertvector(*(const vh_u *)src, vu) << 16;
        return (vf)w;
    }
    if (dtype == TKG_F16) return __builtin_convertvector(*(const vhf_u *)src, vf);
    return *(const vf_u *)src;
}

AI float scalar_load(const void *src, int64_t i, int dtype) {
    if (dtype == TKG_FP8) {
        vu w = {((const uint8_t *)src)[i]};
        return fp8x16_to_f32(w)[0];
    }
    if (dtype == TKG_BF16) {
        uint32_t w = (uint32_t)((const uint16_t *)src)[i] << 16;
        float f;
        memcpy(&f, &w, 4);
        return f;
    }
    if (dtype == TKG_F16) return (float)((const _Float16 *)src)[i];
    return ((const float *)src)[i];
}

/* One row of d elements to fp32 at dst, zero-padded to dp. */
AI void row_to_f32(float *dst, const void *src, int d, int dp, int dtype) {
    int c = 0;
    int esz = elem_bytes(dtype);
    for (; c + 16 <= d; c += 16) *(vf *)(dst + c) = load16((const char *)src + (int64_t)c * esz, dtype);
    for (; c < d; c++) dst[c] = scalar_load(src, c, dtype);
    for (; c < dp; c++) dst[c] = 0.0f;
}

typedef uint32_t vu_u __attribute__((vector_size(64), aligned(2)));

/* A bf16 row of d (a multiple of 32) elements to fp32 in "split" order: per 32 elements, the 16
 * even ones then the 16 odd ones. A bf16 pair is one 32-bit word, so this costs a shift and a
 * mask per 16 values instead of widening conversions; q, the accumulators and the output use
 * the same order (dot products do not care, the output is put back in order at the end). */
AI void row_to_f32_split(float *dst, const void *src, int d) {
    for (int c = 0; c < d; c += 32) {
        vu w = *(const vu_u *)((const char *)src + 2 * c);
        *(vf *)(dst + c) = (vf)(w << 16);
        *(vf *)(dst + c + 16) = (vf)(w & 0xffff0000u);
    }
}

/* Source column of each accumulator index of a 32-column block, per layout (tkg_layout_column). */
static const uint8_t LAYOUT_COLS[3][32] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31},
    {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31},
    {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31},
};

/* An fp32 row (natural order) times `scale` into dst in a column layout (TKG_LAYOUT_*),
 * zero-padded to dp. */
AI void f32_row_to_layout_scaled(float *dst, const float *src, int d, int dp, int layout, float scale) {
    if (layout != TKG_LAYOUT_NATURAL) {
        const uint8_t *cols = LAYOUT_COLS[layout];
        for (int c = 0; c < d; c += 32)
            for (int i = 0; i < 32; i++) dst[c + i] = src[c + cols[i]] * scale;
    } else {
        for (int c = 0; c < dp; c++) dst[c] = c < d ? src[c] * scale : 0.0f;
    }
}

AI void f32_row_to_layout(float *dst, const float *src, int d, int dp, int layout) {
    f32_row_to_layout_scaled(dst, src, d, dp, layout, 1.0f);
}

/* m ? a : b lane-wise (the vector ?: is C++-only in GCC). */
AI vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

AI vf vmax(vf a, vf b) { return vsel(a > b, a, b); }

/* Horizontal sum / max by halving (shuffles stay within the vector: no spills on narrow ISAs). */
static const vi H8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
static const vi H4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
static const vi H2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
static const vi H1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};

AI float hsum(vf x) {
    x += __builtin_shuffle(x, H8);
    x += __builtin_shuffle(x, H4);
    x += __builtin_shuffle(x, H2);
    x += __builtin_shuffle(x, H1);
    return x[0];
}

AI float hmax(vf x) {
    x = vmax(x, __builtin_shuffle(x, H8));
    x = vmax(x, __builtin_shuffle(x, H4));
    x = vmax(x, __builtin_shuffle(x, H2));
    x = vmax(x, __builtin_shuffle(x, H1));
    return x[0];
}

/* exp(x) for a vector, Cephes-style: x = n*ln2 + r, |r| <= ln2/2, degree-6 polynomial in r.
 * About 1 ulp; exactly 0 below -87.3 (so masked -inf logits give p = 0). */
AI vf vexp(vf x) {
    const vf hi = splat(88.3762626647949f), lo = splat(-87.3365447504f);
    vi under = x < lo;
    x = vsel(x > hi, hi, x);
    x = vsel(under, lo, x);
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf t = x * splat(1.44269504088896341f) + magic;
    vf n = t - magic;
    vi ni = (vi)t - (vi)magic;
    vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    vf pol = splat(1.9875691500e-4f);
    pol = pol * r + splat(1.3981999507e-3f);
    pol = pol * r + splat(8.3334519073e-3f);
    pol = pol * r + splat(4.1665795894e-2f);
    pol = pol * r + splat(1.6666665459e-1f);
    pol = pol * r + splat(5.0000001201e-1f);
    pol = pol * r * r + r + splat(1.0f);
    vi bits = (ni + 127) << 23;
    vf res = pol * (vf)bits;
    return (vf)((vi)res & ~under);
}

/* Sum each of 16 vectors: lane t of the result is the sum of a[BITREV[t]] (the tree below
 * leaves the tokens in bit-reversed lane order, so callers feed them bit-reversed). */
static const int BITREV16[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

AI vf comb(vf x, vf y, vi ia, vi ib) { return __builtin_shuffle(x, y, ia) + __builtin_shuffle(x, y, ib); }

AI vf reduce16(const vf *a) {
    const vi L1a = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi L1b = L1a + 8;
    const vi L2a = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const vi L2b = L2a + 4;
    const vi L3a = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const vi L3b = L3a + 2;
    const vi L4a = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    const vi L4b = L4a + 1;
    vf b[8], c[4], e[2];
    for (int i = 0; i < 8; i++) b[i] = comb(a[2 * i], a[2 * i + 1], L1a, L1b);
    for (int i = 0; i < 4; i++) c[i] = comb(b[2 * i], b[2 * i + 1], L2a, L2b);
    for (int i = 0; i < 2; i++) e[i] = comb(c[2 * i], c[2 * i + 1], L3a, L3b);
    return comb(e[0], e[1], L4a, L4b);
}

/* Scores of 16 fp32 key rows kb[0..16) (stride dp) against one fp32 query qv. DP is a
 * compile-time constant at the hot call sites (64, 128) so the loops unroll. */
AI vf dots16_f32_dp(const float *qv, const float *kb, int dp, int DP) {
#if WIDE
    /* 16 accumulators fit the 32 zmm registers: reduce them together by a transpose tree. */
    vf a[16];
    for (int t = 0; t < 16; t++) {
        const float *kr = kb + (int64_t)BITREV16[t] * dp;
        vf s0 = splat(0.0f), s1 = splat(0.0f);
        int c = 0;
        for (; c + 32 <= DP; c += 32) {
            s0 += *(const vf *)(qv + c) * *(const vf *)(kr + c);
            s1 += *(const vf *)(qv + c + 16) * *(const vf *)(kr + c + 16);
        }
        if (c < DP) s0 += *(const vf *)(qv + c) * *(const vf *)(kr + c);
        a[t] = s0 + s1;
    }
    return reduce16(a);
#else
    /* Narrow registers: one accumulator at a time, reduced by halving. */
    vf res = splat(0.0f);
    for (int t = 0; t < 16; t++) {
        const float *kr = kb + (int64_t)t * dp;
        vf s0 = splat(0.0f);
        for (int c = 0; c < DP; c += 16) s0 += *(const vf *)(qv + c) * *(const vf *)(kr + c);
        res[t] = hsum(s0);
    }
    return res;
#endif
}

AI vf dots16_f32(const float *qv, const float *kb, int dp) {
    if (dp == 128) return dots16_f32_dp(qv, kb, dp, 128);
    if (dp == 64) return dots16_f32_dp(qv, kb, dp, 64);
    return dots16_f32_dp(qv, kb, dp, dp);
}

#if USE_DPBF16
#include <immintrin.h>
/* Scores of 16 bf16 pool rows (pointers) against one bf16 query (d a multiple of 32): the
 * products of bf16 numbers are exact in fp32 and accumulate in fp32 (vdpbf16ps). */
AI vf dots16_bf16_d(const uint16_t *qb, const uint16_t *const *kr, int D) {
    vf a[16];
    for (int t = 0; t < 16; t++) {
        const uint16_t *k = kr[BITREV16[t]];
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        int c = 0;
        for (; c + 64 <= D; c += 64) {
            s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(qb + c), (__m512bh)_mm512_loadu_si512(k + c));
            s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(qb + c + 32),
                                  (__m512bh)_mm512_loadu_si512(k + c + 32));
        }
        if (c < D)
            s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(qb + c), (__m512bh)_mm512_loadu_si512(k + c));
        a[t] = (vf)_mm512_add_ps(s0, s1);
    }
    return reduce16(a);
}

AI vf dots16_bf16(const uint16_t *qb, const uint16_t *const *kr, int d) {
    if (d == 128) return dots16_bf16_d(qb, kr, 128);
    if (d == 64) return dots16_bf16_d(qb, kr, 64);
    return dots16_bf16_d(qb, kr, d);
}
#endif

/* acc[0..DPV) += sum_j p[j] * vb[j], for one query; DPV constant so acc stays in registers. */
AI void pv_fixed(float *acc, const float *p, const float *vb, int n, int dp, int DPV) {
    vf a[8];
    for (int c = 0; c < DPV; c++) a[c] = *(vf *)(acc + 16 * c);
    for (int j = 0; j < n; j++) {
        vf pj = splat(p[j]);
        const float *vr = vb + (int64_t)j * dp;
        for (int c = 0; c < DPV; c++) a[c] += pj * *(const vf *)(vr + 16 * c);
    }
    for (int c = 0; c < DPV; c++) *(vf *)(acc + 16 * c) = a[c];
}

AI void pv(float *acc, const float *p, const float *vb, int n, int dp) {
    int dpv = dp / 16;
#if WIDE
    if (dpv == 8) {
        pv_fixed(acc, p, vb, n, dp, 8);
        return;
    }
    if (dpv == 4) {
        pv_fixed(acc, p, vb, n, dp, 4);
        return;
    }
#endif
    /* PVB accumulator vectors at a time: as many as the registers hold. */
    for (int c0 = 0; c0 < dpv; c0 += PVB) {
        int w = dpv - c0 < PVB ? dpv - c0 : PVB;
        if (w == 4) pv_fixed(acc + 16 * c0, p, vb + 16 * c0, n, dp, 4);
        else if (w == 3) pv_fixed(acc + 16 * c0, p, vb + 16 * c0, n, dp, 3);
        else if (w == 2) pv_fixed(acc + 16 * c0, p, vb + 16 * c0, n, dp, 2);
        else pv_fixed(acc + 16 * c0, p, vb + 16 * c0, n, dp, 1);
    }
}

#if USE_DPBF16
/* acc[0..NV) += sum over token pairs t of (p[2t], p[2t+1]) . (V[2t][c], V[2t+1][c]): vdpbf16ps on
 * pair-interleaved V rows (vp[t]: NV vectors, UNPACK column order) and bf16-rounded weights. */
AI void pv_bf16_fixed(float *acc, const uint32_t *pp, const __m512i *vp, int npairs, int NV) {
    __m512 a[8];
    for (int c = 0; c < NV; c++) a[c] = _mm512_load_ps(acc + 16 * c);
    for (int t = 0; t < npairs; t++) {
        __m512bh w = (__m512bh)_mm512_set1_epi32((int)pp[t]);
        for (int c = 0; c < NV; c++) a[c] = _mm512_dpbf16_ps(a[c], (__m512bh)vp[(int64_t)t * NV + c], w);
    }
    for (int c = 0; c < NV; c++) _mm512_store_ps(acc + 16 * c, a[c]);
}

AI void pv_bf16(float *acc, const float *p, const __m512i *vp, int n, int dp) {
    uint32_t pp[TKG_CHUNK / 2];
    /* Round the 32 weights to bf16 pairs: element 2t (low half) is token 2t. */
    _mm512_storeu_si512(pp, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p)));
    int npairs = (n + 1) / 2, nv = dp / 16;
    if (nv == 8) pv_bf16_fixed(acc, pp, vp, npairs, 8);
    else if (nv == 4) pv_bf16_fixed(acc, pp, vp, npairs, 4);
    else if (nv == 2) pv_bf16_fixed(acc, pp, vp, npairs, 2);
    else
        for (int c0 = 0; c0 < nv; c0 += 2) {
            /* Wider heads: two accumulator vectors at a time over a strided view. */
            for (int t = 0; t < npairs; t++) {
                __m512bh w = (__m512bh)_mm512_set1_epi32((int)pp[t]);
                for (int c = c0; c < c0 + 2; c++) {
                    __m512 x = _mm512_load_ps(acc + 16 * c);
                    _mm512_store_ps(acc + 16 * c, _mm512_dpbf16_ps(x, (__m512bh)vp[(int64_t)t * nv + c], w));
                }
            }
        }
}

/* Pair-interleave bf16 V rows (r0, r1) of d elements (a multiple of 32) into vp: per 32 columns,
 * unpacklo then unpackhi (UNPACK order). */
AI void v_pair(__m512i *vp, const uint16_t *r0, const uint16_t *r1, int d) {
    for (int c = 0; c < d; c += 32) {
        __m512i x = _mm512_loadu_si512(r0 + c), y = _mm512_loadu_si512(r1 + c);
        vp[c / 16] = _mm512_unpacklo_epi16(x, y);
        vp[c / 16 + 1] = _mm512_unpackhi_epi16(x, y);
    }
}
#endif

/* Fold one chunk of scores s[nq][TKG_CHUNK] (entries past n are -inf) into the running state:
 * values from fp32 rows vb, or (vpairs != NULL) bf16 pair-interleaved rows. */
AI void softmax_update(tkg_partial part, float *s, const float *vb, const void *vpairs, int n, int nq, int dp) {
    (void)vpairs;
    for (int r = 0; r < nq; r++) {
        float *sr = s + r * TKG_CHUNK;
        vf mx = vmax(*(vf *)sr, *(vf *)(sr + 16));
        float cm = hmax(mx);
        if (cm == -INFINITY) continue; /* nothing visible in this chunk for this query */
        float m_old = part.m[r];
        float m_new = cm > m_old ? cm : m_old;
        float *acc = part.acc + (int64_t)r * dp;
        if (m_new != m_old) {
            float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
            part.l[r] *= alpha;
            vf va = splat(alpha);
            for (int c = 0; c < dp; c += 16) *(vf *)(acc + c) *= va;
            part.m[r] = m_new;
        }
        vf mv = splat(m_new);
        vf p0 = vexp(*(vf *)sr - mv), p1 = vexp(*(vf *)(sr + 16) - mv);
        *(vf *)sr = p0;
        *(vf *)(sr + 16) = p1;
        part.l[r] += hsum(p0 + p1);
#if USE_DPBF16
        if (vpairs) {
            pv_bf16(acc, sr, (const __m512i *)vpairs, n, dp);
            continue;
        }
#endif
        pv(acc, sr, vb, n, dp);
    }
}

#if USE_DPBF16
/* ---- The bf16 product fast path (d = 64 or 128, bf16 pools, or fp8 pools decoded per chunk) ----
 * Per chunk of 32 keys: the visibility of every query as a bit mask; the scores of each query
 * against 16 keys at a time (one vdpbf16ps chain per key, reduced by a transpose tree); the
 * softmax weights of all queries rounded to bf16 pairs; then P.V for up to 4 queries per pass
 * with their accumulators in registers, each V row pair interleaved in registers once per pass
 * (no pair buffer, no per-query reload of V). Rows no query sees read a zero row (unwritten
 * cache rows may hold NaN, and 0 * NaN is NaN). */

/* Bits [a, b) of a 32-bit mask, a and b clipped to [0, 32]. */
AI uint32_t bit_range(int a, int b) {
    a = a < 0 ? 0 : a > 32 ? 32 : a;
    b = b < 0 ? 0 : b > 32 ? 32 : b;
    if (a >= b) return 0;
    uint32_t hi = b == 32 ? 0xffffffffu : (1u << b) - 1u;
    return hi & ~((1u << a) - 1u);
}

/* Queries r0..r0+3 of qb ([nq][dp] bf16) packed for fast_dots16x4: vector c holds, in its 128-bit
 * lane i, the 8 elements 8c..8c+7 of query r0+i (zeros past nq) as 4 bf16 pairs. */
AI void pack_q4(uint32_t *dst, const uint16_t *qb, int dp, int r0, int nq, int D) {
    for (int c = 0; c < D / 8; c++)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) {
                const uint16_t *q = qb + (int64_t)(r0 + i) * dp + 8 * c + 2 * j;
                dst[16 * c + 4 * i + j] = r0 + i < nq ? (uint32_t)q[0] | (uint32_t)q[1] << 16 : 0u;
            }
}

/* Scores of 4 packed queries (pack_q4) against 16 rows kr[16]: out[i] = the 16 scores of query i.
 * Each key row is broadcast 8 elements at a time to the four 128-bit lanes, so one vdpbf16ps
 * serves the 4 queries, and a key's 4 partial sums per query fold by in-lane shuffles. */
AI void fast_dots16x4(__m512 out[4], const uint32_t *qp, const uint16_t *const *kr, int D) {
    __m512bh q[16];
    for (int c = 0; c < D / 8; c++) q[c] = (__m512bh)_mm512_load_si512(qp + 16 * c);
    __m512 cs[4];
    for (int t = 0; t < 16; t += 4) {
        __m512 a[4];
        for (int u = 0; u < 4; u++) a[u] = _mm512_setzero_ps();
        for (int c = 0; c < D / 8; c++)
            for (int u = 0; u < 4; u++)
                a[u] = _mm512_dpbf16_ps(a[u], q[c],
                                        (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(kr[t + u] + 8 * c))));
        /* per lane i: [a0+a1, a2+a3] of keys t, t+1, then the 4 sums of keys t..t+3 */
        __m512 b01 = _mm512_add_ps(_mm512_shuffle_ps(a[0], a[1], 0x88), _mm512_shuffle_ps(a[0], a[1], 0xDD));
        __m512 b23 = _mm512_add_ps(_mm512_shuffle_ps(a[2], a[3], 0x88), _mm512_shuffle_ps(a[2], a[3], 0xDD));
        cs[t / 4] = _mm512_add_ps(_mm512_shuffle_ps(b01, b23, 0x88), _mm512_shuffle_ps(b01, b23, 0xDD));
    }
    /* cs[k] lane i = keys 4k..4k+3 of query i: transpose the 4x4 blocks of 128 bits */
    __m512 t0 = _mm512_shuffle_f32x4(cs[0], cs[1], 0x44), t1 = _mm512_shuffle_f32x4(cs[0], cs[1], 0xEE);
    __m512 t2 = _mm512_shuffle_f32x4(cs[2], cs[3], 0x44), t3 = _mm512_shuffle_f32x4(cs[2], cs[3], 0xEE);
    out[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
    out[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
    out[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
    out[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

/* acc of QG queries (rows r0.., UNPACK column order) += their bf16 weight pairs pp[r][t] times the
 * pair-interleaved V rows (vr[2t], vr[2t+1]), for the 64 columns starting at col; alpha[r]
 * rescales the accumulators first (a new running max). */
/* Rows of the next chunk to prefetch while P.V runs: K and V row offsets rows[0..n). */
typedef struct {
    const char *kbase, *vbase;
    const int64_t *rows;
    int n, row_bytes;
} pf_t;

AI void prefetch_rows(const char *kbase, const char *vbase, const int64_t *rows, int from, int to, int row_bytes) {
    for (int j = from; j < to; j++)
        for (int b = 0; b < row_bytes; b += 64) {
            __builtin_prefetch(kbase + rows[j] + b, 0, 3);
            __builtin_prefetch(vbase + rows[j] + b, 0, 3);
        }
}

/* The trickle of pf's rows: rows 2t and 2t + 1 (those below pf.n), one pair per V pair consumed. */
AI void prefetch_pair(pf_t pf, int t) {
    if (2 * t < pf.n) prefetch_rows(pf.kbase, pf.vbase, pf.rows, 2 * t, 2 * t + 2 < pf.n ? 2 * t + 2 : pf.n, pf.row_bytes);
}

/* Prefetch the K and V rows of keys [a, b) into L2 (block by block: a block's rows are contiguous). */
AI void prefetch_keys(const char *kbase, const char *vbase, const int32_t *tab, int64_t block_bytes, int bl,
                      int row_bytes, int a, int b) {
    while (a < b) {
        int blk = a / bl, end = (blk + 1) * bl < b ? (blk + 1) * bl : b;
        int64_t at = (int64_t)tab[blk] * block_bytes + (int64_t)(a % bl) * row_bytes;
        int64_t len = (int64_t)(end - a) * row_bytes;
        for (int64_t x = 0; x < len; x += 64) {
            __builtin_prefetch(kbase + at + x, 0, 1);
            __builtin_prefetch(vbase + at + x, 0, 1);
        }
        a = end;
    }
}

AI void fast_pv64(float *acc, int dp, const uint32_t *pp, const float *alpha, const uint16_t *const *vr, int npairs,
                  int col, int QG, pf_t pf) {
    __m512 a[4][4];
    for (int r = 0; r < QG; r++)
        for (int c = 0; c < 4; c++)
            a[r][c] = _mm512_mul_ps(_mm512_load_ps(acc + (int64_t)r * dp + col + 16 * c), _mm512_set1_ps(alpha[r]));
    for (int t = 0; t < npairs; t++) {
        prefetch_pair(pf, t);
        const uint16_t *x = vr[2 * t] + col, *y = vr[2 * t + 1] + col;
        __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 32);
        __m512i y0 = _mm512_loadu_si512(y), y1 = _mm512_loadu_si512(y + 32);
        __m512bh v[4] = {(__m512bh)_mm512_unpacklo_epi16(x0, y0), (__m512bh)_mm512_unpackhi_epi16(x0, y0),
                         (__m512bh)_mm512_unpacklo_epi16(x1, y1), (__m512bh)_mm512_unpackhi_epi16(x1, y1)};
        for (int r = 0; r < QG; r++) {
            __m512bh w = (__m512bh)_mm512_set1_epi32((int)pp[r * (TKG_CHUNK) + t]);
            for (int c = 0; c < 4; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], v[c], w);
        }
    }
    for (int r = 0; r < QG; r++)
        for (int c = 0; c < 4; c++) _mm512_store_ps(acc + (int64_t)r * dp + col + 16 * c, a[r][c]);
}

/* Walks an item's keys block by block, yielding each key's byte offset in the pools (no division
 * per key). */
typedef struct {
    const int32_t *tab;
    int64_t block_bytes, row_bytes;
    int bl, blk, off;
} key_walk;

AI key_walk walk_from(const tkg_problem *p, const int32_t *tab, int key, int row_bytes) {
    key_walk w = {tab, p->block_stride * (row_bytes / p->d), row_bytes, p->bl, key / p->bl, key % p->bl};
    return w;
}

AI void walk_rows(key_walk *w, int64_t *dst, int count) {
    for (int j = 0; j < count; j++) {
        dst[j] = (int64_t)w->tab[w->blk] * w->block_bytes + (int64_t)w->off * w->row_bytes;
        if (++w->off == w->bl) {
            w->off = 0;
            w->blk++;
        }
    }
}

/* Two distances: the chunk PF_FAR ahead into L2 (prefetcht2; an L1 prefetch holds one of the
 * core's few L1 miss buffers for a whole DRAM latency, which capped one core near 12 GB/s), and
 * the next chunk into L1 while the current one is computed (the callers). +10-30% from DRAM,
 * measured A/B against the next-chunk prefetch alone (1 and 2 threads). */
AI void prefetch_far(const tkg_problem *p, const char *kbase, const char *vbase, const int32_t *tab, int row_bytes,
                     int c0, int klo, int khi) {
    enum { PF_FAR = 4, CH = TKG_CHUNK };
    int fa = c0 == klo ? c0 + CH : c0 + PF_FAR * CH; /* the first chunk: all up to the far one */
    int fb = c0 + (PF_FAR + 1) * CH < khi ? c0 + (PF_FAR + 1) * CH : khi;
    prefetch_keys(kbase, vbase, tab, p->block_stride * (row_bytes / p->d), p->bl, row_bytes, fa, fb);
}

/* The chunks of an item's keys [klo, khi): for chunk c0, n keys at byte offsets cur, and the next
 * chunk's nn keys at nxt (walked ahead so that they can be prefetched). */
typedef struct {
    key_walk walk;
    int klo, khi, c0, n, nn;
    int64_t cur[TKG_CHUNK], nxt[TKG_CHUNK];
} key_chunks;

AI void chunks_begin(key_chunks *it, const tkg_problem *p, const int32_t *tab, int klo, int khi, int row_bytes) {
    it->walk = walk_from(p, tab, klo, row_bytes);
    it->klo = klo;
    it->khi = khi;
    it->c0 = klo;
    if (klo < khi) walk_rows(&it->walk, it->cur, khi - klo < TKG_CHUNK ? khi - klo : TKG_CHUNK);
}

/* Enters chunk c0: its sizes, the next chunk's offsets, and the far prefetch. */
AI void chunk_enter(key_chunks *it, const tkg_problem *p, const char *kbase, const char *vbase, const int32_t *tab,
                    int row_bytes) {
    enum { CH = TKG_CHUNK };
    it->n = it->khi - it->c0 < CH ? it->khi - it->c0 : CH;
    it->nn = it->khi - (it->c0 + CH) < CH ? it->khi - (it->c0 + CH) : CH;
    if (it->nn > 0) walk_rows(&it->walk, it->nxt, it->nn);
    prefetch_far(p, kbase, vbase, tab, row_bytes, it->c0, it->klo, it->khi);
}

AI void chunk_leave(key_chunks *it) {
    memcpy(it->cur, it->nxt, sizeof(it->cur));
    it->c0 += TKG_CHUNK;
}

/* vis[r]: the keys of chunk [c0, c0 + n) query r sees, as bits; returns their union. */
AI uint32_t chunk_visibility(const int32_t *rg, int nq, int c0, int n, uint32_t *vis) {
    uint32_t seen = 0;
    for (int r = 0; r < nq; r++) {
        const int32_t *g = rg + 4 * r;
        uint32_t m = bit_range(g[0] - c0, g[1] - c0) | bit_range(g[2] - c0, g[3] - c0);
        m &= n == 32 ? 0xffffffffu : (1u << n) - 1u;
        vis[r] = m;
        seen |= m;
    }
    return seen;
}

/* Scaled scores of one query: x[g] holds keys 16g..16g+15 of the chunk (ng groups hold keys);
 * keys the query does not see score -inf. */
AI void store_scores(float *sr, const __m512 x[2], int ng, uint32_t vis, float scale) {
    for (int g = 0; g < 2; g++) {
        __mmask16 mk = (__mmask16)(vis >> (16 * g));
        __m512 y = g < ng ? _mm512_mul_ps(x[g], _mm512_set1_ps(scale)) : _mm512_setzero_ps();
        _mm512_store_ps(sr + 16 * g, _mm512_mask_blend_ps(mk, _mm512_set1_ps(-INFINITY), y));
    }
}

/* The online softmax step of a chunk: each query's 32 scores in s become its bf16 weights (in
 * place, 64 bytes: the P rows of the P.V product), m and l move to the new running max, and
 * alpha[r] is the factor its accumulator must be rescaled by first. */
AI void chunk_softmax(tkg_partial part, float *s, const uint32_t *vis, int nq, float *alpha) {
    enum { CH = TKG_CHUNK };
    for (int r = 0; r < nq; r++) {
        float *sr = s + r * CH;
        alpha[r] = 1.0f;
        vf s0 = *(vf *)sr, s1 = *(vf *)(sr + 16);
        float cm = vis[r] ? hmax(vmax(s0, s1)) : -INFINITY;
        if (cm == -INFINITY) { /* nothing visible: zero weights */
            memset(sr, 0, sizeof(float) * CH / 2);
            continue;
        }
        float m_old = part.m[r];
        if (cm > m_old) {
            alpha[r] = m_old == -INFINITY ? 0.0f : expf(m_old - cm);
            part.m[r] = cm;
            part.l[r] *= alpha[r];
        }
        vf mv = splat(part.m[r]);
        vf p0 = vexp(s0 - mv), p1 = vexp(s1 - mv);
        part.l[r] += hsum(p0 + p1);
        _mm512_store_si512(sr, (__m512i)_mm512_cvtne2ps_pbh((__m512)p1, (__m512)p0));
    }
}

/* The chunk loop of an item over keys [klo, khi) on the fast path (see above). qb: [nq][dp] bf16
 * queries; rg: [nq][4] visible ranges; s: [nq][TKG_CHUNK] scratch; dec: 2 * TKG_CHUNK * D bf16
 * (fp8 pools: the chunk's decoded K rows, then V rows). */
AI void fast_range(const tkg_problem *p, tkg_partial part, const int32_t *rg, const uint16_t *qb, int nq, int klo,
                   int khi, const char *kbase, const char *vbase, const int32_t *tab, float *s, uint16_t *dec, int D,
                   int FP8) {
    enum { CH = TKG_CHUNK };
    uint32_t *qp = (uint32_t *)(qb + (int64_t)nq * D);
    for (int r0 = 0; r0 < nq; r0 += 4) pack_q4(qp + (int64_t)r0 * D / 2, qb, D, r0, nq, D);
    static const uint16_t zero_row[TKG_MAX_D] __attribute__((aligned(64))) = {0};
    const int dp = D, fp8 = FP8, row_bytes = D * (fp8 ? 1 : 2);
    key_chunks it;
    for (chunks_begin(&it, p, tab, klo, khi, row_bytes); it.c0 < khi; chunk_leave(&it)) {
        chunk_enter(&it, p, kbase, vbase, tab, row_bytes);
        const int c0 = it.c0, n = it.n, nn = it.nn;
        const int64_t *cur = it.cur, *nxt = it.nxt;
        /* The next chunk's rows are prefetched a row pair per V pair of the first P.V pass (a
         * steady trickle: a burst of a whole chunk stalls on the miss buffers), the rest after. */
        int pf_done = 0;
        uint32_t vis[4 * 64];
        const uint32_t seen = chunk_visibility(rg, nq, c0, n, vis);
        if (seen) {
            const uint16_t *kr[CH], *vr[CH];
            for (int j = 0; j < CH; j++) {
                int on = j < n && (seen >> j & 1u);
                if (fp8) {
                    if (on) {
                        fp8_to_bf16(p, dec + (int64_t)j * D, (const uint8_t *)(kbase + cur[j]), D);
                        fp8_to_bf16(p, dec + (int64_t)(CH + j) * D, (const uint8_t *)(vbase + cur[j]), D);
                    }
                    kr[j] = on ? dec + (int64_t)j * D : zero_row;
                    vr[j] = on ? dec + (int64_t)(CH + j) * D : zero_row;
                } else {
                    kr[j] = on ? (const uint16_t *)(kbase + cur[j]) : zero_row;
                    vr[j] = on ? (const uint16_t *)(vbase + cur[j]) : zero_row;
                }
            }
            const int ng = (n + 15) / 16;
            for (int r0 = 0; r0 < nq; r0 += 4) {
                const int qg = nq - r0 < 4 ? nq - r0 : 4;
                __m512 x[2][4];
                for (int g = 0; g < ng; g++) fast_dots16x4(x[g], qp + (int64_t)r0 * D / 2, kr + 16 * g, D);
                for (int i = 0; i < qg; i++) {
                    __m512 xi[2] = {x[0][i], ng > 1 ? x[1][i] : _mm512_setzero_ps()};
                    store_scores(s + (r0 + i) * CH, xi, ng, vis[r0 + i], p->score_scale);
                }
            }
            float alpha[4 * 64];
            chunk_softmax(part, s, vis, nq, alpha);
            const int npairs = (n + 1) / 2;
            for (int r0 = 0; r0 < nq; r0 += 4) {
                const int qg = nq - r0 < 4 ? nq - r0 : 4;
                float *acc = part.acc + (int64_t)r0 * dp;
                const uint32_t *pp = (const uint32_t *)(s + r0 * CH);
                for (int col = 0; col < D; col += 64) {
                    pf_t pf = {kbase, vbase, nxt, r0 == 0 && col == 0 ? nn : 0, row_bytes};
                    if (qg == 4) fast_pv64(acc, dp, pp, alpha + r0, vr, npairs, col, 4, pf);
                    else if (qg == 3) fast_pv64(acc, dp, pp, alpha + r0, vr, npairs, col, 3, pf);
                    else if (qg == 2) fast_pv64(acc, dp, pp, alpha + r0, vr, npairs, col, 2, pf);
                    else fast_pv64(acc, dp, pp, alpha + r0, vr, npairs, col, 1, pf);
                }
                if (r0 == 0) pf_done = 2 * npairs < nn ? 2 * npairs : nn;
            }
        }
        prefetch_rows(kbase, vbase, nxt, pf_done, nn, row_bytes);
    }
}

#if USE_AMX
/* ---- The AMX path (AMX-BF16; the fast path's conditions, and nq <= 16 or a multiple of 16) ----
 * Why: on the cores this was built on one vdpbf16ps (32 multiply-adds) issues about every 0.95
 * ns, which held the AVX-512 path near 4.7 G K/V elements/s per core for bf16 and fp8 alike
 * (fp8 halves the bytes, not the products). One tdpbf16ps does up to 16 x 16 x 32 of them:
 * measured 5.2 ns for M=16 keys x N=4 queries x K=32 and 2.9 ns for M=4 queries x N=16 columns
 * x K=32, against 0.95 ns per vdpbf16ps (tiles 20-30x the multiply-adds per second).
 * Per chunk of 32 keys and group of up to 16 queries:
 *   scores  C[16 keys][nqg] += K[16 keys][32 d] . Q^T[32 d][nqg], D/32 steps per 16 keys: K rows
 *           load straight from the pool (16 contiguous rows of a block) or from a gathered copy;
 *           Q^T is pair-interleaved once per item. The 16 x nqg result is transposed into s by
 *           gathers, then masked and scaled as on the fast path.
 *   softmax as on the fast path (chunk_softmax): bf16 weights in s, rows of 64 bytes.
 *   P.V     acc[nqg][16 cols] += P[nqg][32 keys] . V[32 keys][16 cols], D/16 tiles: V's key pairs
 *           interleaved into a scratch (the UNPACK column order of the accumulators), and acc
 *           loaded into a tile and stored back (rescaled by alpha first when the max moved).
 * Tiles: 0, 1 scores of key groups 0 and 1; 2, 5 K of groups 0 and 1 (5 then holds V); 3 Q^T;
 * 4 P; 6, 7 accumulators (two, so that one tile's store overlaps the other's product).
 * A tile load waits for every earlier store to its lines to reach the cache (no forwarding): the
 * scratch a chunk writes (decoded K rows, V pairs, weights, accumulators) costs stalls. The V pairs
 * are built while the score tiles compute; deeper reordering measured slower (docs/kernel.md). */
typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

AI void amx_configure(int nqg) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const uint8_t rows[8] = {16, 16, 16, 16, (uint8_t)nqg, 16, (uint8_t)nqg, (uint8_t)nqg};
    const uint16_t cols[8] = {(uint16_t)(4 * nqg), (uint16_t)(4 * nqg), 64, (uint16_t)(4 * nqg), 64, 64, 64, 64};
    for (int t = 0; t < 8; t++) {
        c.rows[t] = rows[t];
        c.colsb[t] = cols[t];
    }
    _tile_loadconfig(&c);
}

/* Q^T of queries r0..r0+nqg-1 for the score tiles: qt[c][i][q] = (q[32c + 2i], q[32c + 2i + 1])
 * of query r0 + q, as one 32-bit pair (c < D/32, i < 16). */
AI void amx_pack_qt(uint32_t *qt, const uint16_t *qb, int D, int r0, int nqg) {
    for (int c = 0; c < D / 32; c++)
        for (int i = 0; i < 16; i++)
            for (int q = 0; q < nqg; q++) {
                const uint16_t *x = qb + (int64_t)(r0 + q) * D + 32 * c + 2 * i;
                qt[(c * 16 + i) * nqg + q] = (uint32_t)x[0] | (uint32_t)x[1] << 16;
            }
}

/* The 16 K rows of key group g as one tile source: straight from the pool when they are
 * contiguous (a block's rows), else copied into kg ([16][D] bf16; rows past n read zeros).
 * Returns the rows' base; *stride gets their distance in bytes. */
AI const uint16_t *amx_key_rows(const uint16_t *const *kr, int g, int n, int D, uint16_t *kg, int *stride) {
    const uint16_t *r0 = kr[16 * g];
    int contiguous = 16 * g + 16 <= n;
    for (int t = 1; t < 16 && contiguous; t++) contiguous = kr[16 * g + t] == r0 + (int64_t)t * D;
    *stride = 2 * D;
    if (contiguous) return r0;
    for (int t = 0; t < 16; t++) memcpy(kg + (int64_t)t * D, kr[16 * g + t], 2 * (size_t)D);
    return kg;
}

/* Pair t of V's key pairs, columns 32cb..32cb+31 (a: the pair's first row, b: its second), into vp
 * ([D/16][16 pairs][32] bf16: tile j holds accumulator columns 16j..16j+15 in the UNPACK order). */
AI void amx_store_pair(uint16_t *vp, int t, int cb, __m512i a, __m512i b) {
    _mm512_store_si512(vp + ((int64_t)(2 * cb) * 16 + t) * 32, _mm512_unpacklo_epi16(a, b));
    _mm512_store_si512(vp + ((int64_t)(2 * cb + 1) * 16 + t) * 32, _mm512_unpackhi_epi16(a, b));
}

/* V's 16 key pairs of the chunk, pair-interleaved into vp (amx_store_pair). vr[j]: row j (a zero
 * row when unseen). */
AI void amx_v_pairs(uint16_t *vp, const uint16_t *const *vr, int D, pf_t pf) {
    for (int t = 0; t < 16; t++) {
        prefetch_pair(pf, t);
        const uint16_t *x = vr[2 * t], *y = vr[2 * t + 1];
        for (int cb = 0; cb < D / 32; cb++)
            amx_store_pair(vp, t, cb, _mm512_loadu_si512(x + 32 * cb), _mm512_loadu_si512(y + 32 * cb));
    }
}

/* amx_v_pairs for fp8 pools: each V row pair decoded straight into its interleaved words, with
 * no bf16 copy of the rows in between. Rows past n or unseen (bit j of seen clear) read zeros. */
AI void amx_v_pairs_fp8(uint16_t *vp, const char *vbase, const int64_t *rows, int n, uint32_t seen, int D, pf_t pf) {
    const fp8_tables tb = fp8_load_tables();
    for (int t = 0; t < 16; t++) {
        prefetch_pair(pf, t);
        __m512i w[2][TKG_MAX_D / 32];
        for (int u = 0; u < 2; u++) {
            const int j = 2 * t + u;
            const int on = j < n && (seen >> j & 1u);
            for (int c = 0; c < D; c += 64) {
                if (on) fp8x64_to_bf16(&tb, vbase + rows[j] + c, &w[u][c / 32]);
                else w[u][c / 32] = w[u][c / 32 + 1] = _mm512_setzero_si512();
            }
        }
        for (int cb = 0; cb < D / 32; cb++) amx_store_pair(vp, t, cb, w[0][cb], w[1][cb]);
    }
}

/* The first n K rows of a chunk (fp8; D a multiple of 64) decoded into dst ([n][D] bf16), the
 * tables loaded once. */
AI void amx_k_rows_fp8(uint16_t *dst, const char *kbase, const int64_t *rows, int n, int D) {
    const fp8_tables tb = fp8_load_tables();
    for (int j = 0; j < n; j++) fp8_row_to_bf16_tables(&tb, dst + (int64_t)j * D, (const uint8_t *)(kbase + rows[j]), D);
}

/* Scores of queries r0..r0+nqg-1 against the chunk's ng key groups, in two halves so that other
 * work runs while the tiles compute: amx_scores_issue starts the products (tiles 0 and 1),
 * amx_scores_finish stores them and moves them into s (scaled, masked). */
AI void amx_scores_issue(const uint32_t *qt, const uint16_t *const *kr, int n, int ng, int D, int nqg, uint16_t *kg) {
    int st0, st1 = 0;
    const uint16_t *k0 = amx_key_rows(kr, 0, n, D, kg, &st0);
    const uint16_t *k1 = ng > 1 ? amx_key_rows(kr, 1, n, D, kg + 16 * D, &st1) : NULL;
    _tile_zero(0);
    _tile_zero(1);
    for (int c = 0; c < D / 32; c++) {
        _tile_loadd(3, qt + (int64_t)c * 16 * nqg, 4 * nqg);
        _tile_loadd(2, k0 + 32 * c, st0);
        _tile_dpbf16ps(0, 2, 3);
        if (k1) {
            _tile_loadd(5, k1 + 32 * c, st1);
            _tile_dpbf16ps(1, 5, 3);
        }
    }
}

AI void amx_scores_finish(const tkg_problem *p, float *s, const uint32_t *vis, int ng, int r0, int nqg, float *sc) {
    enum { CH = TKG_CHUNK };
    _tile_stored(0, sc, 64);
    if (ng > 1) _tile_stored(1, sc + 256, 64);
    /* sc[16g + key][q] (rows of 16 floats) to s[q][key]: column q of each group by a gather. */
    const __m512i rows = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    for (int q = 0; q < nqg; q++) {
        __m512 x[2];
        x[0] = _mm512_i32gather_ps(rows, sc + q, 4);
        x[1] = ng > 1 ? _mm512_i32gather_ps(rows, sc + 256 + q, 4) : _mm512_setzero_ps();
        store_scores(s + (r0 + q) * CH, x, ng, vis[r0 + q], p->score_scale);
    }
}

/* acc rows r0..r0+nqg-1 (row stride dp floats) rescaled by alpha, then += P . V over the chunk. */
AI void amx_pv(float *acc, int dp, const float *s, const float *alpha, const uint16_t *vp, int D, int r0, int nqg) {
    enum { CH = TKG_CHUNK };
    for (int q = 0; q < nqg; q++)
        if (alpha[r0 + q] != 1.0f) {
            float *a = acc + (int64_t)(r0 + q) * dp;
            const __m512 f = _mm512_set1_ps(alpha[r0 + q]);
            for (int c = 0; c < D; c += 16) _mm512_store_ps(a + c, _mm512_mul_ps(_mm512_load_ps(a + c), f));
        }
    _tile_loadd(4, s + r0 * CH, CH * 4);
    for (int j = 0; j < D / 16; j += 2) {
        float *a = acc + (int64_t)r0 * dp + 16 * j;
        _tile_loadd(6, a, dp * 4);
        _tile_loadd(5, vp + (int64_t)j * 16 * 32, 64);
        _tile_dpbf16ps(6, 4, 5);
        _tile_loadd(7, a + 16, dp * 4);
        _tile_loadd(5, vp + (int64_t)(j + 1) * 16 * 32, 64);
        _tile_dpbf16ps(7, 4, 5);
        _tile_stored(6, a, dp * 4);
        _tile_stored(7, a + 16, dp * 4);
    }
}

/* The chunk loop of an item over keys [klo, khi) on the AMX path (see above); arguments as
 * fast_range's, plus scratch: tmp of 64 * D bf16 (V pairs, gathered K rows), sc of 512 floats.
 * fp8 pools: the chunk's K rows are decoded into dec (all of them, seen or not: valid pool rows
 * whose scores are masked), its V rows straight into their pairs. */
AI void amx_range(const tkg_problem *p, tkg_partial part, const int32_t *rg, const uint16_t *qb, int nq, int klo,
                  int khi, const char *kbase, const char *vbase, const int32_t *tab, float *s, uint16_t *dec,
                  uint16_t *tmp, float *sc, int D, int FP8) {
    enum { CH = TKG_CHUNK };
    static const uint16_t zero_row[TKG_MAX_D] __attribute__((aligned(64))) = {0};
    const int nqg = nq < 16 ? nq : 16, fp8 = FP8, row_bytes = D * (fp8 ? 1 : 2);
    uint32_t *qt = (uint32_t *)(qb + (int64_t)nq * D); /* [nq / nqg][D/32][16][nqg] */
    for (int r0 = 0; r0 < nq; r0 += 16) amx_pack_qt(qt + (int64_t)r0 * D / 2, qb, D, r0, nqg);
    uint16_t *vp = tmp;                            /* [D/16][16][32] */
    uint16_t *kg = vp + (int64_t)D / 16 * 16 * 32; /* [2][16][D] */
    amx_configure(nqg);
    key_chunks it;
    for (chunks_begin(&it, p, tab, klo, khi, row_bytes); it.c0 < khi; chunk_leave(&it)) {
        chunk_enter(&it, p, kbase, vbase, tab, row_bytes);
        const int c0 = it.c0, n = it.n, nn = it.nn;
        const int64_t *cur = it.cur, *nxt = it.nxt;
        uint32_t vis[4 * 64];
        const uint32_t seen = chunk_visibility(rg, nq, c0, n, vis);
        if (seen) {
            /* K rows of unseen keys may be read (their scores are masked); V rows never are
             * (0 * NaN is NaN): those read zeros. */
            const uint16_t *kr[CH], *vr[CH];
            if (fp8) amx_k_rows_fp8(dec, kbase, cur, n, D);
            for (int j = 0; j < CH; j++)
                kr[j] = fp8 ? dec + (int64_t)j * D : j < n ? (const uint16_t *)(kbase + cur[j]) : zero_row;
            const int ng = (n + 15) / 16;
            /* The next chunk's rows are prefetched into L1 a row pair per V pair (a trickle, as
             * on the fast path: a burst of a whole chunk stalls on the miss buffers). */
            const pf_t pf = {kbase, vbase, nxt, nn, row_bytes};
            for (int r0 = 0; r0 < nq; r0 += 16) {
                amx_scores_issue(qt + (int64_t)r0 * D / 2, kr, n, ng, D, nqg, kg);
                if (r0 == 0) { /* V's pairs while the first group's tiles compute */
                    if (fp8) amx_v_pairs_fp8(vp, vbase, cur, n, seen, D, pf);
                    else {
                        for (int j = 0; j < CH; j++)
                            vr[j] = j < n && (seen >> j & 1u) ? (const uint16_t *)(vbase + cur[j]) : zero_row;
                        amx_v_pairs(vp, vr, D, pf);
                    }
                }
                amx_scores_finish(p, s, vis, ng, r0, nqg, sc);
            }
            float alpha[4 * 64];
            chunk_softmax(part, s, vis, nq, alpha);
            for (int r0 = 0; r0 < nq; r0 += 16) amx_pv(part.acc, D, s, alpha, vp, D, r0, nqg);
        } else {
            prefetch_rows(kbase, vbase, nxt, 0, nn, row_bytes);
        }
    }
    _tile_release();
}
#endif
#endif

/* Visible key ranges of query r of task t, and whether key interval [a, b) is wholly visible. */
AI void query_ranges(const tkg_problem *p, int task, int nk, int r, int32_t *out4) {
    if (p->ranges) {
        memcpy(out4, p->ranges + ((int64_t)task * p->nq + r) * 4, 16);
        return;
    }
    int i = r % p->causal_s;
    /* 64-bit: an attend-only position may lie far past the keys (it is clipped below). */
    int64_t t = p->q_start ? p->q_start[task / p->heads_per_row] + i : (int64_t)nk - p->causal_s + i;
    int64_t hi = t + 1 < nk ? t + 1 : nk;
    int64_t lo = p->window > 0 && t + 1 - p->window > 0 ? t + 1 - p->window : 0;
    out4[0] = (int32_t)(lo < nk ? lo : nk); /* lo >= hi: nothing visible */
    out4[1] = (int32_t)(hi > 0 ? hi : 0);
    out4[2] = 0;
    out4[3] = 0;
}

void FN(tkg_item)(const tkg_problem *p, int item, tkg_partial part, float *ws) {
    const int task = item / p->nsplit, split = item % p->nsplit;
    const int row = task / p->heads_per_row, head = task % p->heads_per_row;
    const int d = p->d, dp = tkg_padded_d(d), nq = p->nq, CH = TKG_CHUNK;
    const int nk = p->nkeys[row];
    const int esz = elem_bytes(p->dtype);

    int32_t *rg = (int32_t *)ws;
    ws += (nq * 4 + 15) / 16 * 16;
    float *qs = ws;
    ws += (int64_t)nq * dp;
    uint16_t *qb = (uint16_t *)ws; /* [nq][dp] bf16, then (fast path) [nq4 / 4][dp / 8][16] packed pairs */
    ws += ((int64_t)(nq + 3) / 4 * 4 * dp + 15) / 16 * 16; /* every region stays 64-byte aligned */
    float *kb = ws;
    ws += (int64_t)CH * dp;
    float *vb = ws;
    ws += (int64_t)CH * dp;
    float *s = ws;

    /* Key hull of the task, clipped to the pooled keys; split into nsplit chunk-aligned parts. */
    int hull_lo = nk, hull_hi = 0;
    for (int r = 0; r < nq; r++) {
        int32_t *g = rg + 4 * r;
        query_ranges(p, task, nk, r, g);
        for (int k = 0; k < 4; k += 2) {
            if (g[k] < 0) g[k] = 0;
            if (g[k + 1] > nk) g[k + 1] = nk;
            if (g[k] < g[k + 1]) {
                hull_lo = g[k] < hull_lo ? g[k] : hull_lo;
                hull_hi = g[k + 1] > hull_hi ? g[k + 1] : hull_hi;
            }
        }
    }
    int klo = 0, khi = 0;
    if (hull_lo < hull_hi) {
        int nchunks = (hull_hi - hull_lo + CH - 1) / CH;
        int per = (nchunks + p->nsplit - 1) / p->nsplit;
        klo = hull_lo + split * per * CH;
        khi = klo + per * CH;
        if (khi > hull_hi) khi = hull_hi;
        if (klo > khi) klo = khi;
    }

    const float *qsrc = p->q + (int64_t)task * nq * d;
    /* K rows and q share a column order (dot products ignore it); V rows follow the accumulators. */
    const int klay = p->dtype == TKG_BF16 && d % 32 == 0 ? TKG_LAYOUT_SPLIT : TKG_LAYOUT_NATURAL;
    const int split_rows = klay == TKG_LAYOUT_SPLIT;
    const int bf_pv = USE_DPBF16 && p->layout == TKG_LAYOUT_UNPACK;
    static const uint16_t zero_row[TKG_MAX_D] = {0};
    (void)zero_row;
    int use_bf = 0;
#if USE_DPBF16
    use_bf = (p->dtype == TKG_BF16 || p->dtype == TKG_FP8) && p->q_bf16_exact && d % 32 == 0;
#endif
    /* fp8 pools on the bf16 paths: each chunk's K rows (use_bf) are decoded to bf16 into kb's
     * memory, its V rows (bf_pv) into the upper half of vb's (the lower half holds the V pairs). */
    const int fp8 = p->dtype == TKG_FP8;
    uint16_t *kb16 = (uint16_t *)kb;
    uint16_t *vb16 = (uint16_t *)(vb + (int64_t)CH * dp / 2);
#define v_bf16_row(j) (fp8 ? (fp8_to_bf16(p, vb16 + (int64_t)(j) * dp, (const uint8_t *)(vbase + cur[j]), d), \
                              (const uint16_t *)(vb16 + (int64_t)(j) * dp))                                    \
                           : (const uint16_t *)(vbase + cur[j]))
    (void)kb16;
    (void)vb16;
    float qscale = use_bf ? 1.0f : p->score_scale;
    for (int r = 0; r < nq; r++) {
        f32_row_to_layout_scaled(qs + r * dp, qsrc + (int64_t)r * d, d, dp, klay, qscale);
        if (use_bf) {
            const uint32_t *w = (const uint32_t *)(qsrc + (int64_t)r * d);
            for (int c = 0; c < d; c++) qb[r * dp + c] = (uint16_t)(w[c] >> 16); /* exact: a bf16 number */
        }
        part.m[r] = -INFINITY;
        part.l[r] = 0.0f;
    }
    memset(part.acc, 0, sizeof(float) * (size_t)nq * dp);

    const char *kbase = (const char *)p->k + (int64_t)head * p->head_stride * esz;
    const char *vbase = (const char *)p->v + (int64_t)head * p->head_stride * esz;
    const int32_t *tab = p->table + (int64_t)row * p->table_stride;
    const int row_bytes = d * esz;
    /* Byte offsets of the rows of the current and the next chunk (walked block by block: no
     * division per key). */
    int64_t cur[TKG_CHUNK], nxt[TKG_CHUNK];
    int walk_blk = klo / p->bl, walk_off = klo % p->bl;
#define WALK(dst, count)                                                                              \
    for (int j_ = 0; j_ < (count); j_++) {                                                            \
        (dst)[j_] = ((int64_t)tab[walk_blk] * p->block_stride + (int64_t)walk_off * d) * esz;          \
        if (++walk_off == p->bl) {                                                                    \
            walk_off = 0;                                                                             \
            walk_blk++;                                                                               \
        }                                                                                             \
    }
#if USE_DPBF16
    /* vis/alpha arrays of the fast path hold 256 queries. */
    if (use_bf && bf_pv && !p->prior_mask && nq <= 256 && (d == 128 || d == 64) &&
        (p->dtype == TKG_BF16 || (fp8 && p->vbmi))) {
        /* compile-time head dim and element size: the row loops unroll */
#if USE_AMX
        if (nq <= 16 || nq % 16 == 0) {
            uint16_t *tmp = (uint16_t *)vb;
            float *sc = s + (int64_t)nq * CH;
            if (d == 128 && fp8) amx_range(p, part, rg, qb, nq, klo, khi, kbase, vbase, tab, s, kb16, tmp, sc, 128, 1);
            else if (d == 128) amx_range(p, part, rg, qb, nq, klo, khi, kbase, vbase, tab, s, kb16, tmp, sc, 128, 0);
            else if (fp8) amx_range(p, part, rg, qb, nq, klo, khi, kbase, vbase, tab, s, kb16, tmp, sc, 64, 1);
            else amx_range(p, part, rg, qb, nq, klo, khi, kbase, vbase, tab, s, kb16, tmp, sc, 64, 0);
            klo = khi;
        }
#endif
        if (klo < khi) {
            if (d == 128 && fp8) fast_range(p, part, rg, qb, nq, klo, khi, kbase, vbase, tab, s, kb16, 128, 1);
            else if (d == 128) fast_range(p, part, rg, qb, nq, klo, khi, kbase, vbase, tab, s, kb16, 128, 0);
            else if (fp8) fast_range(p, part, rg, qb, nq, klo, khi, kbase, vbase, tab, s, kb16, 64, 1);
            else fast_range(p, part, rg, qb, nq, klo, khi, kbase, vbase, tab, s, kb16, 64, 0);
        }
        klo = khi; /* the chunk loop below has nothing left */
    }
#endif
    if (klo < khi) WALK(cur, (khi - klo < CH ? khi - klo : CH));

    for (int c0 = klo; c0 < khi; c0 += CH) {
        int n = khi - c0 < CH ? khi - c0 : CH;
        int nn = khi - (c0 + CH) < CH ? khi - (c0 + CH) : CH;
        if (nn > 0) WALK(nxt, nn);
        for (int j = n; j < CH; j++) cur[j] = cur[0]; /* padding rows: valid memory, masked scores */
        int ng = (n + 15) / 16;
        if (use_bf && fp8)
            for (int j = 0; j < ng * 16; j++) fp8_to_bf16(p, kb16 + (int64_t)j * dp, (const uint8_t *)(kbase + cur[j]), d);
        if (!use_bf) {
            for (int j = 0; j < ng * 16; j++) {
                if (split_rows) row_to_f32_split(kb + (int64_t)j * dp, kbase + cur[j], d);
                else row_to_f32(kb + (int64_t)j * dp, kbase + cur[j], d, dp, p->dtype);
            }
        }
        /* seen[j]: some query sees key j. A slot nobody sees may hold garbage (NaN/inf in
         * unwritten cache rows); its V row is zeroed so that 0 * garbage cannot reach the output. */
        uint8_t seen[TKG_CHUNK];
        int any_whole = 0;
        memset(seen, 0, sizeof(seen));
        for (int r = 0; r < nq; r++) {
            float *sr = s + r * CH;
            for (int g = 0; g < ng; g++) {
#if USE_DPBF16
                if (use_bf) {
                    const uint16_t *kr[16];
                    for (int t = 0; t < 16; t++)
                        kr[t] = fp8 ? kb16 + (int64_t)(16 * g + t) * dp : (const uint16_t *)(kbase + cur[16 * g + t]);
                    *(vf *)(sr + 16 * g) = dots16_bf16(qb + r * dp, kr, d) * splat(p->score_scale);
                    continue;
                }
#endif
                *(vf *)(sr + 16 * g) = dots16_f32(qs + r * dp, kb + (int64_t)16 * g * dp, dp);
            }
            for (int j = ng * 16; j < CH; j++) sr[j] = -INFINITY;
            const int32_t *g = rg + 4 * r;
            const uint8_t *pm =
                p->prior_mask ? p->prior_mask + ((int64_t)task * nq + r) * p->prior_mask_stride : NULL;
            int whole = !pm && ((c0 >= g[0] && c0 + n <= g[1]) || (c0 >= g[2] && c0 + n <= g[3]));
            any_whole |= whole;
            if (!whole)
                for (int j = 0; j < n; j++) {
                    int key = c0 + j;
                    if (!((key >= g[0] && key < g[1]) || (key >= g[2] && key < g[3])) || (pm && !pm[key]))
                        sr[j] = -INFINITY;
                    else seen[j] = 1;
                }
            for (int j = n; j < ng * 16; j++) sr[j] = -INFINITY;
        }
        for (int j = 0; j < n; j++) {
            /* Blocks sit anywhere in the pool, and small ones end before the hardware prefetcher
             * ramps up: prefetch one row of the next chunk per row converted (a steady trickle;
             * a burst of a whole chunk stalls on the miss buffers). ~20% faster from DRAM. */
            if (j < nn)
                for (int b = 0; b < row_bytes; b += 64) {
                    __builtin_prefetch(kbase + nxt[j] + b, 0, 3);
                    __builtin_prefetch(vbase + nxt[j] + b, 0, 3);
                }
            if (bf_pv) continue;
            if (!any_whole && !seen[j]) memset(vb + (int64_t)j * dp, 0, sizeof(float) * (size_t)dp);
            else if (split_rows) row_to_f32_split(vb + (int64_t)j * dp, vbase + cur[j], d);
            else row_to_f32(vb + (int64_t)j * dp, vbase + cur[j], d, dp, p->dtype);
        }
#if USE_DPBF16
        if (bf_pv) {
            /* Rows nobody sees and the odd row past n read zeros, never the pool (garbage). */
            __m512i *vp = (__m512i *)vb;
            for (int t = 0; 2 * t < n; t++) {
                int j0 = 2 * t, j1 = 2 * t + 1;
                const uint16_t *r0 = any_whole || seen[j0] ? v_bf16_row(j0) : zero_row;
                const uint16_t *r1 = j1 < n && (any_whole || seen[j1]) ? v_bf16_row(j1) : zero_row;
                v_pair(vp + (int64_t)t * (dp / 16), r0, r1, d);
            }
            softmax_update(part, s, NULL, vp, n, nq, dp);
            memcpy(cur, nxt, sizeof(cur));
            continue;
        }
#endif
        softmax_update(part, s, vb, NULL, n, nq, dp);
        memcpy(cur, nxt, sizeof(cur));
    }
#undef WALK
#undef v_bf16_row

    /* The active keys (attention_tkg only) ride with the last split. */
    if (p->act_n > 0 && split == p->nsplit - 1) {
        int n = p->act_n;
        const float *ka = p->ka + (int64_t)row * n * d;
        const float *va = p->va + (int64_t)row * n * d;
        for (int j = 0; j < 16; j++) f32_row_to_layout(kb + (int64_t)j * dp, ka + (int64_t)(j < n ? j : 0) * d, d, dp, klay);
        uint8_t seen[16] = {0};
        for (int r = 0; r < nq; r++) {
            float *sr = s + r * CH;
            *(vf *)sr = dots16_f32(qs + r * dp, kb, dp) * splat(use_bf ? p->score_scale : 1.0f);
            for (int j = 16; j < CH; j++) sr[j] = -INFINITY;
            const uint8_t *mk = p->act_mask + ((int64_t)task * nq + r) * n;
            for (int j = 0; j < 16; j++) {
                if (j >= n || !mk[j]) sr[j] = -INFINITY;
                else seen[j] = 1;
            }
        }
        for (int j = 0; j < n; j++) {
            if (seen[j]) f32_row_to_layout(vb + (int64_t)j * dp, va + (int64_t)j * d, d, dp, p->layout);
            else memset(vb + (int64_t)j * dp, 0, sizeof(float) * (size_t)dp);
        }
        softmax_update(part, s, vb, NULL, n, nq, dp);
    }
}
