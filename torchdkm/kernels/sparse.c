/* torchdkm's native CPU loops of the sparse path (torchdkm/cluster/sparse.py, selection.py), built into the
 * same library as loops.c by torchdkm/kernels/build.py; the torch kernels in default.py compute the same
 * (bit for bit where said, else within the bounds said), and the tests compare the two.  Rows are
 * coordinate-major, as the sparse path keeps them: coordinate a of row i of group g at
 * x[a * xa + g * xg + i * xi].
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* sums[c * bins + keys[i]] += src[c * col_stride + i * item_stride], added in double, for every
 * column c < cols and item i < items (the sparse path's per-centroid sums: few bins, many items, where
 * a float32 sum in sequence would lose digits).  Returns -1, or the first item whose key is outside
 * [0, bins) (nothing is added then).
 */
#define SCATTER(name, type)                                                                                 \
    int64_t name(const int64_t *keys, int64_t items, const type *src, int64_t cols, int64_t col_stride,     \
                 int64_t item_stride, double *sums, int64_t bins, int64_t row_stride) {                      \
        for (int64_t i = 0; i < items; i++)                                                                  \
            if ((uint64_t)keys[i] >= (uint64_t)bins) return i;                                               \
        for (int64_t c = 0; c < cols; c++) {                                                                 \
            const type *column = src + c * col_stride;                                                       \
            double *out = sums + c * row_stride;                                                             \
            for (int64_t i = 0; i < items; i++) out[keys[i]] += column[i * item_stride];                     \
        }                                                                                                    \
        return -1;                                                                                           \
    }

SCATTER(tdkm_scatter_f32, float)
SCATTER(tdkm_scatter_f64, double)

/* The sparse path's set choice (torchdkm/cluster/selection.py; the torch kernel is `row_sets` in
 * default.py).  For row i in [start, stop) of every group g (coordinate a at x[a * xa + g * xg + i * xi])
 * and the group's k centroids (c + g * k * d, row-major): the squared distances in `type`, differences
 * first (relative error below (d + 3) eps, folded into the bounds below), and the top + 1 smallest in
 * order (ties to the lower index).  `near` bounds the nearest distance from above, `second` and `beyond`
 * bound from below every distance outside the nearest one and outside the nearest `top`.  A row is hard
 * when pad[g * r + i] is set or its score (second - near) / tau - log(k - 1) reaches `hard_score`; a soft
 * row's score is (beyond - near) / tau - log(k - top) (top > 1).  Its slack is the move after which the
 * score could fall to max(-log eps, score - reselect): min(room * tau / (2 (sqrt(bound) + sqrt(near))),
 * sqrt(bound)), room = max(score + log_eps, reselect).  Padding rows (pad set) weigh nothing: hard, slot
 * 0 everywhere, infinite score and slack.  Outputs: (G, top, r) int64 slots, (G, r) bytes, (G, r) scores
 * and slacks in the input's type (a hard row's slots after the first repeat its nearest).
 *
 * Rows go in blocks of ROW_SETS_BLOCK: the block's distances are computed centroid by centroid along the
 * rows, and its nearest two kept per row with selects, so both loops run along rows (SIMD).  `work`
 * holds d * ROW_SETS_BLOCK + ROW_SETS_BLOCK * (k + 3) values of `type`.
 */
#define ROW_SETS_MAX_TOP 64
#define ROW_SETS_BLOCK 64
/* A block of rows i0 .. i0 + nb of group g (the arguments of row_sets): the block's coordinates in xb, its
 * distances to every centroid in dist (centroid-major), and per row the nearest two (d0, d1) and the index of
 * the nearest (j0), kept with selects so that every loop runs along the rows. */
#define ROW_BLOCK_NEAREST_TWO(type)                                                                           \
        for (int64_t a = 0; a < d; a++)                                                                       \
            for (int64_t q = 0; q < B; q++) xb[a * B + q] = q < nb ? x[a * xa + g * xg + (i0 + q) * xi] : 0;  \
        for (int64_t q = 0; q < B; q++) {                                                                     \
            d0[q] = d1[q] = (type)INFINITY;                                                                   \
            j0[q] = 0;                                                                                        \
        }                                                                                                     \
        for (int64_t j = 0; j < k; j++) {                                                                     \
            type *restrict dj = dist + j * B;                                                                 \
            for (int64_t q = 0; q < B; q++) dj[q] = 0;                                                        \
            for (int64_t a = 0; a < d; a++) {                                                                 \
                const type ca = cg[j * d + a], *restrict xq = xb + a * B;                                     \
                for (int64_t q = 0; q < B; q++) {                                                             \
                    type diff = xq[q] - ca;                                                                   \
                    dj[q] += diff * diff;                                                                     \
                }                                                                                             \
            }                                                                                                 \
            const type jj = (type)j;                                                                          \
            for (int64_t q = 0; q < B; q++) { /* the nearest two (ties to the lower index) */                 \
                type s = dj[q], lo = d0[q];                                                                   \
                int nearer = s < lo;                                                                          \
                d1[q] = nearer ? lo : (s < d1[q] ? s : d1[q]);                                                \
                d0[q] = nearer ? s : lo;                                                                      \
                j0[q] = nearer ? jj : j0[q];                                                                  \
            }                                                                                                 \
        }

#define ROW_SETS(name, type, eps)                                                                             \
    void name(const type *restrict x, int64_t xa, int64_t xg, int64_t xi, const type *restrict c,             \
              const type *restrict inv_tau, int64_t groups, int64_t d, int64_t k, int64_t r, int64_t start,   \
              int64_t stop, int64_t top, const uint8_t *restrict pad, double hard_score, double log_eps,      \
              double reselect, type *restrict work, int64_t *restrict index, uint8_t *restrict hard,          \
              type *restrict score, type *restrict slack) {                                                    \
        enum { B = ROW_SETS_BLOCK };                                                                           \
        type best[ROW_SETS_MAX_TOP + 1];                                                                       \
        int64_t which[ROW_SETS_MAX_TOP + 1];                                                                   \
        type *restrict xb = work, *restrict dist = work + d * B, *restrict d0 = dist + k * B;                  \
        type *restrict d1 = d0 + B, *restrict j0 = d1 + B;                                                     \
        const double rel = (double)(d + 4) * (eps), log_hard = log((double)(k - 1));                           \
        const double log_soft = log((double)(k - top));                                                        \
        for (int64_t g = 0; g < groups; g++) {                                                                 \
            const type *restrict cg = c + g * k * d;                                                           \
            const double it = (double)inv_tau[g];                                                              \
            for (int64_t i0 = start; i0 < stop; i0 += B) {                                                     \
                const int64_t nb = stop - i0 < B ? stop - i0 : B;                                              \
                ROW_BLOCK_NEAREST_TWO(type)                                                                   \
                for (int64_t q = 0; q < nb; q++) {                                                             \
                    const int64_t i = i0 + q, row = g * r + i, nearest = (int64_t)j0[q];                       \
                    if (pad != NULL && pad[row]) {                                                             \
                        for (int64_t t = 0; t < top; t++) index[(g * top + t) * r + i] = 0;                   \
                        hard[row] = 1;                                                                         \
                        score[row] = slack[row] = (type)INFINITY;                                              \
                        continue;                                                                              \
                    }                                                                                          \
                    const double near = (double)d0[q] * (1.0 + rel), second = (double)d1[q] * (1.0 - rel);     \
                    double bound = second, sc = (second - near) * it - log_hard;                               \
                    const int is_hard = sc >= hard_score;                                                      \
                    hard[row] = (uint8_t)is_hard;                                                              \
                    index[g * top * r + i] = nearest;                                                          \
                    if (!is_hard && top > 1) { /* a soft row: its top + 1 nearest, in order */                 \
                        int64_t found = 0;                                                                     \
                        for (int64_t j = 0; j < k; j++) {                                                      \
                            type s = dist[j * B + q];                                                          \
                            if (found == top + 1 && !(s < best[top])) continue;                                \
                            int64_t at = found < top + 1 ? found++ : top;                                      \
                            for (; at > 0 && s < best[at - 1]; at--) {                                         \
                                best[at] = best[at - 1];                                                       \
                                which[at] = which[at - 1];                                                     \
                            }                                                                                  \
                            best[at] = s;                                                                      \
                            which[at] = j;                                                                     \
                        }                                                                                      \
                        for (int64_t t = 0; t < top; t++) index[(g * top + t) * r + i] = which[t];             \
                        bound = (double)best[top] * (1.0 - rel);                                               \
                        sc = (bound - near) * it - log_soft;                                                   \
                    } else {                                                                                   \
                        for (int64_t t = 1; t < top; t++) index[(g * top + t) * r + i] = nearest;              \
                    }                                                                                          \
                    double room = sc + log_eps > reselect ? sc + log_eps : reselect;                           \
                    double root = sqrt(bound), move = room / it / (2.0 * (root + sqrt(near)));                 \
                    score[row] = (type)sc;                                                                     \
                    slack[row] = (type)(move < root ? move : root);                                            \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

ROW_SETS(tdkm_row_sets_f32, float, 0x1p-24)
ROW_SETS(tdkm_row_sets_f64, double, 0x1p-53)

/* The sparse path's Gram weights of rows, scattered (the torch kernel `gram_scatter` in default.py: its
 * `row_weights` then `scatter`).  Row (g, i), g < groups, i < r, has coordinates x[a * xa + g * xg + i *
 * xi] and multiplicity m[g * mg + i * mi] (m NULL: 1); its terms are m, m x_a, (m x_a) x_b for b >= a,
 * each rounded to `type` as torch computes them, and terms first.. go to sums[(p - first) * row_stride +
 * keys[g * r + i]], added in double in row order: what `scatter` adds, bit for bit (a row of multiplicity
 * 0, padding, adds zeros to sums that start at +0: skipped).  Returns -1, or the
 * first row whose key is outside [0, bins) (nothing is added then).  `work` holds d values of `type`.
 */
#define GRAM_SCATTER(name, type)                                                                              \
    int64_t name(const int64_t *restrict keys, const type *restrict x, int64_t xa, int64_t xg, int64_t xi,   \
                 const type *restrict m, int64_t mg, int64_t mi, int64_t groups, int64_t r, int64_t d,       \
                 int64_t first, double *restrict sums, int64_t bins, int64_t row_stride, type *restrict mx) { \
        for (int64_t e = 0; e < groups * r; e++)                                                               \
            if ((uint64_t)keys[e] >= (uint64_t)bins) return e;                                                \
        for (int64_t g = 0; g < groups; g++)                                                                   \
            for (int64_t i = 0; i < r; i++) {                                                                  \
                const type *xr = x + g * xg + i * xi;                                                          \
                const type w = m != NULL ? m[g * mg + i * mi] : (type)1;                                       \
                if (w == (type)0) continue; /* every term 0 (x is finite): adding them changes no sum */      \
                const int64_t key = keys[g * r + i];                                                           \
                int64_t p = 0;                                                                                 \
                if (p++ >= first) sums[key] += (double)w;                                                      \
                for (int64_t a = 0; a < d; a++, p++) {                                                         \
                    mx[a] = m != NULL ? w * xr[a * xa] : xr[a * xa];                                          \
                    if (p >= first) sums[(p - first) * row_stride + key] += (double)mx[a];                     \
                }                                                                                              \
                for (int64_t a = 0; a < d; a++)                                                                \
                    for (int64_t b = a; b < d; b++, p++)                                                       \
                        if (p >= first) sums[(p - first) * row_stride + key] += (double)(type)(mx[a] * xr[b * xa]); \
            }                                                                                                  \
        return -1;                                                                                             \
    }

GRAM_SCATTER(tdkm_gram_scatter_f32, float)
GRAM_SCATTER(tdkm_gram_scatter_f64, double)

/* Each row's nearest centroid and its squared distances to the nearest two (the torch kernel `nearest_two`
 * in default.py, which truncates packed distances): rows and centroids as in `row_sets` above, the same
 * blocks and arithmetic, so the two agree on every row.  Outputs (G, r): int64 index, distances in `type`.
 * `work` holds d * ROW_SETS_BLOCK + ROW_SETS_BLOCK * (k + 3) values of `type`.
 */
#define NEAREST_TWO(name, type)                                                                               \
    void name(const type *restrict x, int64_t xa, int64_t xg, int64_t xi, const type *restrict c,             \
              int64_t groups, int64_t d, int64_t k, int64_t r, int64_t start, int64_t stop,                   \
              type *restrict work, int64_t *restrict index, type *restrict first, type *restrict second) {    \
        enum { B = ROW_SETS_BLOCK };                                                                           \
        type *restrict xb = work, *restrict dist = work + d * B, *restrict d0 = dist + k * B;                  \
        type *restrict d1 = d0 + B, *restrict j0 = d1 + B;                                                     \
        for (int64_t g = 0; g < groups; g++) {                                                                 \
            const type *restrict cg = c + g * k * d;                                                           \
            for (int64_t i0 = start; i0 < stop; i0 += B) {                                                     \
                const int64_t nb = stop - i0 < B ? stop - i0 : B;                                              \
                ROW_BLOCK_NEAREST_TWO(type)                                                                    \
                for (int64_t q = 0; q < nb; q++) {                                                             \
                    index[g * r + i0 + q] = (int64_t)j0[q];                                                    \
                    first[g * r + i0 + q] = d0[q];                                                             \
                    second[g * r + i0 + q] = d1[q];                                                            \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

NEAREST_TWO(tdkm_nearest_two_f32, float)
NEAREST_TWO(tdkm_nearest_two_f64, double)
