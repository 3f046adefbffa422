/* torchdkm's native inference loops: a palettized weight used straight from its packed indices and LUT
 * (built by torchdkm/kernels/build.py beside loops.c; the torch kernels in default.py compute the same,
 * and the tests compare the two).
 *
 * The weight W (out x row_len) is stored as a bit stream of `bits`-bit indices (pack.py's layout: index q
 * at stream bits [q * bits, (q + 1) * bits), least significant bit first) and a float32 LUT (G, K, dim)
 * (K = 2**bits entries).  Output channels go `group_size` at a time into G groups; inside a group the
 * weights are read in memory order and cut into `dim`-long vectors, `vectors` of them per group, so weight
 * (o, i) is component c = p % dim of vector v = p / dim of group g = o / group_size, where
 * p = (o % group_size) * row_len + i, and its index is stream entry g * vectors + v.
 *
 * Two loops: `rows` decodes whole rows (an embedding lookup, or a tile of a large-batch matmul that a GEMM
 * then multiplies), `gemv` computes y = x W^T for a few rows of x without writing W anywhere: each chunk of
 * 16 indices is unpacked in registers, looked up in the LUT (held in registers for up to 64 entries, in L1
 * for more) and multiplied into float32 accumulators.  A batch-1 product is bound by memory traffic:
 * reading 3-bit indices instead of float32 weights is ~10x fewer bytes.
 *
 * Block scales (torchdkm/cluster/scales.py): weight (o, i) is LUT[index] * scale[o, i / block]
 * (+ offset[o, i / block]).  `gemv` applies them to each chunk's looked-up weights with one multiply (or
 * FMA): a chunk must lie in one block, so the vector loops take them when `block` is a multiple of a
 * chunk's 16 * dim weights or a row is one block (lut.py sends other blocks to decode-a-tile-then-GEMM).
 * The scales are read as stored (float16, widened exactly when a row starts) or float32.  `rows` applies
 * them on request as the decoder does (w * s + o, two roundings), bit for bit.
 *
 * Instruction sets are chosen at run time (tdkm_lut_isa): AVX-512 (16 lanes), AVX2+FMA (8 lanes) or the
 * scalar loop; rows whose length is not a multiple of `dim` (a vector spans two rows) always take the
 * scalar loop.  Results differ from torch's matmul only by float32 summation order (FMA, lanes).
 *
 * The vector loops live in lut_avx512.c and lut_avx2.c; the palette view and the shared helpers in lut.h.
 */
#include "lut.h"

static int isa = -1; /* -1: not decided yet */

static int supported_isa(void) {
#if HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

/* want < 0: the current choice (the best supported one at first); else the best supported one up to want. */
int tdkm_lut_isa(int want) {
    int best = supported_isa();
    if (want >= 0) isa = want < best ? want : best;
    else if (isa < 0) isa = best;
    return isa;
}

/* Each 16-index chunk's block, for the rows' chunks (NULL without scales): the vector loops' lookup. */
static int32_t *chunk_blocks(const palette *p, int64_t chunks) {
    if (!p->scales) return NULL;
    int32_t *out = (int32_t *)malloc((size_t)(chunks > 0 ? chunks : 1) * sizeof(int32_t));
    if (out)
        for (int64_t c = 0; c < chunks; c++) out[c] = (int32_t)(c * CHUNK * p->dim / p->block);
    return out;
}

/* Whether rows of this palette take the vector loops: dim 1, 2 or 4, no vector across two rows. */
static int vectorised(const palette *p) {
    return (p->dim == 1 || p->dim == 2 || p->dim == 4) && p->row_len % p->dim == 0 && tdkm_lut_isa(-1) != ISA_SCALAR;
}

/* Whether the block scales (if any) leave every chunk in one block (else gemv takes the scalar loop). */
int tdkm_lut_whole_chunks(const palette *p) {
    return !p->scales || p->block >= p->row_len || p->block % (CHUNK * p->dim) == 0;
}

/* out[j * row_len ..] = row rows[j] of W, for j < n; `scaled`: with the block scales applied (w * s + o, two
 * roundings, as the decoder computes them), else the LUT entries. */
void tdkm_lut_rows(const palette *p, const int64_t *rows, int64_t n, float *out, int scaled) {
    int vector = vectorised(p), which = tdkm_lut_isa(-1);
    for (int64_t j = 0; j < n; j++, out += p->row_len) {
#if HAVE_X86
        if (vector && which == ISA_AVX512) tdkm_rows512_any(p, rows[j], 1, 0, p->row_len, out, 0);
        else if (vector && which == ISA_AVX2) tdkm_rows256_any(p, rows[j], 0, p->row_len, out);
        else
#endif
            row_scalar(p, rows[j], 0, p->row_len, out);
        if (scaled) scale_row(p, rows[j], 0, p->row_len, out);
    }
    (void)vector, (void)which;
}

/* y[b * ys + o] = sum_i x[b * xs + i] W[o, i] for o in [r0, r1) and b < nb (any nb: 8 rows of x at a time). */
int tdkm_lut_gemv(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, int64_t nb, float *y, int64_t ys) {
    int vector = vectorised(p) && tdkm_lut_whole_chunks(p), which = tdkm_lut_isa(-1);
    int32_t *cb = vector ? chunk_blocks(p, p->row_len / p->dim / CHUNK) : NULL;
    float *srow = vector && p->scales ? (float *)malloc((size_t)(2 * p->blocks) * sizeof(float)) : NULL;
    if (vector && p->scales && (!cb || !srow)) return free(cb), free(srow), -1; /* out of memory */
    while (nb > 0) {
        int step = nb >= 8 ? 8 : nb >= 4 ? 4 : nb >= 2 ? 2 : 1;
#if HAVE_X86
        if (vector && which == ISA_AVX512) tdkm_gemv512_any(p, r0, r1, x, xs, y, ys, cb, srow, step);
        else if (vector && which == ISA_AVX2) tdkm_gemv256_any(p, r0, r1, x, xs, y, ys, cb, srow, step);
        else
#endif
        {
            float row[4096];
            for (int64_t o = r0; o < r1; o++) {
                float sums[8] = {0};
                for (int64_t i0 = 0; i0 < p->row_len; i0 += 4096) {
                    int64_t i1 = i0 + 4096 < p->row_len ? i0 + 4096 : p->row_len;
                    row_scalar(p, o, i0, i1, row);
                    scale_row(p, o, i0, i1 - i0, row);
                    for (int b = 0; b < step; b++)
                        for (int64_t i = i0; i < i1; i++) sums[b] += row[i - i0] * x[b * xs + i];
                }
                for (int b = 0; b < step; b++) y[b * ys + o] = sums[b];
            }
        }
        x += step * xs, y += step * ys, nb -= step;
    }
    free(cb), free(srow);
    (void)vector, (void)which;
    return 0;
}
