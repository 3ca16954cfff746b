/* tkg.kernel._native: the Python face of the native decode-attention kernel.
 *
 * attend(**problem) runs one call with the GIL released. Arrays travel as addresses (the
 * Python wrapper, tkg.kernel.cpu, checks shapes, dtypes and contiguity and keeps them alive),
 * which keeps this module free of the numpy C API and of build-time numpy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "tkg_native.h"

/* Best first: the first supported one is the default. amx leads: in three `tkg bench kernel
 * --dtype fp8 --variants amx` runs (cache cold, both variants timed call by call in the same run)
 * it won 23 of 24 case pairs against avx512bf16 and tied the last, bf16 by up to 13% and fp8 by
 * 16-35%. One caveat measured outside the bench: while other tenants held the memory (13 GB/s),
 * bf16 ran 15-30% behind in alternating processes (docs/kernel.md). TKG_CPU_VARIANT=avx512bf16
 * asks for the other. */
enum { V_AMX = 0, V_AVX512BF16 = 1, V_AVX512 = 2, V_AVX2 = 3, V_GENERIC = 4, NVARIANTS = 5 };
static const char *VARIANT_NAMES[NVARIANTS] = {"amx", "avx512bf16", "avx512", "avx2", "generic"};
static const tkg_item_fn VARIANT_FNS[NVARIANTS] = {tkg_item_amx, tkg_item_avx512bf16, tkg_item_avx512, tkg_item_avx2,
                                                   tkg_item_generic};

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

/* AMX needs the CPU's AMX-TILE and AMX-BF16 (CPUID.(7,0):EDX bits 24 and 22) and, on Linux, the
 * kernel's leave for this process to use tile data (arch_prctl ARCH_REQ_XCOMP_PERM, asked once;
 * it covers every thread of the process). Without the leave a tile instruction faults, so the
 * variant is only offered once the request succeeded. */
static int amx_usable(void) {
    static int state = -1; /* -1: not asked yet; set once under the GIL (module calls hold it) */
    if (state >= 0) return state;
    unsigned a, b, c, d;
    state = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1u) || !(d >> 22 & 1u)) return state;
#ifdef SYS_arch_prctl
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#endif
    return state;
}
#endif

static int variant_supported(int v) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (v) {
    case V_AMX:
        return variant_supported(V_AVX512BF16) && __builtin_cpu_supports("avx512vbmi") && amx_usable();
    case V_AVX512BF16:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case V_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case V_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default:
        return 1;
    }
#else
    return v == V_GENERIC;
#endif
}

int tkg_padded_d(int d) { return (d + 15) / 16 * 16; }

int64_t tkg_ws_floats(const tkg_problem *p) {
    int64_t dp = tkg_padded_d(p->d), nq = p->nq;
    int64_t nq4 = (nq + 3) / 4 * 4; /* bf16 queries: nq plain rows, then nq4 rows packed in groups of 4 */
    int64_t scratch = (nq * 4 + 15) / 16 * 16 + nq * dp + (nq4 * dp + 15) / 16 * 16 + 2 * TKG_CHUNK * dp +
                      nq * TKG_CHUNK + 512; /* 512: the AMX path's score tiles */
    int64_t partial = 2 * ((nq + 15) / 16 * 16) + nq * dp; /* m, l, acc of an unsplit item */
    return scratch + partial + 64;
}

/* ---- per-thread workspaces (kept across calls: no allocation on the hot path once warm) ---- */

#define MAX_WS 64
static tkg_workspace workspaces[MAX_WS];

static float *workspace(int worker, int64_t floats) {
    tkg_workspace *w = &workspaces[worker];
    if (w->cap < floats) {
        free(w->buf);
        w->buf = NULL;
        w->cap = 0;
        void *mem = NULL;
        if (posix_memalign(&mem, 64, (size_t)floats * sizeof(float)) != 0) return NULL;
        w->buf = (float *)mem;
        w->cap = floats;
    }
    return w->buf;
}

/* ---- output ---- */

static uint16_t f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                        /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static void store_row(void *out, int64_t index, const float *src, int d, int dtype) {
    if (dtype == TKG_F32) {
        memcpy((float *)out + index, src, sizeof(float) * (size_t)d);
    } else if (dtype == TKG_BF16) {
        uint16_t *o = (uint16_t *)out + index;
        for (int c = 0; c < d; c++) o[c] = f32_to_bf16(src[c]);
    } else {
        _Float16 *o = (_Float16 *)out + index;
        for (int c = 0; c < d; c++) o[c] = (_Float16)src[c];
    }
}

/* ---- one call ---- */

typedef struct {
    const tkg_problem *p;
    tkg_item_fn fn;
    int nitems;
    const int *order;     /* items, longest tasks first */
    float *partials;      /* nsplit > 1: per item m[nqp], l[nqp], acc[nq*dp] */
    int64_t part_floats;  /* floats per item in `partials` */
    atomic_int next;
    atomic_llong error;   /* first (task * nq + query) with nothing visible, or -1 */
    int oom;
} job_t;

static tkg_partial partial_at(float *base, int nq, int dp) {
    int nqp = (nq + 15) / 16 * 16;
    tkg_partial part = {base, base + nqp, base + 2 * nqp};
    (void)dp;
    return part;
}

/* Normalise a task's merged state into `out` (the sink joins the max and the denominator) and,
 * when asked, each query's lse = max + log(denominator) (the max and denominator with the sink). */
static void finalize(job_t *job, int task, tkg_partial part, float *row_buf) {
    const tkg_problem *p = job->p;
    int nq = p->nq, d = p->d, dp = tkg_padded_d(d);
    for (int r = 0; r < nq; r++) {
        int64_t at = (int64_t)task * nq + r;
        float m = part.m[r], l = part.l[r];
        float *acc = part.acc + (int64_t)r * dp;
        float denom = l, scale_acc = 1.0f, top = m;
        float sk = p->sinks ? p->sinks[at] : -INFINITY;
        if (sk > m) { /* the sink joins the max (a -inf sink is no sink) */
            scale_acc = m == -INFINITY ? 0.0f : expf(m - sk);
            denom = l * scale_acc + 1.0f;
            top = sk;
        } else if (p->sinks && m != -INFINITY) {
            denom = l + expf(sk - m);
        } else if (m == -INFINITY && p->empty_ok) { /* saw nothing: out 0, lse -inf */
            memset(row_buf, 0, sizeof(float) * (size_t)d);
            store_row(p->out, at * d, row_buf, d, p->out_dtype);
            if (p->lse) p->lse[at] = -INFINITY;
            continue;
        } else if (m == -INFINITY) {
            /* Keep the smallest (task, query), as the reference reports the first in order. */
            long long code = (long long)at, seen = atomic_load(&job->error);
            while ((seen < 0 || code < seen) && !atomic_compare_exchange_weak(&job->error, &seen, code)) {
            }
            denom = NAN;
        }
        /* denom >= 1 (the max's own term is exp(0)): a finite log (NaN only for the error above). */
        if (p->lse) p->lse[at] = top + logf(denom);
        float f = scale_acc / denom * p->out_scale;
        if (p->layout != TKG_LAYOUT_NATURAL) {
            for (int c = 0; c < d; c += 32)
                for (int i = 0; i < 32; i++) row_buf[c + tkg_layout_column(p->layout, i)] = acc[c + i] * f;
        } else {
            for (int c = 0; c < d; c++) row_buf[c] = acc[c] * f;
        }
        store_row(p->out, at * d, row_buf, d, p->out_dtype);
    }
}

/* Merge the nsplit partial states of a task into the first one. */
static tkg_partial merge(job_t *job, int task) {
    const tkg_problem *p = job->p;
    int nq = p->nq, dp = tkg_padded_d(p->d);
    tkg_partial into = partial_at(job->partials + (int64_t)task * p->nsplit * job->part_floats, nq, dp);
    for (int s = 1; s < p->nsplit; s++) {
        tkg_partial from = partial_at(job->partials + ((int64_t)task * p->nsplit + s) * job->part_floats, nq, dp);
        for (int r = 0; r < nq; r++) {
            float m1 = into.m[r], m2 = from.m[r];
            if (m2 == -INFINITY) continue;
            float m = m1 > m2 ? m1 : m2;
            float a1 = m1 == -INFINITY ? 0.0f : expf(m1 - m), a2 = expf(m2 - m);
            float *x = into.acc + (int64_t)r * dp, *y = from.acc + (int64_t)r * dp;
            for (int c = 0; c < dp; c++) x[c] = x[c] * a1 + y[c] * a2;
            into.l[r] = into.l[r] * a1 + from.l[r] * a2;
            into.m[r] = m;
        }
    }
    return into;
}

static void run_items(void *ctx, int worker) {
    job_t *job = (job_t *)ctx;
    const tkg_problem *p = job->p;
    int nq = p->nq, dp = tkg_padded_d(p->d);
    float *ws = workspace(worker, tkg_ws_floats(p) + TKG_MAX_D);
    if (!ws) {
        job->oom = 1;
        return;
    }
    int64_t scratch = tkg_ws_floats(p) - (2 * ((nq + 15) / 16 * 16) + (int64_t)nq * dp) - 64;
    float *own = ws + (scratch + 15) / 16 * 16;
    float *row_buf = ws + tkg_ws_floats(p);
    for (;;) {
        int i = atomic_fetch_add(&job->next, 1);
        if (i >= job->nitems) break;
        int item = job->order[i];
        if (p->nsplit == 1) {
            tkg_partial part = partial_at(own, nq, dp);
            job->fn(p, item, part, ws);
            finalize(job, item, part, row_buf);
        } else {
            job->fn(p, item, partial_at(job->partials + (int64_t)item * job->part_floats, nq, dp), ws);
        }
    }
}

static void run_merges(void *ctx, int worker) {
    job_t *job = (job_t *)ctx;
    float *row_buf = workspace(worker, tkg_ws_floats(job->p) + TKG_MAX_D);
    if (!row_buf) {
        job->oom = 1;
        return;
    }
    for (;;) {
        int task = atomic_fetch_add(&job->next, 1);
        if (task >= job->p->ntasks) break;
        finalize(job, task, merge(job, task), row_buf);
    }
}

typedef struct {
    int len, task;
} task_len;

static int by_length_desc(const void *a, const void *b) {
    const task_len *x = (const task_len *)a, *y = (const task_len *)b;
    return x->len != y->len ? y->len - x->len : x->task - y->task;
}

/* Returns threads used, or -1 when out of memory; *error = first fully masked query or -1. */
static int attend_nogil(const tkg_problem *p, tkg_item_fn fn, int threads, int pin, long long *error) {
    int nitems = p->ntasks * p->nsplit;
    task_len *tasks = malloc(sizeof(task_len) * (size_t)(p->ntasks + 1));
    int *order = malloc(sizeof(int) * (size_t)(nitems + 1));
    job_t job;
    memset(&job, 0, sizeof(job));
    job.p = p;
    job.fn = fn;
    job.nitems = nitems;
    job.order = order;
    atomic_init(&job.next, 0);
    atomic_init(&job.error, -1);
    int nqp = (p->nq + 15) / 16 * 16;
    job.part_floats = 2 * nqp + (int64_t)p->nq * tkg_padded_d(p->d);
    if (p->nsplit > 1) {
        void *mem = NULL;
        if (posix_memalign(&mem, 64, sizeof(float) * (size_t)nitems * (size_t)job.part_floats) == 0)
            job.partials = (float *)mem;
    }
    if (!tasks || !order || (p->nsplit > 1 && !job.partials)) {
        free(tasks);
        free(order);
        free(job.partials);
        return -1;
    }
    /* Longest tasks first, so the ragged tail of the call is short. */
    for (int t = 0; t < p->ntasks; t++) tasks[t] = (task_len){p->nkeys[t / p->heads_per_row], t};
    qsort(tasks, (size_t)p->ntasks, sizeof(task_len), by_length_desc);
    for (int t = 0, i = 0; t < p->ntasks; t++)
        for (int s = 0; s < p->nsplit; s++) order[i++] = tasks[t].task * p->nsplit + s;
    int used = tkg_pool_run(threads, pin, run_items, &job);
    if (p->nsplit > 1 && !job.oom) {
        atomic_store(&job.next, 0);
        tkg_pool_run(threads, pin, run_merges, &job);
    }
    free(tasks);
    free(order);
    free(job.partials);
    *error = atomic_load(&job.error);
    return job.oom ? -1 : used;
}

static PyObject *py_attend(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"variant", "threads", "pin", "dtype", "out_dtype", "d", "nq", "ntasks",
                            "heads_per_row", "q", "score_scale", "q_bf16_exact", "k", "v", "head_stride",
                            "block_stride", "bl", "table", "table_stride", "nkeys", "causal_s", "window",
                            "ranges", "act_n", "ka", "va", "act_mask", "sinks", "out", "nsplit", "prior_mask",
                            "prior_mask_stride", "out_scale", "lse", "q_start", "empty_ok", NULL};
    tkg_problem p;
    memset(&p, 0, sizeof(p));
    int variant, threads, pin;
    unsigned long long q, k, v, table, nkeys, ranges, ka, va, act_mask, sinks, out, prior_mask = 0;
    unsigned long long lse = 0, q_start = 0;
    long long head_stride, block_stride, table_stride, prior_mask_stride = 0;
    p.out_scale = 1.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iipiiiiiiKfpKKLLiKLKiiKiKKKKKi|KLfKKp", names, &variant, &threads, &pin,
                                     &p.dtype, &p.out_dtype, &p.d, &p.nq, &p.ntasks, &p.heads_per_row, &q,
                                     &p.score_scale, &p.q_bf16_exact, &k, &v, &head_stride, &block_stride, &p.bl,
                                     &table, &table_stride, &nkeys, &p.causal_s, &p.window, &ranges, &p.act_n, &ka,
                                     &va, &act_mask, &sinks, &out, &p.nsplit, &prior_mask,
                                     &prior_mask_stride, &p.out_scale, &lse, &q_start, &p.empty_ok))
        return NULL;
    if (variant < 0 || variant >= NVARIANTS || !variant_supported(variant))
        return PyErr_Format(PyExc_ValueError, "variant: %d is not supported on this CPU", variant);
    if (p.dtype < 0 || p.dtype > 3 || p.out_dtype < 0 || p.out_dtype > 2)
        return PyErr_Format(PyExc_ValueError,
                            "dtype/out_dtype: expected 0 (f32), 1 (bf16), 2 (f16) or (dtype only) 3 (fp8 e4m3)");
    if (p.d < 1 || p.d > TKG_MAX_D) return PyErr_Format(PyExc_ValueError, "d: %d not in [1, %d]", p.d, TKG_MAX_D);
    if (p.nq < 1 || p.ntasks < 0 || p.heads_per_row < 1 || p.bl < 1 || p.nsplit < 1 || p.act_n < 0 || p.act_n > 16)
        return PyErr_Format(PyExc_ValueError,
                            "expected nq >= 1, ntasks >= 0, heads_per_row >= 1, bl >= 1, nsplit >= 1, "
                            "0 <= act_n <= 16");
    if (!ranges && p.causal_s < 1) return PyErr_Format(PyExc_ValueError, "causal_s: must be >= 1 without ranges");
    if (ranges && q_start) return PyErr_Format(PyExc_ValueError, "q_start: expected 0 (none) when ranges are given");
    if (p.act_n && (!ka || !va || !act_mask)) return PyErr_Format(PyExc_ValueError, "act_n > 0 needs ka, va, act_mask");
    p.q = (const float *)(uintptr_t)q;
    p.k = (const void *)(uintptr_t)k;
    p.v = (const void *)(uintptr_t)v;
    p.head_stride = head_stride;
    p.block_stride = block_stride;
    p.table = (const int32_t *)(uintptr_t)table;
    p.table_stride = table_stride;
    p.nkeys = (const int32_t *)(uintptr_t)nkeys;
    p.ranges = (const int32_t *)(uintptr_t)ranges;
    p.ka = (const float *)(uintptr_t)ka;
    p.va = (const float *)(uintptr_t)va;
    p.act_mask = (const uint8_t *)(uintptr_t)act_mask;
    p.sinks = (const float *)(uintptr_t)sinks;
    p.prior_mask = (const uint8_t *)(uintptr_t)prior_mask;
    p.prior_mask_stride = prior_mask_stride;
    p.out = (void *)(uintptr_t)out;
    p.lse = (float *)(uintptr_t)lse;
    p.q_start = (const int64_t *)(uintptr_t)q_start;
    p.layout = TKG_LAYOUT_NATURAL;
    const int bf16_products = variant == V_AVX512BF16 || variant == V_AMX;
    if (p.dtype == TKG_BF16 && p.d % 32 == 0) p.layout = bf16_products ? TKG_LAYOUT_UNPACK : TKG_LAYOUT_SPLIT;
    /* fp8 pools take the bf16 product paths (rows decoded to bf16 per chunk) on AVX-512-BF16. */
    if (p.dtype == TKG_FP8 && p.d % 32 == 0 && bf16_products) p.layout = TKG_LAYOUT_UNPACK;
#if defined(__x86_64__) || defined(__i386__)
    p.vbmi = bf16_products && __builtin_cpu_supports("avx512vbmi");
#endif
    long long error = -1;
    int used = 0;
    if (p.ntasks > 0) {
        Py_BEGIN_ALLOW_THREADS;
        used = attend_nogil(&p, VARIANT_FNS[variant], threads, pin, &error);
        Py_END_ALLOW_THREADS;
    }
    if (used < 0) return PyErr_NoMemory();
    return Py_BuildValue("iL", used, error);
}

static PyObject *py_variants(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (int v = 0; v < NVARIANTS; v++) {
        if (!variant_supported(v)) continue;
        PyObject *s = PyUnicode_FromString(VARIANT_NAMES[v]);
        if (!s || PyList_Append(list, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(s);
    }
    return list;
}

/* ---- read-bandwidth probe: the kernel's own threads stream a buffer once ---- */

typedef struct {
    const char *buf;
    int64_t nbytes;
    atomic_llong next;
    atomic_llong sink; /* keeps the loads alive */
} read_job;

#define READ_PIECE (1 << 21) /* bytes claimed at a time, as items are */

static void run_read(void *ctx, int worker) {
    (void)worker;
    read_job *job = (read_job *)ctx;
    typedef long long v2 __attribute__((vector_size(16)));
    v2 acc[8] = {{0}};
    for (;;) {
        long long at = atomic_fetch_add(&job->next, READ_PIECE);
        if (at >= job->nbytes) break;
        int64_t end = at + READ_PIECE < job->nbytes ? at + READ_PIECE : job->nbytes;
        const v2 *p = (const v2 *)(job->buf + at), *e = (const v2 *)(job->buf + end);
        for (; p + 8 <= e; p += 8)
            for (int i = 0; i < 8; i++) acc[i] ^= p[i];
    }
    long long x = 0;
    for (int i = 0; i < 8; i++) x ^= acc[i][0] ^ acc[i][1];
    atomic_fetch_xor(&job->sink, x);
}

static PyObject *py_read_probe(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"buf", "nbytes", "threads", "pin", NULL};
    unsigned long long buf;
    long long nbytes;
    int threads, pin;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KLip", names, &buf, &nbytes, &threads, &pin)) return NULL;
    if (!buf || nbytes < 128 || nbytes % 128)
        return PyErr_Format(PyExc_ValueError, "nbytes: %lld must be a positive multiple of 128", nbytes);
    if (threads < 1) return PyErr_Format(PyExc_ValueError, "threads: %d must be >= 1", threads);
    read_job job;
    job.buf = (const char *)(uintptr_t)buf;
    job.nbytes = nbytes;
    atomic_init(&job.next, 0);
    atomic_init(&job.sink, 0);
    int used;
    Py_BEGIN_ALLOW_THREADS;
    used = tkg_pool_run(threads, pin, run_read, &job);
    Py_END_ALLOW_THREADS;
    return PyLong_FromLong(used);
}

static PyObject *py_pool_size(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(tkg_pool_size());
}

/* ---- per-step host work (host_ops.c): addresses in, the Python side keeps the arrays alive ---- */

static PyObject *py_rope_qk(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"q", "k", "q_out", "k_out", "q_dtype", "k_dtype", "d", "batch", "hq", "hkv",
                            "tokens", "positions", "cos2", "sin2", "table_rows", NULL};
    unsigned long long q, k, q_out, k_out, positions, cos2, sin2;
    tkg_rope r;
    memset(&r, 0, sizeof(r));
    long long batch, hq, hkv, tokens, table_rows;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKKKiiiLLLLKKKL", names, &q, &k, &q_out, &k_out, &r.q_dtype,
                                     &r.k_dtype, &r.d, &batch, &hq, &hkv, &tokens, &positions, &cos2, &sin2,
                                     &table_rows))
        return NULL;
    if (r.q_dtype < 0 || r.q_dtype > 2 || r.k_dtype < 0 || r.k_dtype > 2)
        return PyErr_Format(PyExc_ValueError, "q_dtype/k_dtype: expected 0 (f32), 1 (bf16) or 2 (f16)");
    if (r.d < 2 || r.d > TKG_MAX_D || r.d % 2)
        return PyErr_Format(PyExc_ValueError, "d: %d; expected an even number in [2, %d]", r.d, TKG_MAX_D);
    if (batch < 0 || hq < 0 || hkv < 0 || tokens < 0 || table_rows < 0)
        return PyErr_Format(PyExc_ValueError, "batch, hq, hkv, tokens, table_rows: expected >= 0");
    r.q = (const void *)(uintptr_t)q;
    r.k = (const void *)(uintptr_t)k;
    r.q_out = (void *)(uintptr_t)q_out;
    r.k_out = (void *)(uintptr_t)k_out;
    r.batch = batch;
    r.hq = hq;
    r.hkv = hkv;
    r.tokens = tokens;
    r.positions = (const int64_t *)(uintptr_t)positions;
    r.cos2 = (const float *)(uintptr_t)cos2;
    r.sin2 = (const float *)(uintptr_t)sin2;
    r.table_rows = table_rows;
    /* The GIL stays held: a step's rotation is tens of microseconds, less than handing the GIL over. */
    if (tkg_rope_qk(&r) < 0)
        return PyErr_Format(PyExc_ValueError, "positions: expected every position in [0, %lld)", table_rows);
    Py_RETURN_NONE;
}

static PyObject *py_scatter_rows(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"dst", "dst_head_stride", "num_blocks", "bl", "src", "src_strides", "heads", "n0", "n1",
                            "d", "itemsize", "blocks", "offsets", "release_gil", NULL};
    unsigned long long dst, src, blocks, offsets;
    long long hs, nb, bl, s0, s1, s2, heads, n0, n1;
    int release = 0;
    tkg_scatter w;
    memset(&w, 0, sizeof(w));
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KLLLK(LLL)LLLiiKKp", names, &dst, &hs, &nb, &bl, &src, &s0, &s1, &s2,
                                     &heads, &n0, &n1, &w.d, &w.itemsize, &blocks, &offsets, &release))
        return NULL;
    if (w.d < 1 || w.itemsize < 1 || heads < 0 || n0 < 0 || n1 < 0 || nb < 0 || bl < 1)
        return PyErr_Format(PyExc_ValueError, "d, itemsize, bl: expected >= 1; heads, n0, n1, num_blocks: >= 0");
    w.dst = (void *)(uintptr_t)dst;
    w.dst_head_stride = hs;
    w.num_blocks = nb;
    w.bl = bl;
    w.src = (const void *)(uintptr_t)src;
    w.src_strides[0] = s0;
    w.src_strides[1] = s1;
    w.src_strides[2] = s2;
    w.heads = heads;
    w.n0 = n0;
    w.n1 = n1;
    w.blocks = (const int64_t *)(uintptr_t)blocks;
    w.offsets = (const int64_t *)(uintptr_t)offsets;
    int rc;
    if (release) { /* a bulk write off the event loop: let the loop run meanwhile */
        Py_BEGIN_ALLOW_THREADS;
        rc = tkg_scatter_rows(&w);
        Py_END_ALLOW_THREADS;
    } else {
        rc = tkg_scatter_rows(&w);
    }
    if (rc < 0)
        return PyErr_Format(PyExc_ValueError, "blocks/offsets: expected blocks in [0, %lld) and offsets in [0, %lld)",
                            nb, bl);
    Py_RETURN_NONE;
}

/* The append ops' arrays come as numpy arrays (buffers), not addresses: a dozen of them per call,
 * and reading each one's address in Python costs more than the whole pass. */
typedef struct {
    Py_buffer views[16];
    int n;
} tkg_views;

static void release_views(tkg_views *v) {
    for (int i = 0; i < v->n; i++) PyBuffer_Release(&v->views[i]);
    v->n = 0;
}

/* The memory of `o`, C-contiguous, of at least `count` items of `itemsize` bytes (writable when
 * asked); NULL with ValueError naming `name` otherwise. Released by release_views. */
static void *view_of(tkg_views *v, PyObject *o, Py_ssize_t itemsize, Py_ssize_t count, int writable, const char *name) {
    Py_buffer *view = &v->views[v->n];
    if (PyObject_GetBuffer(o, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return NULL;
    v->n++;
    if (view->itemsize != itemsize || view->len < count * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes, got %zd bytes of %zd-byte items", name,
                     count, itemsize, view->len, view->itemsize);
        return NULL;
    }
    return view->buf;
}

static PyObject *py_append_prepare(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *slots, *positions, *base, *lengths, *pending, *num_blocks, *last_used, *generation, *rel, *ends, *gens;
    tkg_prepare p;
    memset(&p, 0, sizeof(p));
    long long layer, num_layers, num_tokens, max_context, bl, free_count;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOLLLLLLd", &slots, &positions, &base, &lengths, &pending, &num_blocks,
                          &last_used, &generation, &rel, &ends, &gens, &layer, &num_layers, &num_tokens, &max_context,
                          &bl, &free_count, &p.now))
        return NULL;
    if (num_layers < 1 || layer < 0 || layer >= num_layers || num_tokens < 1 || bl < 1)
        return PyErr_Format(PyExc_ValueError, "layer in [0, num_layers), num_tokens and bl: expected >= 1");
    tkg_views v = {.n = 0};
    PyObject *out = NULL;
    Py_ssize_t B = PyObject_Length(slots), cap = PyObject_Length(base);
    if (B < 0 || cap < 0) goto done;
    p.batch = B;
    p.capacity = cap;
    p.layer = layer;
    p.num_layers = num_layers;
    p.num_tokens = num_tokens;
    p.max_context = max_context;
    p.bl = bl;
    p.free_count = free_count;
    if (!(p.slots = view_of(&v, slots, 8, B, 0, "slots")) || !(p.positions = view_of(&v, positions, 8, B, 0, "positions")) ||
        !(p.base = view_of(&v, base, 8, cap, 0, "base")) ||
        !(p.lengths = view_of(&v, lengths, 8, cap * num_layers, 0, "lengths")) ||
        !(p.pending = view_of(&v, pending, 1, cap * num_layers, 1, "pending")) ||
        !(p.num_blocks = view_of(&v, num_blocks, 8, cap, 0, "num_blocks")) ||
        !(p.last_used = view_of(&v, last_used, 8, cap, 1, "last_used")) ||
        !(p.generation = view_of(&v, generation, 8, cap, 0, "generation")) || !(p.rel = view_of(&v, rel, 8, B, 1, "rel")) ||
        !(p.ends = view_of(&v, ends, 4, B, 1, "ends")) || !(p.generations = view_of(&v, gens, 8, B, 1, "generations")))
        goto done;
    out = PyLong_FromLongLong(tkg_append_prepare(&p));
done:
    release_views(&v);
    return out;
}

static PyObject *py_append_commit(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *slots, *generations, *ends, *tables, *num_blocks, *lengths, *pending, *gen_now, *reserved, *blocks,
        *offsets, *tables_out, *held;
    tkg_commit c;
    memset(&c, 0, sizeof(c));
    long long layer, num_layers, num_tokens, bl, hold, max_blocks, width;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOLLLLLLL", &slots, &generations, &ends, &tables, &num_blocks, &lengths,
                          &pending, &gen_now, &reserved, &blocks, &offsets, &tables_out, &held, &layer, &num_layers,
                          &num_tokens, &bl, &hold, &max_blocks, &width))
        return NULL;
    if (num_layers < 1 || layer < 0 || layer >= num_layers || num_tokens < 1 || bl < 1 || max_blocks < 1 || width < 1)
        return PyErr_Format(PyExc_ValueError,
                            "layer in [0, num_layers), num_tokens, bl, max_blocks and width: expected >= 1");
    tkg_views v = {.n = 0};
    PyObject *out = NULL;
    Py_ssize_t B = PyObject_Length(slots), cap = PyObject_Length(num_blocks), nres = PyObject_Length(reserved);
    if (B < 0 || cap < 0 || nres < 0) goto done;
    c.batch = B;
    c.capacity = cap;
    c.nreserved = nres;
    c.layer = layer;
    c.num_layers = num_layers;
    c.num_tokens = num_tokens;
    c.bl = bl;
    c.hold = hold;
    c.max_blocks = max_blocks;
    c.width = width;
    if (!(c.slots = view_of(&v, slots, 8, B, 0, "slots")) ||
        !(c.generations = view_of(&v, generations, 8, B, 0, "generations")) ||
        !(c.ends = view_of(&v, ends, 4, B, 0, "ends")) ||
        !(c.tables = view_of(&v, tables, 4, cap * max_blocks, 1, "tables")) ||
        !(c.num_blocks = view_of(&v, num_blocks, 8, cap, 1, "num_blocks")) ||
        !(c.lengths = view_of(&v, lengths, 8, cap * num_layers, 1, "lengths")) ||
        !(c.pending = view_of(&v, pending, 1, cap * num_layers, 1, "pending")) ||
        !(c.generation_now = view_of(&v, gen_now, 8, cap, 0, "generation")) ||
        !(c.reserved = view_of(&v, reserved, 4, nres, 0, "reserved")) ||
        !(c.blocks = view_of(&v, blocks, 8, B * num_tokens, 1, "blocks")) ||
        !(c.offsets = view_of(&v, offsets, 8, B * num_tokens, 1, "offsets")) ||
        !(c.tables_out = view_of(&v, tables_out, 4, B * width, 1, "tables_out")) ||
        !(c.held = view_of(&v, held, 4, hold ? B * width : 0, 1, "held")))
        goto done;
    if (tkg_append_commit(&c) < 0) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    out = Py_BuildValue("LLL", (long long)c.used, (long long)c.grown, (long long)c.nheld);
done:
    release_views(&v);
    return out;
}

static PyObject *py_rope_store(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *q, *k, *v, *q_out, *positions, *cos2, *sin2, *k_pool, *v_pool, *blocks, *offsets;
    tkg_rope r;
    tkg_kv_dst w;
    memset(&r, 0, sizeof(r));
    memset(&w, 0, sizeof(w));
    long long batch, hq, hkv, tokens, table_rows, nb, bl;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOiiiLLLLLLL", &q, &k, &v, &q_out, &positions, &cos2, &sin2, &k_pool,
                          &v_pool, &blocks, &offsets, &r.q_dtype, &r.k_dtype, &r.d, &batch, &hq, &hkv, &tokens,
                          &table_rows, &nb, &bl))
        return NULL;
    if (r.q_dtype < 0 || r.q_dtype > 2 || r.k_dtype < 0 || r.k_dtype > 2)
        return PyErr_Format(PyExc_ValueError, "q_dtype/k_dtype: expected 0 (f32), 1 (bf16) or 2 (f16)");
    if (r.d < 2 || r.d > TKG_MAX_D || r.d % 2)
        return PyErr_Format(PyExc_ValueError, "d: %d; expected an even number in [2, %d]", r.d, TKG_MAX_D);
    if (batch < 0 || hq < 0 || hkv < 0 || tokens < 0 || table_rows < 0 || nb < 0 || bl < 1)
        return PyErr_Format(PyExc_ValueError, "batch, hq, hkv, tokens, table_rows, num_blocks: expected >= 0; bl >= 1");
    Py_ssize_t qs = r.q_dtype == 0 ? 4 : 2, ks = r.k_dtype == 0 ? 4 : 2, n = batch * tokens;
    tkg_views vw = {.n = 0};
    PyObject *out = NULL;
    if (!(r.q = view_of(&vw, q, qs, batch * hq * tokens * r.d, 0, "q")) ||
        !(r.k = view_of(&vw, k, ks, batch * hkv * tokens * r.d, 0, "k")) ||
        !(w.v = view_of(&vw, v, ks, batch * hkv * tokens * r.d, 0, "v")) ||
        !(r.q_out = view_of(&vw, q_out, qs, batch * hq * tokens * r.d, 1, "q_out")) ||
        !(r.positions = view_of(&vw, positions, 8, n, 0, "positions")) ||
        !(r.cos2 = view_of(&vw, cos2, 4, table_rows * r.d, 0, "cos2")) ||
        !(r.sin2 = view_of(&vw, sin2, 4, table_rows * r.d, 0, "sin2")) ||
        !(w.k_pool = view_of(&vw, k_pool, ks, hkv * nb * bl * r.d, 1, "k_pool")) ||
        !(w.v_pool = view_of(&vw, v_pool, ks, hkv * nb * bl * r.d, 1, "v_pool")) ||
        !(w.blocks = view_of(&vw, blocks, 8, n, 0, "blocks")) || !(w.offsets = view_of(&vw, offsets, 8, n, 0, "offsets")))
        goto done;
    r.batch = batch;
    r.hq = hq;
    r.hkv = hkv;
    r.tokens = tokens;
    r.table_rows = table_rows;
    w.num_blocks = nb;
    w.bl = bl;
    /* The GIL stays held, as for rope_qk: a step's pass is tens of microseconds. */
    int rc = tkg_rope_store(&r, &w);
    if (rc == -1)
        PyErr_Format(PyExc_ValueError, "positions: expected every position in [0, %lld)", table_rows);
    else if (rc < 0)
        PyErr_Format(PyExc_ValueError, "blocks/offsets: expected blocks in [0, %lld) and offsets in [0, %lld)", nb, bl);
    else
        out = Py_NewRef(Py_None);
done:
    release_views(&vw);
    return out;
}

static PyObject *py_refcount_add(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long ref, ids, freed;
    long long nref, n;
    int id_size, delta;
    if (!PyArg_ParseTuple(args, "KLKiLiK", &ref, &nref, &ids, &id_size, &n, &delta, &freed)) return NULL;
    if ((id_size != 4 && id_size != 8) || (delta != 1 && delta != -1) || n < 0 || nref < 0)
        return PyErr_Format(PyExc_ValueError, "id_size: expected 4 or 8; delta: +1 or -1; n, nref: >= 0");
    int64_t crossed = 0;
    int64_t k = tkg_refcount_add((int32_t *)(uintptr_t)ref, nref, (const void *)(uintptr_t)ids, id_size, n, delta,
                                 (int32_t *)(uintptr_t)freed, &crossed);
    if (k == -1) return PyErr_Format(PyExc_IndexError, "ids: expected every id in [0, %lld)", nref);
    if (k == -2) return PyErr_Format(PyExc_ValueError, "ids: a block is not held (reference count 0)");
    return Py_BuildValue("LL", (long long)k, (long long)crossed);
}

static PyObject *py_top_bytes_below(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    int itemsize, mask, limit;
    if (!PyArg_ParseTuple(args, "y*iii", &buf, &itemsize, &mask, &limit)) return NULL;
    if (itemsize < 1 || itemsize > 8 || mask < 0 || mask > 255 || limit < 0 || limit > 256) {
        PyBuffer_Release(&buf);
        return PyErr_Format(PyExc_ValueError, "itemsize: expected 1..8; mask: 0..255; limit: 0..256");
    }
    /* limit 256: every byte passes. */
    int ok = limit == 256 ? 1 : tkg_top_bytes_below((const uint8_t *)buf.buf, (int64_t)buf.len, itemsize,
                                                   (uint8_t)mask, (uint8_t)limit);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"attend", (PyCFunction)(void (*)(void))py_attend, METH_VARARGS | METH_KEYWORDS,
     "attend(**problem) -> (threads_used, first_fully_masked_query_or_-1); see kernel/native/tkg_native.h"},
    {"variants", py_variants, METH_NOARGS, "Kernel variants this CPU supports, best first."},
    {"read_probe", (PyCFunction)(void (*)(void))py_read_probe, METH_VARARGS | METH_KEYWORDS,
     "read_probe(buf, nbytes, threads, pin) -> threads used: the kernel's pool reads the buffer once."},
    {"pool_size", py_pool_size, METH_NOARGS, "Threads of the persistent pool (including the caller)."},
    {"rope_qk", (PyCFunction)(void (*)(void))py_rope_qk, METH_VARARGS | METH_KEYWORDS,
     "rope_qk(**addresses and shapes): a decode step's RoPE of q and k; see tkg_rope in tkg_native.h."},
    {"refcount_add", py_refcount_add, METH_VARARGS,
     "refcount_add(ref, nref, ids, id_size, n, delta, freed) -> (freed count, crossed); see tkg_native.h."},
    {"top_bytes_below", py_top_bytes_below, METH_VARARGS,
     "top_bytes_below(data, itemsize, mask, limit) -> bool: every value's top byte & mask < limit."},
    {"rope_store", py_rope_store, METH_VARARGS,
     "rope_store(q, k, v, q_out, positions, cos2, sin2, k_pool, v_pool, blocks, offsets, q_dtype, k_dtype, d, batch, "
     "hq, hkv, tokens, table_rows, num_blocks, bl): a step's RoPE of q and k with k and v into their pool slots "
     "(arrays as buffers); see tkg_rope_store in tkg_native.h."},
    {"append_prepare", py_append_prepare, METH_VARARGS,
     "append_prepare(slots, positions, base, lengths, pending, num_blocks, last_used, generation, rel, ends, "
     "generations, layer, num_layers, num_tokens, max_context, bl, free_count, now) -> new blocks, or -1; see "
     "tkg_prepare in tkg_native.h."},
    {"append_commit", py_append_commit, METH_VARARGS,
     "append_commit(slots, generations, ends, tables, num_blocks, lengths, pending, generation, reserved, blocks, "
     "offsets, tables_out, held, layer, num_layers, num_tokens, bl, hold, max_blocks, width) -> (used, grown, "
     "nheld), or None; see tkg_commit in tkg_native.h."},
    {"scatter_rows", (PyCFunction)(void (*)(void))py_scatter_rows, METH_VARARGS | METH_KEYWORDS,
     "scatter_rows(**addresses and shapes): new K/V rows into pool slots; see tkg_scatter in tkg_native.h."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_native", "Native CPU decode-attention kernel.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    PyObject *names = PyTuple_New(NVARIANTS);
    if (!names) return NULL;
    for (int v = 0; v < NVARIANTS; v++) PyTuple_SET_ITEM(names, v, PyUnicode_FromString(VARIANT_NAMES[v]));
    if (PyModule_AddObject(m, "VARIANT_NAMES", names) < 0) return NULL;
    return m;
}
