/* The inference loops on AVX-512: 16 indices a chunk (see lut.c for what they compute, lut.h for the helpers). */
#include "lut.h"

#if HAVE_X86
typedef struct {
    __m512i pick, right, mask; /* per lane: the two bytes holding its bits, the shift, the bit mask */
    __m512 t[4];               /* the first 64 LUT entries (of this row's group), for the permutes */
    const float *table;
    int64_t entries;
} unpack512;

AVX512 INLINE unpack512 setup512(const palette *p, int64_t shift, const float *table) {
    unpack512 u;
    int32_t pick[16], right[16];
    float first[64];
    lanes(p->bits, shift, 16, pick, right);
    u.pick = _mm512_loadu_si512(pick), u.right = _mm512_loadu_si512(right);
    u.mask = _mm512_set1_epi32((1 << p->bits) - 1);
    u.entries = (int64_t)p->dim << p->bits;
    u.table = table;
    first_entries(table, u.entries < 64 ? u.entries : 64, p->dim, first);
    for (int j = 0; j < 4; j++) u.t[j] = _mm512_loadu_ps(first + 16 * j);
    return u;
}

AVX512 INLINE __m512i indices512(const uint8_t *src, const unpack512 *u, const int masked) {
    __m512i data = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)src));
    __m512i index = _mm512_srlv_epi32(_mm512_shuffle_epi8(data, u->pick), u->right);
    return masked ? _mm512_and_si512(index, u->mask) : index;
}

/* The lookup, by `mode` (a constant in each specialised copy: see mode_of): 0 a permute of 16 entries,
 * 1 of 32, 2 two of 32 and a blend (64), 3 a gather from the LUT in L1. */
AVX512 INLINE __m512 lookup512(__m512i key, const unpack512 *u, const int mode) {
    if (mode == 0) return _mm512_permutexvar_ps(key, u->t[0]);
    if (mode == 1) return _mm512_permutex2var_ps(u->t[0], key, u->t[1]);
    if (mode == 2) {
        __m512 low = _mm512_permutex2var_ps(u->t[0], key, u->t[1]), high = _mm512_permutex2var_ps(u->t[2], key, u->t[3]);
        return _mm512_mask_blend_ps(_mm512_test_epi32_mask(key, _mm512_set1_epi32(32)), low, high);
    }
    return _mm512_i32gather_ps(key, u->table, 4);
}

/* The 16 * dim weights of one chunk: weight s * 16 + l is component (s * 16 + l) % dim of index (s * 16 + l) / dim. */
AVX512 INLINE void weights512(const uint8_t *src, const unpack512 *u, const int dim, const int mode, __m512 *w) {
    __m512i index = indices512(src, u, dim != 1 || mode == 3);
    if (dim == 1) {
        w[0] = lookup512(index, u, mode);
        return;
    }
    __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i part = _mm512_and_si512(lane, _mm512_set1_epi32(dim - 1)); /* dim: 2 or 4 */
    for (int s = 0; s < dim; s++) {
        __m512i which = _mm512_add_epi32(_mm512_srli_epi32(lane, dim == 2 ? 1 : 2), _mm512_set1_epi32(s * 16 / dim));
        __m512i picked = _mm512_permutexvar_epi32(which, index);
        w[s] = lookup512(_mm512_add_epi32(_mm512_slli_epi32(picked, dim == 2 ? 1 : 2), part), u, mode);
    }
}

/* Row o's block scales into srow[0, blocks) and its offsets into srow[blocks, 2 blocks): float16 tables
 * widened 16 at a time.  Not inlined: inlined into the product's loop, it made the product without
 * scales 2x slower (the compiler's code for the loop, not this function, changed). */
AVX512 static __attribute__((noinline)) void row_scales512(const palette *p, int64_t o, float *srow) {
    int64_t first = o * p->blocks, b = 0;
    if (p->half)
        for (; b + 16 <= p->blocks; b += 16) {
            _mm512_storeu_ps(srow + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p->scales + first + b))));
            if (p->offsets) _mm512_storeu_ps(srow + p->blocks + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p->offsets + first + b))));
        }
    for (; b < p->blocks; b++) {
        srow[b] = stored_at(p->scales, p->half, first + b);
        if (p->offsets) srow[p->blocks + b] = stored_at(p->offsets, p->half, first + b);
    }
}

/* A chunk's weights times its block's scale (plus its offset); s NULL: no block scales. */
AVX512 INLINE void scale512(__m512 *w, const int dim, const float *s, const float *off, int32_t b) {
    if (!s) return;
    __m512 scale = _mm512_set1_ps(s[b]);
    for (int j = 0; j < dim; j++)
        w[j] = off ? _mm512_fmadd_ps(w[j], scale, _mm512_set1_ps(off[b])) : _mm512_mul_ps(w[j], scale);
}

/* Rows [r0, r1) of y (nb rows, stride ys) from nb rows of x (stride xs); dim 1, 2 or 4 and row_len % dim == 0;
 * cb: each chunk's block (chunk_blocks) and srow room for a row's scales and offsets, with block scales. */
AVX512 INLINE void gemv512(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, float *y, int64_t ys,
                           const int32_t *cb, float *srow, const int dim, const int nb, const int mode) {
    int64_t row_vectors = p->row_len / dim, whole = row_vectors / CHUNK * CHUNK;
    uint8_t spare[32];
    float tail[CHUNK * 4];
    int64_t group = -1, shift = -1;
    unpack512 u;
    for (int64_t o = r0; o < r1; o++) {
        int64_t g = o / p->group_size, q0 = g * p->vectors + (o - g * p->group_size) * row_vectors;
        if (g != group || ((q0 * p->bits) & 7) != shift) /* (rows of a group mostly share their setup) */
            group = g, shift = (q0 * p->bits) & 7, u = setup512(p, shift, p->lut + (g << p->bits) * dim);
        const float *s = p->scales ? srow : NULL, *off = p->offsets ? srow + p->blocks : NULL;
        if (s) row_scales512(p, o, srow);
        /* `unroll` chunks in flight: as many independent chains of FMAs per row of x (their latency is 4) */
        const int unroll = nb >= 4 ? 1 : 4 / nb;
        __m512 acc[4][8];
        for (int k = 0; k < unroll; k++)
            for (int b = 0; b < nb; b++) acc[k][b] = _mm512_setzero_ps();
        int64_t v = 0, start = (q0 * p->bits) >> 3, step = 2 * p->bits; /* bytes per chunk */
        int64_t direct = whole_loads(p, start, step, whole, unroll);
        for (; v < direct; v += unroll * CHUNK, start += unroll * step) /* (the k loop unrolls) */
            for (int k = 0; k < unroll; k++) {
                __m512 w[4];
                weights512(p->packed + start + k * step, &u, dim, mode, w);
                scale512(w, dim, s, off, s ? cb[v / CHUNK + k] : 0);
                for (int j = 0; j < dim; j++)
                    for (int b = 0; b < nb; b++)
                        acc[k][b] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(x + b * xs + (v + k * CHUNK) * dim + j * 16), acc[k][b]);
            }
        for (; v < whole; v += CHUNK, start += step) {
            __m512 w[4];
            weights512(bytes_at(p, start, spare), &u, dim, mode, w);
            scale512(w, dim, s, off, s ? cb[v / CHUNK] : 0);
            for (int j = 0; j < dim; j++)
                for (int b = 0; b < nb; b++)
                    acc[0][b] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(x + b * xs + v * dim + j * 16), acc[0][b]);
        }
        for (int k = 1; k < unroll; k++)
            for (int b = 0; b < nb; b++) acc[0][b] = _mm512_add_ps(acc[0][b], acc[k][b]);
        int64_t rest = p->row_len - whole * dim; /* fewer than one chunk of weights: decoded, then masked */
        if (rest) row_scalar(p, o, whole * dim, p->row_len, tail), scale_row(p, o, whole * dim, rest, tail);
        for (int64_t t = 0; t < rest; t += 16) {
            __mmask16 m = rest - t >= 16 ? 0xffff : (__mmask16)((1u << (rest - t)) - 1u);
            __m512 w = _mm512_maskz_loadu_ps(m, tail + t);
            for (int b = 0; b < nb; b++) acc[0][b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + b * xs + whole * dim + t), acc[0][b]);
        }
        for (int b = 0; b < nb; b++) y[b * ys + o] = _mm512_reduce_add_ps(acc[0][b]);
    }
}

/* Weights [i0, i1) of rows o0 .. o0 + nr into out, rows `stride` floats apart (i0 a multiple of a chunk's
 * 16 * dim weights; i1 one too, or the row's end); rows of one group and bit offset share one setup. */
AVX512 INLINE void rows512(const palette *p, int64_t o0, int64_t nr, int64_t i0, int64_t i1, float *out, int64_t stride,
                           const int dim, const int mode) {
    int64_t row_vectors = p->row_len / dim, whole = row_vectors / CHUNK * CHUNK, end = i1 / dim < whole ? i1 / dim : whole;
    int64_t group = -1, shift = -1, from = whole * dim > i0 ? whole * dim : i0;
    unpack512 u;
    uint8_t spare[32];
    for (int64_t o = o0; o < o0 + nr; o++, out += stride) {
        int64_t g = o / p->group_size, q0 = g * p->vectors + (o - g * p->group_size) * row_vectors;
        if (g != group || ((q0 * p->bits) & 7) != shift)
            group = g, shift = (q0 * p->bits) & 7, u = setup512(p, shift, p->lut + (g << p->bits) * dim);
        float *row = out - i0;
        for (int64_t v = i0 / dim; v < end; v += CHUNK) {
            __m512 w[4];
            weights512(bytes_at(p, ((q0 + v) * p->bits) >> 3, spare), &u, dim, mode, w);
            for (int s = 0; s < dim; s++) _mm512_storeu_ps(row + v * dim + s * 16, w[s]);
        }
        if (from < i1) row_scalar(p, o, from, i1, row + from);
    }
}

AVX512 void tdkm_gemv512_any(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, float *y, int64_t ys,
                             const int32_t *cb, float *srow, int nb) {
    BY_DIM(gemv512, mode_of(p, 1), nb, p, r0, r1, x, xs, y, ys, cb, srow)
}
AVX512 void tdkm_rows512_any(const palette *p, int64_t o0, int64_t nr, int64_t i0, int64_t i1, float *out, int64_t stride) {
    ROWS(rows512, mode_of(p, 1), p, o0, nr, i0, i1, out, stride)
}
#endif
