/* Per-step host work of the server, one native pass each (tkg.kernel.backends._native):
 *
 *  - tkg_rope_qk: rotate-half RoPE of a decode step's q and k, bit-identical to the numpy
 *    `tkg.server.rope.RopeTable.rotate_qk` (see its docstring): for each row x of d values, in
 *    float32, out = x * cos2 + swap_halves(x) * sin2, each product rounded to float32 and then
 *    the sum, and the sum rounded to the I/O dtype to nearest even. No fused multiply-add may
 *    form here (it would round once instead of three times): contraction is switched off below.
 *  - tkg_scatter_rows: the store's write of new K/V rows into the pools at (block, offset) slots.
 *  - tkg_rope_store: both of the above for a decode step in one pass: q rotated into q_out, k rotated
 *    straight into its pool slots (no rotated copy of k in between), v copied into its slots, with
 *    the next sequence's slot lines prefetched while this one's rows are rotated.
 *  - tkg_refcount_add: the block pool's reference counts of a step's held blocks, +1 or -1.
 *  - tkg_append_prepare, tkg_append_commit: the KV cache's two-phase append of a common decode step
 *    (`tkg.server.appends`: no block shared, every sequence live) over its sequence table's rows,
 *    in one pass each instead of ~25 numpy calls on arrays of a few dozen entries.
 *  - tkg_top_bytes_below: the wire check of q/k/v (`tkg.codec.bounded_bytes`): every value's top
 *    byte, masked, below a limit.
 *
 * Compiled for the baseline ISA like the rest of the extension; on x86-64 Linux the hot loops are
 * also cloned for AVX2 and AVX-512 and picked at load time (GCC target_clones, by CPUID).
 */
#pragma GCC optimize("fp-contract=off")

#include <stdint.h>
#include <string.h>

#include "tkg_native.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define TKG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TKG_CLONES
#endif

static inline uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static inline float bits_f32(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* float32 -> bfloat16 as ml_dtypes rounds it: nearest even; a NaN becomes sign | 0x7fc0. */
static inline uint16_t to_bf16(float x) {
    uint32_t u = f32_bits(x);
    uint16_t nan = (uint16_t)(((u >> 16) & 0x8000u) | 0x7fc0u);
    uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? nan : r;
}

/* float32 -> float16 as numpy rounds it: nearest even (the C conversion); a NaN keeps its sign and
 * top payload bits (numpy's npy_floatbits_to_halfbits), never becoming an infinity. */
static inline uint16_t to_f16(float x) {
    uint32_t u = f32_bits(x), top = (u & 0x007fffffu) >> 13;
    uint16_t nan = (uint16_t)(((u >> 16) & 0x8000u) | (0x7c00u + (top ? top : 1u)));
    _Float16 h = (_Float16)x;
    uint16_t b;
    memcpy(&b, &h, 2);
    return (u & 0x7fffffffu) > 0x7f800000u ? nan : b;
}

static inline float from_f16(uint16_t b) {
    _Float16 h;
    memcpy(&h, &b, 2);
    return (float)h;
}

static inline __attribute__((always_inline)) void load_row(const void *src, int dtype, int d, float *x) {
    if (dtype == TKG_F32) {
        memcpy(x, src, sizeof(float) * (size_t)d);
    } else if (dtype == TKG_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int j = 0; j < d; j++) x[j] = bits_f32((uint32_t)s[j] << 16);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (int j = 0; j < d; j++) x[j] = from_f16(s[j]);
    }
}

static inline __attribute__((always_inline)) void store_row(void *dst, int dtype, int d, const float *y) {
    if (dtype == TKG_F32) {
        memcpy(dst, y, sizeof(float) * (size_t)d);
    } else if (dtype == TKG_BF16) {
        uint16_t *o = (uint16_t *)dst;
        for (int j = 0; j < d; j++) o[j] = to_bf16(y[j]);
    } else {
        uint16_t *o = (uint16_t *)dst;
        for (int j = 0; j < d; j++) o[j] = to_f16(y[j]);
    }
}

/* One row: y = x * c + swap_halves(x) * s, three float32 roundings per value (no FMA). */
static inline __attribute__((always_inline)) void rotate_row(const float *restrict x, const float *restrict c, const float *restrict s, int half,
                              float *restrict y) {
    for (int j = 0; j < half; j++) {
        float a = x[j] * c[j];
        float b = x[j + half] * s[j];
        y[j] = a + b;
    }
    for (int j = 0; j < half; j++) {
        float a = x[j + half] * c[j + half];
        float b = x[j] * s[j + half];
        y[j + half] = a + b;
    }
}

static int item_size(int dtype) { return dtype == TKG_F32 ? 4 : 2; }

TKG_CLONES
int tkg_rope_qk(const tkg_rope *r) {
    int d = r->d, half = d / 2;
    float x[TKG_MAX_D], y[TKG_MAX_D];
    size_t qrow = (size_t)d * (size_t)item_size(r->q_dtype), krow = (size_t)d * (size_t)item_size(r->k_dtype);
    for (int64_t b = 0; b < r->batch; b++) {
        for (int64_t t = 0; t < r->tokens; t++) {
            int64_t p = r->positions[b * r->tokens + t];
            if (p < 0 || p >= r->table_rows) return -1;
            const float *c = r->cos2 + p * d, *s = r->sin2 + p * d;
            for (int64_t h = 0; h < r->hq + r->hkv; h++) {
                int is_q = h < r->hq;
                int dtype = is_q ? r->q_dtype : r->k_dtype;
                int64_t heads = is_q ? r->hq : r->hkv, hh = is_q ? h : h - r->hq;
                size_t row = (size_t)((b * heads + hh) * r->tokens + t) * (is_q ? qrow : krow);
                load_row((const char *)(is_q ? r->q : r->k) + row, dtype, d, x);
                rotate_row(x, c, s, half, y);
                store_row((char *)(is_q ? r->q_out : r->k_out) + row, dtype, d, y);
            }
        }
    }
    return 0;
}

/* Prefetch (for writing) every line of sequence b's K and V slots: they sit in pools far larger
 * than the caches, and each store would otherwise wait for its line from memory. */
static inline void prefetch_slots(const tkg_rope *r, const tkg_kv_dst *w, int64_t b, size_t row) {
    size_t head = (size_t)(w->num_blocks * w->bl) * row;
    for (int64_t t = 0; t < r->tokens; t++) {
        size_t slot = (size_t)(w->blocks[b * r->tokens + t] * w->bl + w->offsets[b * r->tokens + t]) * row;
        for (int64_t h = 0; h < r->hkv; h++) {
            const char *kd = (const char *)w->k_pool + (size_t)h * head + slot;
            const char *vd = (const char *)w->v_pool + (size_t)h * head + slot;
            for (size_t o = 0; o < row; o += 64) {
                __builtin_prefetch(kd + o, 1, 3);
                __builtin_prefetch(vd + o, 1, 3);
            }
        }
    }
}

TKG_CLONES
int tkg_rope_store(const tkg_rope *r, const tkg_kv_dst *w) {
    int d = r->d, half = d / 2;
    int64_t n = r->batch * r->tokens;
    for (int64_t i = 0; i < n; i++) { /* check everything first: a refusal writes nothing */
        if (r->positions[i] < 0 || r->positions[i] >= r->table_rows) return -1;
        if (w->blocks[i] < 0 || w->blocks[i] >= w->num_blocks || w->offsets[i] < 0 || w->offsets[i] >= w->bl)
            return -2;
    }
    float x[TKG_MAX_D], y[TKG_MAX_D];
    size_t qrow = (size_t)d * (size_t)item_size(r->q_dtype), krow = (size_t)d * (size_t)item_size(r->k_dtype);
    size_t head = (size_t)(w->num_blocks * w->bl) * krow; /* bytes between a pool's heads */
    if (r->batch > 0) prefetch_slots(r, w, 0, krow);
    for (int64_t b = 0; b < r->batch; b++) {
        /* The next sequence's slot lines load while this one's 2 * heads rows are computed. */
        if (b + 1 < r->batch) prefetch_slots(r, w, b + 1, krow);
        for (int64_t t = 0; t < r->tokens; t++) {
            int64_t p = r->positions[b * r->tokens + t];
            const float *c = r->cos2 + p * d, *s = r->sin2 + p * d;
            size_t slot = (size_t)(w->blocks[b * r->tokens + t] * w->bl + w->offsets[b * r->tokens + t]) * krow;
            for (int64_t h = 0; h < r->hq; h++) {
                size_t at = (size_t)((b * r->hq + h) * r->tokens + t) * qrow;
                load_row((const char *)r->q + at, r->q_dtype, d, x);
                rotate_row(x, c, s, half, y);
                store_row((char *)r->q_out + at, r->q_dtype, d, y);
            }
            for (int64_t h = 0; h < r->hkv; h++) {
                size_t at = (size_t)((b * r->hkv + h) * r->tokens + t) * krow;
                load_row((const char *)r->k + at, r->k_dtype, d, x);
                rotate_row(x, c, s, half, y);
                store_row((char *)w->k_pool + (size_t)h * head + slot, r->k_dtype, d, y);
                memcpy((char *)w->v_pool + (size_t)h * head + slot, (const char *)w->v + at, krow);
            }
        }
    }
    return 0;
}

/* Rows ahead whose destination lines are prefetched (for writing): the slots of a step are scattered
 * over pools far larger than the caches, and each store waits for its line from memory (read for
 * ownership); without prefetches only the few rows the store buffer holds are in flight. */
#define AHEAD 8

int tkg_scatter_rows(const tkg_scatter *w) {
    size_t row = (size_t)w->d * (size_t)w->itemsize;
    for (int64_t i = 0; i < w->n0 * w->n1; i++) {
        if (w->blocks[i] < 0 || w->blocks[i] >= w->num_blocks || w->offsets[i] < 0 || w->offsets[i] >= w->bl)
            return -1;
    }
    for (int64_t h = 0; h < w->heads; h++) {
        char *dst = (char *)w->dst + (size_t)(h * w->dst_head_stride) * (size_t)w->itemsize;
        const char *src = (const char *)w->src + h * w->src_strides[0];
        for (int64_t i0 = 0; i0 < w->n0; i0++) {
            for (int64_t i1 = 0; i1 < w->n1; i1++) {
                int64_t i = i0 * w->n1 + i1;
                size_t slot = (size_t)(w->blocks[i] * w->bl + w->offsets[i]) * row;
                if (i + AHEAD < w->n0 * w->n1) { /* slots far ahead: their lines load meanwhile */
                    const char *next = dst + (size_t)(w->blocks[i + AHEAD] * w->bl + w->offsets[i + AHEAD]) * row;
                    for (size_t o = 0; o < row; o += 64) __builtin_prefetch(next + o, 1, 3);
                }
                memcpy(dst + slot, src + i0 * w->src_strides[1] + i1 * w->src_strides[2], row);
            }
        }
    }
    return 0;
}

/* Whole values only (a trailing partial value has no top byte), as `data[size - 1 :: size]` takes.
 * Each value's top byte t (0..255), masked, plus 256 - limit carries into bit 8 exactly when
 * t & mask >= limit: adds, ands and ors over 16- or 32-bit lanes (vectorised), one test a chunk. */
#define TOP_BELOW(T, SHIFT)                                                                          \
    do {                                                                                             \
        const int64_t chunk = 2048;                                                                  \
        for (int64_t start = 0; start < n; start += chunk) {                                         \
            int64_t end = start + chunk < n ? start + chunk : n;                                     \
            T bad = 0;                                                                               \
            for (int64_t j = start; j < end; j++) {                                                  \
                T v;                                                                                 \
                memcpy(&v, data + j * (int64_t)sizeof(T), sizeof(T));                                \
                bad |= (T)((T)((v >> SHIFT) & mask) + (T)(256 - limit));                            \
            }                                                                                        \
            if (bad & 0x100) return 0;                                                               \
        }                                                                                            \
    } while (0)

TKG_CLONES
int tkg_top_bytes_below(const uint8_t *data, int64_t len, int itemsize, uint8_t mask, uint8_t limit) {
    int64_t n = len / itemsize;
    if (itemsize == 2) {
        TOP_BELOW(uint16_t, 8);
    } else if (itemsize == 4) {
        TOP_BELOW(uint32_t, 24);
    } else if (itemsize == 1) {
        uint16_t bad = 0;
        for (int64_t j = 0; j < n; j++) bad |= (uint16_t)((data[j] & mask) + (256 - limit));
        if (bad & 0x100) return 0;
    } else {
        for (int64_t j = 0; j < n; j++)
            if ((data[j * itemsize + itemsize - 1] & mask) >= limit) return 0;
    }
    return 1;
}

static inline int64_t id_at(const void *ids, int id_size, int64_t i) {
    return id_size == 4 ? (int64_t)((const int32_t *)ids)[i] : ((const int64_t *)ids)[i];
}

int64_t tkg_refcount_add(int32_t *ref, int64_t nref, const void *ids, int id_size, int64_t n, int delta,
                         int32_t *freed, int64_t *crossed) {
    for (int64_t i = 0; i < n; i++) { /* check everything first: a refusal changes nothing */
        int64_t id = id_at(ids, id_size, i);
        if (id < 0 || id >= nref) return -1;
        if (ref[id] <= 0) return -2;
    }
    int64_t nfreed = 0, cross = 0;
    int32_t mark = delta > 0 ? 2 : 1;
    for (int64_t i = 0; i < n; i++) {
        int64_t id = id_at(ids, id_size, i);
        int32_t left = ref[id] += delta;
        cross += left == mark;
        if (left == 0) freed[nfreed++] = (int32_t)id;
    }
    *crossed = cross;
    return nfreed;
}

int64_t tkg_append_prepare(const tkg_prepare *p) {
    int64_t L = p->num_layers, n = p->num_tokens, fresh = 0;
    for (int64_t b = 0; b < p->batch; b++) { /* check everything first: a refusal changes nothing */
        int64_t slot = p->slots[b], pos = p->positions[b];
        if (slot < 0 || slot >= p->capacity || pos > p->max_context - n) return -1;
        int64_t rel = pos - p->base[slot];
        if (p->lengths[slot * L + p->layer] != rel || p->pending[slot * L + p->layer]) return -1;
        int64_t need = (rel + n + p->bl - 1) / p->bl - p->num_blocks[slot];
        fresh += need > 0 ? need : 0;
        p->rel[b] = rel;
        p->ends[b] = (int32_t)(rel + n);
        p->generations[b] = p->generation[slot];
    }
    if (fresh > p->free_count) return -1;
    for (int64_t b = 0; b < p->batch; b++) {
        p->pending[p->slots[b] * L + p->layer] = 1;
        p->last_used[p->slots[b]] = p->now;
    }
    return fresh;
}

int tkg_append_commit(tkg_commit *c) {
    int64_t L = c->num_layers, S = c->num_tokens, bl = c->bl, mb = c->max_blocks, want = 0;
    if (c->width < 1 || c->width > mb) return -1;
    for (int64_t b = 0; b < c->batch; b++) { /* check everything first: a refusal changes nothing */
        int64_t slot = c->slots[b], end = c->ends[b];
        if (slot < 0 || slot >= c->capacity || c->generation_now[slot] != c->generations[b]) return -1;
        int64_t need = (end + bl - 1) / bl;
        if (end < S || need > c->width) return -1;
        want += need > c->num_blocks[slot] ? need - c->num_blocks[slot] : 0;
    }
    if (want > c->nreserved) return -1;
    int64_t used = 0, grown = 0, nheld = 0;
    for (int64_t b = 0; b < c->batch; b++) {
        int64_t slot = c->slots[b], end = c->ends[b], need = (end + bl - 1) / bl, held = c->num_blocks[slot];
        int32_t *row = c->tables + slot * mb;
        if (need > held) { /* new blocks at the table's end (none when another layer grew it first) */
            for (int64_t j = held; j < need; j++) row[j] = c->reserved[used++];
            c->num_blocks[slot] = need;
        }
        int64_t *len = c->lengths + slot * L, top = len[0];
        for (int64_t l = 1; l < L; l++) top = len[l] > top ? len[l] : top;
        grown += end > top ? end - top : 0;
        len[c->layer] = end;
        if (!c->hold) c->pending[slot * L + c->layer] = 0;
        for (int64_t i = 0; i < S; i++) {
            int64_t t = end - S + i;
            c->blocks[b * S + i] = row[t / bl];
            c->offsets[b * S + i] = t % bl;
        }
        memcpy(c->tables_out + b * c->width, row, sizeof(int32_t) * (size_t)c->width);
        if (c->hold)
            for (int64_t j = 0; j < need; j++) c->held[nheld++] = row[j];
    }
    c->used = used;
    c->grown = grown;
    c->nheld = nheld;
    return 0;
}
