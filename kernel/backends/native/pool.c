/* A persistent thread pool for the kernel: workers are created once, optionally pinned one per
 * allowed CPU, and sleep on a condition variable between calls (the cores are shared with the
 * gRPC server and other processes, so idle workers must not spin). The calling thread is
 * worker 0 and does its share; one call runs at a time. Work is claimed item by item, so once the
 * caller runs out of items it waits only for the workers that joined and are finishing theirs: a
 * worker still asleep or descheduled by then (a busy core) skips the call instead of holding it. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>

#include "tkg_native.h"

#define MAX_THREADS 64

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one kernel call at a time */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_start = PTHREAD_COND_INITIALIZER;
static pthread_cond_t cv_done = PTHREAD_COND_INITIALIZER;
static int nworkers;      /* threads created (excluding callers) */
static uint64_t gen;      /* bumped per call; workers run when it changes */
static int active;        /* workers 1..active may take part in the current call */
static int accepting;     /* the current call still takes workers (until the caller's share is done) */
static int pending;       /* workers that joined the current call and have not finished */
static tkg_job_fn job_fn;
static void *job_ctx;

static void pin_to(int index) {
#ifdef __linux__
    cpu_set_t allowed, one;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return;
    int n = CPU_COUNT(&allowed);
    if (n <= 1) return;
    int want = index % n, seen = 0;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &allowed)) continue;
        if (seen++ == want) {
            CPU_ZERO(&one);
            CPU_SET(c, &one);
            pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
            return;
        }
    }
#else
    (void)index;
#endif
}

typedef struct {
    int index;
    int pin;
} worker_arg;

static worker_arg args[MAX_THREADS];

static void *worker_main(void *arg) {
    worker_arg *wa = (worker_arg *)arg;
    if (wa->pin) pin_to(wa->index);
    uint64_t seen = 0;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (gen == seen || wa->index > active || !accepting) {
            if (gen != seen) seen = gen; /* a call that does not need this worker, or is over */
            pthread_cond_wait(&cv_start, &mu);
        }
        seen = gen;
        pending++;
        tkg_job_fn fn = job_fn;
        void *ctx = job_ctx;
        pthread_mutex_unlock(&mu);
        fn(ctx, wa->index);
        pthread_mutex_lock(&mu);
        if (--pending == 0) pthread_cond_signal(&cv_done);
    }
    return NULL;
}

int tkg_pool_size(void) { return nworkers + 1; }

/* A forked child has none of the parent's workers: start over (and never inherit a held lock). */
static void after_fork_child(void) {
    pthread_mutex_init(&call_mu, NULL);
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&cv_start, NULL);
    pthread_cond_init(&cv_done, NULL);
    nworkers = 0;
    active = 0;
    accepting = 0;
    pending = 0;
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_child); }

int tkg_pool_run(int nthreads, int pin, tkg_job_fn fn, void *ctx) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    pthread_once(&fork_once, install_fork_handler);
    pthread_mutex_lock(&call_mu);
    pthread_mutex_lock(&mu);
    while (nworkers < nthreads - 1) {
        int index = nworkers + 1;
        args[index].index = index;
        args[index].pin = pin;
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, &args[index]);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* run with the threads we have */
        nworkers++;
    }
    int helpers = nthreads - 1 < nworkers ? nthreads - 1 : nworkers;
    job_fn = fn;
    job_ctx = ctx;
    active = helpers;
    accepting = 1;
    pending = 0;
    gen++;
    if (helpers) pthread_cond_broadcast(&cv_start);
    pthread_mutex_unlock(&mu);

    fn(ctx, 0);

    pthread_mutex_lock(&mu);
    accepting = 0; /* late workers skip this call; the job (on the caller's stack) ends below */
    while (pending > 0) pthread_cond_wait(&cv_done, &mu);
    pthread_mutex_unlock(&mu);
    pthread_mutex_unlock(&call_mu);
    return helpers + 1;
}
