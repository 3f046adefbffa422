/* torchdkm's native CPU loops (built by torchdkm/cluster/native.py; the torch code they replace computes
 * the same, and the tests compare the two).
 *
 * Most walk `n` weights whose 16-bit patterns are `p[0..n)` (the uniquified path's passes): weight i is
 * weight `first + i` of the whole tensor, in group `(first + i) / group_numel`, and its entry in table
 * space is its pattern plus 65536 times its group, counted from the group of weight `first` (so a
 * caller working on a slice passes the table from that group on).  torch's bincount and index_select
 * need the patterns widened to int32 first and make extra passes (min, max, zeroing); here each weight
 * is read once.  The last, `scatter`, is the sparse path's float64 scatter-add.
 */
#include <stdint.h>
#include <string.h>

#define PATTERN_BITS 16

static float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* Round to nearest, ties to even (torch's rounding); NaN becomes the quiet NaN (a select, not a branch). */
static uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint16_t rounded = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    return value != value ? 0x7fc0 : rounded;
}

/* The weights [start, stop) that share one group, and the offset of that group's table. */
typedef struct {
    int64_t start, stop, offset;
} segment;

static int next_segment(segment *s, int64_t n, int64_t first, int64_t group_numel) {
    if (s->stop >= n) return 0;
    int64_t group = (first + s->stop) / group_numel;
    s->start = s->stop;
    s->stop = (group + 1) * group_numel - first;
    if (s->stop > n) s->stop = n;
    s->offset = (group - first / group_numel) << PATTERN_BITS;
    return 1;
}

#define FOR_EACH_SEGMENT(s) for (segment s = {0, 0, 0}; next_segment(&s, n, first, group_numel);)

/* table[key] += 1 for every weight. */
void tdkm_count(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, int64_t *table) {
    FOR_EACH_SEGMENT(s) {
        int64_t *t = table + s.offset;
        for (int64_t i = s.start; i < s.stop; i++) t[p[i]]++;
    }
}

/* out[i] = table[key]: tables of 2-, 4- or 8-byte values (copied as bits). */
void tdkm_expand16(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const uint16_t *table,
                   uint16_t *out) {
    FOR_EACH_SEGMENT(s) {
        const uint16_t *t = table + s.offset;
        for (int64_t i = s.start; i < s.stop; i++) out[i] = t[p[i]];
    }
}

void tdkm_expand32(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const uint32_t *table,
                   uint32_t *out) {
    FOR_EACH_SEGMENT(s) {
        const uint32_t *t = table + s.offset;
        for (int64_t i = s.start; i < s.stop; i++) out[i] = t[p[i]];
    }
}

void tdkm_expand64(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const uint64_t *table,
                   uint64_t *out) {
    FOR_EACH_SEGMENT(s) {
        const uint64_t *t = table + s.offset;
        for (int64_t i = s.start; i < s.stop; i++) out[i] = t[p[i]];
    }
}

/* table[key] += values[i] (values: float32 or bfloat16).
 *
 * Each block of BLOCK weights is summed in float32 into `partial` (a float table
 * of the same size, all zero), then the block's sums at the `live` keys (every
 * key that occurs, ascending; `n_live` of them) are added into `table` in double
 * and zeroed: float additions are cheaper, and no sum runs over more than BLOCK
 * values in float32.
 */
#define BLOCK (1 << 17)

static void add_f32(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const float *values,
                    float *partial) {
    FOR_EACH_SEGMENT(s) {
        float *t = partial + s.offset;
        for (int64_t i = s.start; i < s.stop; i++) t[p[i]] += values[i];
    }
}

static void add_bf16(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const uint16_t *values,
                     float *partial) {
    FOR_EACH_SEGMENT(s) {
        float *t = partial + s.offset;
        for (int64_t i = s.start; i < s.stop; i++) t[p[i]] += bf16_to_float(values[i]);
    }
}

static void flush(const int64_t *live, int64_t n_live, float *partial, double *table) {
    for (int64_t j = 0; j < n_live; j++) {
        table[live[j]] += partial[live[j]];
        partial[live[j]] = 0.0f;
    }
}

/* The table offset of the group of weight `first + start`, from the group of weight `first`. */
static int64_t block_offset(int64_t first, int64_t start, int64_t group_numel) {
    return ((first + start) / group_numel - first / group_numel) << PATTERN_BITS;
}

void tdkm_sum_f32(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const float *values,
                  const int64_t *live, int64_t n_live, float *partial, double *table) {
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t size = n - start < BLOCK ? n - start : BLOCK;
        add_f32(p + start, size, first + start, group_numel, values + start,
                partial + block_offset(first, start, group_numel));
        flush(live, n_live, partial, table);
    }
}

void tdkm_sum_bf16(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const uint16_t *values,
                   const int64_t *live, int64_t n_live, float *partial, double *table) {
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t size = n - start < BLOCK ? n - start : BLOCK;
        add_bf16(p + start, size, first + start, group_numel, values + start,
                 partial + block_offset(first, start, group_numel));
        flush(live, n_live, partial, table);
    }
}

/* out[i] = shift[key] + grad[i] * slope[key], computed in float (grad and out: float32 or bfloat16). */
void tdkm_affine_f32(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const float *shift,
                     const float *slope, const float *grad, float *out) {
    FOR_EACH_SEGMENT(s) {
        const float *a = shift + s.offset, *b = slope + s.offset;
        for (int64_t i = s.start; i < s.stop; i++) out[i] = a[p[i]] + grad[i] * b[p[i]];
    }
}

void tdkm_affine_bf16(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const float *shift,
                      const float *slope, const uint16_t *grad, uint16_t *out) {
    FOR_EACH_SEGMENT(s) {
        const float *a = shift + s.offset, *b = slope + s.offset;
        for (int64_t i = s.start; i < s.stop; i++) out[i] = float_to_bf16(a[p[i]] + bf16_to_float(grad[i]) * b[p[i]]);
    }
}

/* sums[c * bins + keys[i]] += src[c * col_stride + i * item_stride], added in double, for every
 * column c < cols and item i < items (the sparse path's per-centroid sums: few bins, many items, where
 * a float32 sum in sequence would lose digits).  Returns -1, or the first item whose key is outside
 * [0, bins) (nothing is added then).
 */
#define SCATTER(name, type)                                                                                 \
    int64_t name(const int64_t *keys, int64_t items, const type *src, int64_t cols, int64_t col_stride,     \
                 int64_t item_stride, double *sums, int64_t bins) {                                          \
        for (int64_t i = 0; i < items; i++)                                                                  \
            if ((uint64_t)keys[i] >= (uint64_t)bins) return i;                                               \
        for (int64_t c = 0; c < cols; c++) {                                                                 \
            const type *column = src + c * col_stride;                                                       \
            double *out = sums + c * bins;                                                                   \
            for (int64_t i = 0; i < items; i++) out[keys[i]] += column[i * item_stride];                     \
        }                                                                                                    \
        return -1;                                                                                           \
    }

SCATTER(tdkm_scatter_f32, float)
SCATTER(tdkm_scatter_f64, double)
