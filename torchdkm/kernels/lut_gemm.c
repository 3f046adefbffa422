/* Many rows of x at once (a batch of sentences, a prompt): y = x W^T + bias as a GEMM whose weight operand is
 * unpacked from the indices a panel at a time, so W is never written whole and each weight is decoded once.
 *
 * Why not decode W into a buffer and call torch's GEMM (lut.py's tiles: more rows of a large weight, and
 * machines without AVX-512): the decode itself is cheap (~0.08 ms for MiniLM's 384x1536 on 2 cores), but
 * any 2.4 MB written just before the GEMM (the decoded weight, or even a copy of the dense one) made the GEMM
 * ~0.3 ms slower: the tiles ran MiniLM at batch 8 x 64 at 0.83x fp32, this GEMM at 0.90x; at 24 rows, where
 * torch's GEMM is least efficient, 0.72x and 1.54x.  Here a panel of NR outputs x KC inputs (32 KB) is
 * decoded, transposed in registers to the layout the inner kernel reads (k-major, NR outputs a row), and
 * used at once by every row of x, so it never leaves L1.
 *
 * Loops: blocks of MC rows of x; in each, blocks of KC inputs, whose slice of the rows the team's threads pack
 * together (MR rows interleaved, MC x KC floats, shared; it stays in L2 for all the panels); then each thread
 * takes the block's panels of NR outputs one at a time (the two cores of a shared machine do not run at one
 * speed: a fixed split left one waiting); for each panel, the inner kernel: MR rows of x x NR outputs in
 * 2 * MR vector accumulators, one broadcast of x and two panel loads per 2 * MR FMAs (the usual outer-product
 * micro-kernel; alone it runs at ~90 % of a core's FMA peak here).  The first KC block starts from the bias
 * (or zero), later ones from y.  float32 throughout: sums in another order than torch's GEMM, within lut.py's
 * RTOL.
 */
#include <pthread.h>

#include "lut.h"

#define NR GEMM_PANEL /* outputs of a panel: two AVX-512 vectors (32) */
#define KC 256 /* inputs of a panel: a multiple of every vectorised chunk (16 * dim weights, dim <= 4) */
#define MR 14  /* rows of x per inner kernel call: 28 accumulators of 32 registers (12: ~2 % slower) */
#define MC 512 /* rows of x per block: their KC-slice, 512 KB, stays in L2 */

#if HAVE_X86

/* Transpose a 16 x 16 block in registers (r[i] row i in, column i out). */
AVX512 INLINE void transpose16(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 8; i++)
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]), t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    for (int i = 0; i < 4; i++) { /* r[4i + c], lane L: column 4L + c of rows 4i .. 4i + 3 */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int c = 0; c < 4; c++) { /* the 128-bit lanes: a 4 x 4 transpose */
        __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xee);
        __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44), u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xee);
        t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88), t[4 + c] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
        t[8 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88), t[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* dst[k * ds + j] = src[j * ss + k] for k < kc and the lanes j of `lanes` (zero for j >= rows): up to 16
 * rows turned into columns, 16 x 16 blocks transposed in registers. */
AVX512 static void transpose_rows(const float *src, int64_t ss, int rows, int kc, float *dst, int64_t ds, __mmask16 lanes) {
    for (int k = 0; k < kc; k += 16) {
        __mmask16 m = kc - k >= 16 ? 0xffff : (__mmask16)((1u << (kc - k)) - 1u);
        __m512 r[16];
        for (int i = 0; i < 16; i++) r[i] = i < rows ? _mm512_maskz_loadu_ps(m, src + i * ss + k) : _mm512_setzero_ps();
        transpose16(r);
        for (int i = 0; i < 16 && k + i < kc; i++) _mm512_mask_storeu_ps(dst + (k + i) * ds, lanes, r[i]);
    }
}

/* NR entries of a (rows, blocks) table, column b from row o0 on (zero past nr), as two float32 vectors
 * (float16 tables widened 16 at a time, exactly). */
AVX512 static void column512(const void *table, int half, int64_t blocks, int64_t o0, int nr, int64_t b, __m512 *out) {
    if (half) {
        uint16_t h[NR] = {0};
        for (int j = 0; j < nr; j++) h[j] = ((const uint16_t *)table)[(o0 + j) * blocks + b];
        out[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
        out[1] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + 16)));
    } else {
        float f[NR] = {0};
        for (int j = 0; j < nr; j++) f[j] = ((const float *)table)[(o0 + j) * blocks + b];
        out[0] = _mm512_loadu_ps(f), out[1] = _mm512_loadu_ps(f + 16);
    }
}

/* panel[k * NR + j] = W[o0 + j, k0 + k] for j < nr, k < kc (zero for j >= nr); the block scales applied to
 * the transposed panel, where one block's scales for the NR outputs are two vectors (w * s + o, as decoded). */
AVX512 static void panel512(const palette *p, int64_t o0, int nr, int64_t k0, int kc, float *rows, float *panel) {
    tdkm_rows512_any(p, o0, nr, k0, k0 + kc, rows, KC);
    for (int j0 = 0; j0 < NR; j0 += 16) transpose_rows(rows + j0 * KC, KC, nr - j0, kc, panel + j0, NR, 0xffff);
    if (!p->scales) return;
    __m512 scale[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, shift[2] = {scale[0], scale[0]};
    for (int k = 0, b = -1; k < kc; k++) {
        if ((k0 + k) / p->block != b) {
            b = (int)((k0 + k) / p->block);
            column512(p->scales, (int)p->half, p->blocks, o0, nr, b, scale);
            if (p->offsets) column512(p->offsets, (int)p->half, p->blocks, o0, nr, b, shift);
        }
        for (int h = 0; h < 2; h++) {
            __m512 w = _mm512_mul_ps(_mm512_load_ps(panel + k * NR + 16 * h), scale[h]);
            _mm512_store_ps(panel + k * NR + 16 * h, p->offsets ? _mm512_add_ps(w, shift[h]) : w);
        }
    }
}

/* packed[(b / MR) * MR * kc + k * MR + b % MR] = x[b, k] for b in [b0, b1), a multiple of MR apart, and
 * k < kc (zero past mc): MR rows of x interleaved, so the kernel's broadcasts read one stream. */
AVX512 static void pack_rows(const float *x, int64_t xs, int64_t b0, int64_t b1, int64_t mc, int kc, float *packed) {
    for (int64_t b = b0; b < b1; b += MR)
        transpose_rows(x + b * xs, xs, (int)(mc - b < MR ? mc - b : MR), kc, packed + b * kc, MR, (__mmask16)((1u << MR) - 1u));
}

/* y[i, 0 .. NR) (+)= sum_k x[i, k] panel[k, 0 .. NR) for i < mr (x: MR rows packed by pack_rows); `first`:
 * start from bias (NULL: zero), else from y. */
AVX512 INLINE void kernel512(int kc, const float *x, const float *panel, float *y, int64_t ys,
                             const float *bias, int first, __mmask16 m0, __mmask16 m1, const int mr) {
    __m512 acc[MR][2];
    for (int i = 0; i < mr; i++) {
        if (first) {
            acc[i][0] = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
            acc[i][1] = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
        } else
            acc[i][0] = _mm512_maskz_loadu_ps(m0, y + i * ys), acc[i][1] = _mm512_maskz_loadu_ps(m1, y + i * ys + 16);
    }
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_load_ps(panel + k * NR), b1 = _mm512_load_ps(panel + k * NR + 16);
        for (int i = 0; i < mr; i++) {
            __m512 a = _mm512_set1_ps(x[k * MR + i]);
            acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]), acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < mr; i++)
        _mm512_mask_storeu_ps(y + i * ys, m0, acc[i][0]), _mm512_mask_storeu_ps(y + i * ys + 16, m1, acc[i][1]);
}

#define KERNEL(mr) kernel512(kc, x, panel, y, ys, bias, first, m0, m1, mr)
AVX512 static void kernel512_any(int kc, const float *x, const float *panel, float *y, int64_t ys,
                                 const float *bias, int first, __mmask16 m0, __mmask16 m1, int mr) {
    switch (mr) {
    case 14: KERNEL(14); break;
    case 13: KERNEL(13); break;
    case 12: KERNEL(12); break;
    case 11: KERNEL(11); break;
    case 10: KERNEL(10); break;
    case 9: KERNEL(9); break;
    case 8: KERNEL(8); break;
    case 7: KERNEL(7); break;
    case 6: KERNEL(6); break;
    case 5: KERNEL(5); break;
    case 4: KERNEL(4); break;
    case 3: KERNEL(3); break;
    case 2: KERNEL(2); break;
    default: KERNEL(1); break;
    }
}

/* Part `part` of `parts` (threads of one team): each block of rows of x packed by all the parts together into
 * `packed` ((MC + MR) x KC floats, shared), a barrier on each side of its use; the block's output panels taken
 * one at a time (taken[block]: the next one), as the cores of a shared machine do not run at one speed. */
AVX512 static void gemm512(const palette *p, int part, int parts, const float *x, int64_t xs, int64_t n, float *y,
                           int64_t ys, const float *bias, float *packed, int64_t *taken) {
    float rows[NR * KC] __attribute__((aligned(64))), panel[KC * NR] __attribute__((aligned(64)));
    int64_t panels = (ys + NR - 1) / NR, block = 0;
    for (int64_t b0 = 0; b0 < n; b0 += MC) {
        int64_t mc = n - b0 < MC ? n - b0 : MC, groups = (mc + MR - 1) / MR;
        for (int64_t k0 = 0; k0 < p->row_len; k0 += KC, block++) {
            int kc = (int)(p->row_len - k0 < KC ? p->row_len - k0 : KC);
            pack_rows(x + b0 * xs + k0, xs, groups * part / parts * MR, groups * (part + 1) / parts * MR, mc, kc, packed);
            if (parts > 1) tdkm_barrier();
            for (int64_t t; (t = __atomic_fetch_add(taken + block, 1, __ATOMIC_RELAXED)) < panels;) {
                int64_t o = t * NR;
                int nr = (int)(ys - o < NR ? ys - o : NR);
                __mmask16 m0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1u);
                __mmask16 m1 = nr >= 32 ? 0xffff : nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1u);
                panel512(p, o, nr, k0, kc, rows, panel);
                for (int64_t b = 0; b < mc; b += MR) {
                    int mr = (int)(mc - b < MR ? mc - b : MR);
                    kernel512_any(kc, packed + b * kc, panel, y + (b0 + b) * ys + o, ys, bias ? bias + o : NULL, k0 == 0, m0, m1, mr);
                }
            }
            if (parts > 1) tdkm_barrier();
        }
    }
}
#endif

/* Whether tdkm_lut_gemm runs here (AVX-512, vectorised rows: dim 1, 2 or 4, no vector across rows; rows of at
 * least one input, as the first block of inputs writes y). */
int tdkm_lut_gemm_ok(const palette *p) {
    return HAVE_X86 && tdkm_lut_isa(-1) == ISA_AVX512 && (p->dim == 1 || p->dim == 2 || p->dim == 4) &&
           p->row_len > 0 && p->row_len % p->dim == 0;
}

static pthread_key_t buffer_key;
static pthread_once_t buffer_once = PTHREAD_ONCE_INIT;
static void make_buffer_key(void) { pthread_key_create(&buffer_key, free); }

/* The calling thread's buffer for packed rows of x ((MC + MR) x KC floats, 526 KiB), kept for its next call
 * (freed when the thread ends) and shared with the team it starts (NULL: out of memory). */
float *tdkm_lut_gemm_buffer(void) {
    pthread_once(&buffer_once, make_buffer_key);
    float *kept = (float *)pthread_getspecific(buffer_key);
    if (!kept && (kept = (float *)malloc(sizeof(float) * (MC + MR) * KC)) && pthread_setspecific(buffer_key, kept))
        free(kept), kept = NULL;
    return kept;
}

/* The blocks of rows and inputs a product of n rows of x goes through (tdkm_lut_gemm's `taken` counters). */
int64_t tdkm_lut_gemm_blocks(const palette *p, int64_t n) { return (n + MC - 1) / MC * ((p->row_len + KC - 1) / KC); }

/* Part `part` of `parts` of y = x W^T + bias (bias NULL: none; y's rows are ys = all the outputs long), every
 * part called at once on a team (tdkm_barrier), `packed` from tdkm_lut_gemm_buffer, `taken` zeroed counters
 * (tdkm_lut_gemm_blocks of them); only where tdkm_lut_gemm_ok says yes (pool.c asks before the team starts). */
int tdkm_lut_gemm(const palette *p, int part, int parts, const float *x, int64_t xs, int64_t n, float *y, int64_t ys,
                  const float *bias, float *packed, int64_t *taken) {
#if HAVE_X86
    gemm512(p, part, parts, x, xs, n, y, ys, bias, packed, taken);
#endif
    return 0;
}
