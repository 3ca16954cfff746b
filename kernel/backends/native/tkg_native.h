/* Shared declarations of the native CPU decode-attention kernel (tkg.kernel._native).
 *
 * One "task" is the set of nq query rows that share one key sequence: for paged_decode the
 * G*S queries of one (sequence, kv head); for attention_tkg the H*S queries of one folded row.
 * Each task is cut into nsplit key ranges ("items") so that few long tasks still keep every
 * thread busy; the partial softmax states of the items of a task are merged at the end.
 */
#ifndef TKG_NATIVE_H
#define TKG_NATIVE_H

#include <stdint.h>

/* Element types. TKG_FP8 (float8_e4m3: bias 7, inf/NaN, max 240) is for the K/V pools only. */
enum { TKG_F32 = 0, TKG_BF16 = 1, TKG_F16 = 2, TKG_FP8 = 3 };

/* Key-chunk length: one chunk of K and V converted to fp32 fits in L1 with the scores. */
#define TKG_CHUNK 32
#define TKG_MAX_D 256

typedef struct {
    int dtype;          /* element type of the K/V pools: TKG_F32, TKG_BF16, TKG_F16 or TKG_FP8 */
    int out_dtype;      /* element type of `out` */
    int d;              /* head dim (<= TKG_MAX_D) */
    int nq;             /* query rows per task */
    int ntasks;
    int heads_per_row;  /* task t reads row t / heads_per_row, kv head t % heads_per_row */
    const float *q;     /* [ntasks, nq, d] fp32 */
    float score_scale;  /* logits = (q . k) * score_scale */
    float out_scale;    /* out = out_scale * softmax . v (a V dequantisation scale; 1 otherwise) */
    int q_bf16_exact;   /* every q value is a bf16 number: the bf16 dot-product path may run */
    const void *k, *v;  /* pool bases */
    int64_t head_stride;   /* elements between kv heads of the pools */
    int64_t block_stride;  /* elements between blocks */
    int bl;                /* tokens per block (rows of d elements, contiguous) */
    const int32_t *table;  /* [rows, table_stride] physical block ids */
    int64_t table_stride;
    const int32_t *nkeys;  /* [rows] cached keys read from the pools */
    /* Visibility. ranges == NULL: query r of a task (i = r % causal_s) sits at key index
     * t = nkeys - causal_s + i (q_start == NULL: the causal_s newest keys are its own tokens) or
     * t = q_start[row] + i (attend-only, t >= nkeys) and sees keys [max(0, t + 1 - window),
     * min(t + 1, nkeys)) (window <= 0: no window).
     * Else ranges[t, r] = {lo1, hi1, lo2, hi2}: two half-open key intervals. */
    int causal_s;
    int window;
    const int32_t *ranges;
    const int64_t *q_start;    /* optional [rows] (ranges == NULL only): attend-only positions */
    const uint8_t *prior_mask; /* optional [ntasks, nq, nkeys_max]: also required visible (nonzero) */
    int64_t prior_mask_stride; /* keys per (task, query) row of prior_mask */
    /* Optional extra keys after the pooled ones (attention_tkg's active tokens), fp32. */
    int act_n;
    const float *ka, *va;     /* [rows, act_n, d] */
    const uint8_t *act_mask;  /* [ntasks, nq, act_n], nonzero = visible */
    const float *sinks;       /* [ntasks, nq] or NULL */
    void *out;                /* [ntasks, nq, d] */
    /* Optional [ntasks, nq] fp32: each query's log-sum-exp, the natural log of its softmax
     * denominator over the scaled logits, i.e. m + log(l) with the sink's term in both. */
    float *lse;
    /* A query that sees no key (and no finite sink) gets out 0 and lse -inf instead of being
     * reported as an error (partial calls: an empty segment, a window that ends before it). */
    int empty_ok;
    int nsplit;               /* key splits per task, >= 1 */
    int layout;               /* accumulator column order (TKG_LAYOUT_*), set with the variant */
    int vbmi;                 /* AVX-512-VBMI present (fp8 rows decode by byte-table lookups) */
} tkg_problem;

/* Per-thread scratch, grown on demand and kept for the life of the process. */
typedef struct {
    float *buf;
    int64_t cap;  /* floats */
} tkg_workspace;

/* Partial softmax state of one item: row max m, denominator l, and acc[nq][dp]. */
typedef struct {
    float *m, *l, *acc;
} tkg_partial;

/* Compute item `item` (task = item / nsplit) into `part`; `ws` has room for tkg_ws_floats(). */
typedef void (*tkg_item_fn)(const tkg_problem *p, int item, tkg_partial part, float *ws);

int64_t tkg_ws_floats(const tkg_problem *p);

/* Order of the d accumulator (and output) columns inside each block of 32, for bf16 rows whose
 * length is a multiple of 32 (see attn_impl.h); NATURAL otherwise.
 *  SPLIT:  the 16 even columns, then the 16 odd ones (bf16 widened with a shift and a mask).
 *  UNPACK: columns {0-3, 8-11, 16-19, 24-27}, then {4-7, 12-15, 20-23, 28-31} (the lane order of
 *          vpunpck[lh]wd, used by the AVX-512-BF16 P.V product). */
enum { TKG_LAYOUT_NATURAL = 0, TKG_LAYOUT_SPLIT = 1, TKG_LAYOUT_UNPACK = 2 };

/* Source column of accumulator index i (0 <= i < 32) of a block, for a layout. */
static inline int tkg_layout_column(int layout, int i) {
    if (layout == TKG_LAYOUT_SPLIT) return i < 16 ? 2 * i : 2 * (i - 16) + 1;
    if (layout == TKG_LAYOUT_UNPACK) return i < 16 ? (i / 4) * 8 + i % 4 : ((i - 16) / 4) * 8 + 4 + (i - 16) % 4;
    return i;
}
int tkg_padded_d(int d);

void tkg_item_amx(const tkg_problem *p, int item, tkg_partial part, float *ws);
void tkg_item_avx512bf16(const tkg_problem *p, int item, tkg_partial part, float *ws);
void tkg_item_avx512(const tkg_problem *p, int item, tkg_partial part, float *ws);
void tkg_item_avx2(const tkg_problem *p, int item, tkg_partial part, float *ws);
void tkg_item_generic(const tkg_problem *p, int item, tkg_partial part, float *ws);

/* Thread pool: run fn(ctx, worker) on `nthreads` threads (the caller is worker 0). */
typedef void (*tkg_job_fn)(void *ctx, int worker);
int tkg_pool_run(int nthreads, int pin, tkg_job_fn fn, void *ctx);
int tkg_pool_size(void);

/* ---- per-step host work (host_ops.c) ---- */

/* RoPE of a decode step: q [batch, hq, tokens, d] and k [batch, hkv, tokens, d], C-contiguous, each
 * TKG_F32, TKG_BF16 or TKG_F16; rows rotated with cos2/sin2 [table_rows, d] float32 at
 * positions [batch, tokens] into q_out and k_out (same shapes and dtypes; may not alias the inputs). */
typedef struct {
    const void *q, *k;
    void *q_out, *k_out;
    int q_dtype, k_dtype;
    int d; /* even, <= TKG_MAX_D */
    int64_t batch, hq, hkv, tokens;
    const int64_t *positions;
    const float *cos2, *sin2;
    int64_t table_rows;
} tkg_rope;

/* Returns 0, or -1 when a position is outside [0, table_rows) (rows before it are written). */
int tkg_rope_qk(const tkg_rope *r);

/* Where tkg_rope_store puts a step's k and v: v [batch, hkv, tokens, d] C-contiguous in k's dtype;
 * k_pool, v_pool [hkv, num_blocks, bl, d] C-contiguous in k's dtype; token t of sequence b goes to
 * block blocks[b * tokens + t], row offsets[b * tokens + t] of the block (distinct slots). */
typedef struct {
    void *k_pool, *v_pool;
    const void *v;
    int64_t num_blocks, bl;
    const int64_t *blocks, *offsets;
} tkg_kv_dst;

/* tkg_rope_qk's rotation of q into q_out (r->k_out unused) and of k straight into its pool slots,
 * v copied into its slots, bit for bit what tkg_rope_qk then tkg_scatter_rows write. Returns 0; -1
 * (nothing written) when a position is outside [0, table_rows); -2 (nothing written) when a block
 * or offset is out of range. */
int tkg_rope_store(const tkg_rope *r, const tkg_kv_dst *w);

/* Rows of d elements of `itemsize` bytes: src row (h, i0, i1) (byte strides src_strides) goes to
 * dst [heads, num_blocks, bl, d] (C-contiguous per head, dst_head_stride elements between heads) at
 * block blocks[i], row offsets[i] of the block, i = i0 * n1 + i1. */
typedef struct {
    void *dst;
    int64_t dst_head_stride, num_blocks, bl;
    const void *src;
    int64_t src_strides[3];
    int64_t heads, n0, n1;
    int d, itemsize;
    const int64_t *blocks, *offsets;
} tkg_scatter;

/* Returns 0, or -1 (nothing written) when a block or offset is out of range. */
int tkg_scatter_rows(const tkg_scatter *w);

/* The KV cache's sequence rows (`tkg.server.sequences.SequenceTable`, C-contiguous): lengths and
 * pending [capacity, num_layers] (int64, bool bytes), base, num_blocks, generation [capacity]
 * int64, last_used [capacity] double, tables [capacity, max_blocks] int32. */

/* A prepare of num_tokens at `layer` for `batch` distinct slots at absolute positions: every slot at
 * its length there (positions - base), none in flight, within max_context, new blocks within
 * free_count. Returns the new blocks it needs, with rel[b] = positions[b] - base (lengths before),
 * ends[b] = rel[b] + num_tokens, generations[b] = generation[slots[b]], pending set and last_used =
 * now; or -1 (nothing changed) when anything is otherwise. */
typedef struct {
    const int64_t *slots, *positions;
    int64_t batch, layer, num_layers, num_tokens, max_context, bl, free_count, capacity;
    const int64_t *base, *lengths, *num_blocks, *generation;
    uint8_t *pending;
    double *last_used, now;
    int64_t *rel, *generations; /* out [batch]: lengths before, the slots' generations */
    int32_t *ends;              /* out [batch]: lengths after (rel + num_tokens) */
} tkg_prepare;
int64_t tkg_append_prepare(const tkg_prepare *p);

/* A commit of a prepared plan of `batch` slots (their generations at prepare), lengths after `ends`:
 * new blocks taken from reserved (in order) at the tables' ends, lengths at `layer` set (grown: the
 * tokens added to each row's longest layer), pending cleared unless `hold`; out: the written slots
 * blocks/offsets [batch, num_tokens] int64, tables_out [batch, width] int32, and with `hold` the
 * blocks each row uses, row by row, in held (room batch * width; nheld of them). Returns 0, or -1
 * (nothing changed) when a slot was released since (generation moved), width is out of range or
 * reserved is short. */
typedef struct {
    const int64_t *slots, *generations;
    const int32_t *ends; /* int32, as the plan keeps them */
    int64_t batch, layer, num_layers, num_tokens, bl, hold, max_blocks, capacity;
    int32_t *tables;
    int64_t *num_blocks, *lengths;
    uint8_t *pending;
    const int64_t *generation_now;
    const int32_t *reserved;
    int64_t nreserved;
    int64_t *blocks, *offsets;
    int32_t *tables_out;
    int64_t width;
    int32_t *held;
    int64_t used, grown, nheld;
} tkg_commit;
int tkg_append_commit(tkg_commit *c);

/* ref[ids[i]] += delta (+1 or -1) for n distinct ids (int32 or int64: id_size 4 or 8), every one
 * held (ref > 0). Returns -1 (nothing changed) when an id is outside [0, nref), -2 (nothing
 * changed) when one is not held; else the number of ids whose count reached 0, written to `freed`
 * (room for n) in ids order, and *crossed = the ids whose count became 2 (delta +1) or 1 (-1). */
int64_t tkg_refcount_add(int32_t *ref, int64_t nref, const void *ids, int id_size, int64_t n, int delta,
                         int32_t *freed, int64_t *crossed);

/* 1 when (data[i] & mask) < limit for every i = itemsize - 1 + j * itemsize < len (every
 * little-endian value's top byte), else 0. chunk: 4096 bytes, a multiple of every itemsize. */
int tkg_top_bytes_below(const uint8_t *data, int64_t len, int itemsize, uint8_t mask, uint8_t limit);

#endif
