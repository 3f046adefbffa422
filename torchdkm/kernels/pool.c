/* The inference loops' threads: torch's own OpenMP team (compiled with lut.c into one library).
 *
 * build.py compiles this file with OpenMP and links the library against the OpenMP runtime torch has
 * already loaded, so a `parallel` region here runs on the same threads as torch's operators: no second
 * team spinning beside torch's on the same cores.  (A pool of our own threads cost the same per call
 * as torch's team when alone, but each team's idle spinning took the cores from the other: SmolLM2
 * decoded at 0.6x fp32 with it, 2.4x on one thread.)  Without OpenMP the parts run one after another
 * and tdkm_openmp() says so, so the caller can split the work itself.
 *
 * GNU OpenMP cannot start a team in a child forked after its parent ran one (the child hangs), so, as torch
 * does for its own operators, a forked child runs the parts one after another.
 */
#include <pthread.h>
#include <stdint.h>

#include "lut.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static int forked = 0;
static void mark_forked(void) { forked = 1; }
__attribute__((constructor)) static void watch_forks(void) { pthread_atfork(NULL, NULL, mark_forked); }

typedef int (*tdkm_task)(void *arg, int part, int parts);

/* Whether parts run on threads (1) or one after another (0). */
int tdkm_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* task(arg, part, parts) for part in [0, parts) on up to `parts` threads (fewer parts where the team is
 * smaller); the last nonzero status a part returned, else 0. */
int tdkm_parallel(tdkm_task task, void *arg, int parts) {
    int status = 0;
    if (parts <= 1 || forked) return task(arg, 0, 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(parts)
    {
        int found = task(arg, omp_get_thread_num(), omp_get_num_threads());
        if (found) {
#pragma omp atomic write
            status = found;
        }
    }
#else
    for (int part = 0; part < parts; part++) {
        int found = task(arg, part, parts);
        if (found) status = found;
    }
#endif
    return status;
}

/* -- lut.c's loops over several threads: output rows split evenly ------------------------------------------- */
typedef struct {
    const palette *p;
    int64_t r0, r1, xs, nb, ys;
    const float *x;
    float *y;
} gemv_call;

static int gemv_part(void *arg, int part, int parts) {
    const gemv_call *c = (const gemv_call *)arg;
    int64_t rows = c->r1 - c->r0, first = c->r0 + rows * part / parts, last = c->r0 + rows * (part + 1) / parts;
    return first < last ? tdkm_lut_gemv(c->p, first, last, c->x, c->xs, c->nb, c->y, c->ys) : 0;
}

/* tdkm_lut_gemv over `threads` threads. */
int tdkm_lut_gemv_threads(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, int64_t nb, float *y,
                          int64_t ys, int threads) {
    gemv_call call = {p, r0, r1, xs, nb, ys, x, y};
    if (threads > r1 - r0) threads = (int)(r1 - r0);
    return tdkm_parallel(gemv_part, &call, threads < 1 ? 1 : threads);
}

typedef struct {
    const palette *p;
    const int64_t *rows;
    int64_t n;
    float *out;
    int scaled;
} rows_call;

static int rows_part(void *arg, int part, int parts) {
    const rows_call *c = (const rows_call *)arg;
    int64_t first = c->n * part / parts, last = c->n * (part + 1) / parts;
    if (first < last) tdkm_lut_rows(c->p, c->rows + first, last - first, c->out + first * c->p->row_len, c->scaled);
    return 0;
}

/* tdkm_lut_rows over `threads` threads: a whole weight decoded for a GEMM is written at both cores' speed. */
void tdkm_lut_rows_threads(const palette *p, const int64_t *rows, int64_t n, float *out, int scaled, int threads) {
    rows_call call = {p, rows, n, out, scaled};
    if (threads > n) threads = (int)n;
    tdkm_parallel(rows_part, &call, threads < 1 ? 1 : threads);
}

void tdkm_barrier(void) {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

typedef struct {
    const palette *p;
    const float *x, *bias;
    int64_t xs, n, ys;
    float *y, *packed;
    int64_t *taken;
} gemm_call;

static int gemm_part(void *arg, int part, int parts) {
    const gemm_call *c = (const gemm_call *)arg;
    return tdkm_lut_gemm(c->p, part, parts, c->x, c->xs, c->n, c->y, c->ys, c->bias, c->packed, c->taken);
}

/* tdkm_lut_gemm over `threads` threads of the team (one without OpenMP: its parts wait for each other), for
 * all `ys` outputs; 0, or -1: not available here, or out of memory. */
int tdkm_lut_gemm_threads(const palette *p, const float *x, int64_t xs, int64_t n, float *y, int64_t ys,
                          const float *bias, int threads) {
    if (!tdkm_lut_gemm_ok(p)) return -1;
    gemm_call call = {p, x, bias, xs, n, ys, y, tdkm_lut_gemm_buffer(), calloc((size_t)tdkm_lut_gemm_blocks(p, n) + 1, sizeof(int64_t))};
    int64_t panels = (ys + GEMM_PANEL - 1) / GEMM_PANEL;
    if (!call.packed || !call.taken) return free(call.taken), -1;
    if (threads > panels) threads = (int)panels;
    if (!tdkm_openmp() || threads < 1) threads = 1;
    int status = tdkm_parallel(gemm_part, &call, threads);
    free(call.taken);
    return status;
}
