/* The inference loops on AVX2 + FMA: 8 indices a half chunk (see lut.c for what they compute, lut.h for the
 * helpers). */
#include "lut.h"

#if HAVE_X86
typedef struct {
    __m256i pick, right, mask;
    __m256 t[2];
    const float *table;
    int64_t entries;
} unpack256;

AVX2 INLINE unpack256 setup256(const palette *p, int64_t shift, const float *table) {
    unpack256 u;
    int32_t pick[8], right[8];
    float first[64];
    lanes(p->bits, shift, 8, pick, right);
    u.pick = _mm256_loadu_si256((const __m256i *)pick), u.right = _mm256_loadu_si256((const __m256i *)right);
    u.mask = _mm256_set1_epi32((1 << p->bits) - 1);
    u.entries = (int64_t)p->dim << p->bits;
    u.table = table;
    first_entries(table, u.entries < 16 ? u.entries : 16, p->dim, first);
    u.t[0] = _mm256_loadu_ps(first), u.t[1] = _mm256_loadu_ps(first + 8);
    return u;
}

/* 8 indices whose bits start at `shift` (< 8) + lane * bits of the bytes at src (as in indices512). */
AVX2 INLINE __m256i indices256(const uint8_t *src, const unpack256 *u, const int masked) {
    __m256i data = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)src));
    __m256i index = _mm256_srlv_epi32(_mm256_shuffle_epi8(data, u->pick), u->right);
    return masked ? _mm256_and_si256(index, u->mask) : index;
}

/* mode (see mode_of): 0 a permute of 8 entries, 1 two and a blend (16), else a gather. */
AVX2 INLINE __m256 lookup256(__m256i key, const unpack256 *u, const int mode) {
    if (mode == 0) return _mm256_permutevar8x32_ps(u->t[0], key);
    if (mode == 1) {
        __m256 low = _mm256_permutevar8x32_ps(u->t[0], key), high = _mm256_permutevar8x32_ps(u->t[1], key);
        __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(key, 28)); /* bit 3 of the key to the sign bit */
        return _mm256_blendv_ps(low, high, upper);
    }
    return _mm256_i32gather_ps(u->table, key, 4);
}

/* The 8 * dim weights of a half chunk (8 indices at src, the half's first stream byte). */
AVX2 INLINE void weights256(const uint8_t *src, const unpack256 *u, const int dim, const int mode, __m256 *w) {
    __m256i index = indices256(src, u, dim != 1 || mode > 1);
    if (dim == 1) {
        w[0] = lookup256(index, u, mode);
        return;
    }
    __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    __m256i part = _mm256_and_si256(lane, _mm256_set1_epi32(dim - 1));
    for (int s = 0; s < dim; s++) {
        __m256i which = _mm256_add_epi32(_mm256_srli_epi32(lane, dim == 2 ? 1 : 2), _mm256_set1_epi32(s * 8 / dim));
        __m256i picked = _mm256_permutevar8x32_epi32(index, which);
        w[s] = lookup256(_mm256_add_epi32(_mm256_slli_epi32(picked, dim == 2 ? 1 : 2), part), u, mode);
    }
}

AVX2 static __attribute__((noinline)) void row_scales256(const palette *p, int64_t o, float *srow) {
    int64_t first = o * p->blocks, b = 0;
    if (p->half)
        for (; b + 8 <= p->blocks; b += 8) {
            _mm256_storeu_ps(srow + b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p->scales + first + b))));
            if (p->offsets) _mm256_storeu_ps(srow + p->blocks + b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p->offsets + first + b))));
        }
    for (; b < p->blocks; b++) {
        srow[b] = stored_at(p->scales, p->half, first + b);
        if (p->offsets) srow[p->blocks + b] = stored_at(p->offsets, p->half, first + b);
    }
}

AVX2 INLINE void scale256(__m256 *w, const int dim, const float *s, const float *off, int32_t b) {
    if (!s) return;
    __m256 scale = _mm256_set1_ps(s[b]);
    for (int j = 0; j < dim; j++)
        w[j] = off ? _mm256_fmadd_ps(w[j], scale, _mm256_set1_ps(off[b])) : _mm256_mul_ps(w[j], scale);
}

AVX2 static float sum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AVX2 INLINE void gemv256(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, float *y, int64_t ys,
                         const int32_t *cb, float *srow, const int dim, const int nb, const int mode) {
    int64_t row_vectors = p->row_len / dim, whole = row_vectors / CHUNK * CHUNK;
    uint8_t spare[32];
    float tail[CHUNK * 4];
    int64_t group = -1, shift = -1;
    unpack256 u;
    for (int64_t o = r0; o < r1; o++) {
        int64_t g = o / p->group_size, q0 = g * p->vectors + (o - g * p->group_size) * row_vectors;
        if (g != group || ((q0 * p->bits) & 7) != shift) /* (rows of a group mostly share their setup) */
            group = g, shift = (q0 * p->bits) & 7, u = setup256(p, shift, p->lut + (g << p->bits) * dim);
        const float *s = p->scales ? srow : NULL, *off = p->offsets ? srow + p->blocks : NULL;
        if (s) row_scales256(p, o, srow);
        __m256 acc[8], more[8]; /* the two halves of a chunk: two chains of FMAs per row of x */
        for (int b = 0; b < nb; b++) acc[b] = more[b] = _mm256_setzero_ps();
        int64_t v = 0, start = (q0 * p->bits) >> 3, step = p->bits; /* bytes per half chunk */
        for (int64_t direct = whole_loads(p, start, 2 * step, whole, 1); v < direct; v += CHUNK, start += 2 * step) {
            __m256 w[4], w2[4];
            weights256(p->packed + start, &u, dim, mode, w);
            weights256(p->packed + start + step, &u, dim, mode, w2);
            scale256(w, dim, s, off, s ? cb[v / CHUNK] : 0), scale256(w2, dim, s, off, s ? cb[v / CHUNK] : 0);
            for (int j = 0; j < dim; j++)
                for (int b = 0; b < nb; b++) {
                    const float *xb = x + b * xs + v * dim + j * 8;
                    acc[b] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xb), acc[b]);
                    more[b] = _mm256_fmadd_ps(w2[j], _mm256_loadu_ps(xb + 8 * dim), more[b]);
                }
        }
        for (; v < whole; v += CHUNK / 2, start += step) {
            __m256 w[4];
            weights256(bytes_at(p, start, spare), &u, dim, mode, w);
            scale256(w, dim, s, off, s ? cb[v / CHUNK] : 0);
            for (int j = 0; j < dim; j++)
                for (int b = 0; b < nb; b++) acc[b] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + b * xs + v * dim + j * 8), acc[b]);
        }
        int64_t rest = p->row_len - whole * dim;
        if (rest) row_scalar(p, o, whole * dim, p->row_len, tail), scale_row(p, o, whole * dim, rest, tail);
        for (int b = 0; b < nb; b++) {
            float sum = sum256(_mm256_add_ps(acc[b], more[b]));
            const float *xb = x + b * xs + whole * dim;
            for (int64_t i = 0; i < rest; i++) sum += tail[i] * xb[i];
            y[b * ys + o] = sum;
        }
    }
}

/* Weights [i0, i1) of row o into out (as rows512). */
AVX2 INLINE void rows256(const palette *p, int64_t o, int64_t i0, int64_t i1, float *out, const int dim, const int mode) {
    int64_t row_vectors = p->row_len / dim, whole = row_vectors / CHUNK * CHUNK, end = i1 / dim < whole ? i1 / dim : whole;
    int64_t g = o / p->group_size, q0 = g * p->vectors + (o - g * p->group_size) * row_vectors;
    unpack256 u = setup256(p, (q0 * p->bits) & 7, p->lut + (g << p->bits) * dim);
    uint8_t spare[32];
    out -= i0;
    for (int64_t v = i0 / dim; v < end; v += CHUNK / 2) {
        __m256 w[4];
        weights256(bytes_at(p, ((q0 + v) * p->bits) >> 3, spare), &u, dim, mode, w);
        for (int s = 0; s < dim; s++) _mm256_storeu_ps(out + v * dim + s * 8, w[s]);
    }
    int64_t from = whole * dim > i0 ? whole * dim : i0;
    if (from < i1) row_scalar(p, o, from, i1, out + from);
}

AVX2 void tdkm_gemv256_any(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, float *y, int64_t ys,
                           const int32_t *cb, float *srow, int nb) {
    BY_DIM(gemv256, mode_of(p, 0), nb, p, r0, r1, x, xs, y, ys, cb, srow)
}
AVX2 void tdkm_rows256_any(const palette *p, int64_t o, int64_t i0, int64_t i1, float *out) {
    ROWS(rows256, mode_of(p, 0), p, o, i0, i1, out)
}
#endif
