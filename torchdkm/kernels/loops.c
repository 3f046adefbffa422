/* torchdkm's native CPU loops (built by torchdkm/kernels/build.py; the torch code they replace computes
 * the same, and the tests compare the two).
 *
 * Most walk `n` weights whose 16-bit patterns are `p[0..n)` (the uniquified path's passes): weight i is
 * weight `first + i` of the whole tensor, in group `(first + i) / group_numel`, and its entry in table
 * space is its pattern plus 65536 times its group, counted from the group of weight `first` (so a
 * caller working on a slice passes the table from that group on).  torch's bincount and index_select
 * need the patterns widened to int32 first and make extra passes (min, max, zeroing); here each weight
 * is read once.  The block scales' loops follow; the sparse path's are in sparse.c (the same library).
 */
#include <stdint.h>
#include <string.h>

#define PATTERN_BITS 16

/* The gathers (expand, affine) also have AVX-512 versions, chosen at run time where the CPU and the OS
 * support them: 16 weights per instruction, with the same arithmetic as the scalar loops, so the results
 * are identical bit for bit (no FMA: the build passes -ffp-contract=off).  tdkm_simd(0) turns them off
 * (the tests compare both with torch); tdkm_simd(1) turns them back on where supported. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX512 1
#define AVX512 __attribute__((target("avx512f")))
#else
#define HAVE_AVX512 0
#endif

static int simd = -1; /* -1: not decided yet */

int tdkm_simd(int want) {
#if HAVE_AVX512
    __builtin_cpu_init();
    int supported = __builtin_cpu_supports("avx512f");
#else
    int supported = 0;
#endif
    if (want >= 0 || simd < 0) simd = want != 0 && supported;
    return simd;
}

static int use_simd(void) { return simd < 0 ? tdkm_simd(1) : simd; }

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

/* table[key] += 1 for every weight.  (Four at a time: the loads of the next patterns overlap the
 * increments, ~25 % faster than one at a time; the scatter-adds below do the same.) */
void tdkm_count(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, int64_t *table) {
    FOR_EACH_SEGMENT(s) {
        int64_t *t = table + s.offset;
        int64_t i = s.start;
        for (; i + 4 <= s.stop; i += 4) {
            uint16_t a = p[i], b = p[i + 1], c = p[i + 2], d = p[i + 3];
            t[a]++, t[b]++, t[c]++, t[d]++;
        }
        for (; i < s.stop; i++) t[p[i]]++;
    }
}

/* The keys with a nonzero count, ascending, into `keys` (room for n); returns how many (no branch per key). */
int64_t tdkm_present(const int64_t *table, int64_t n, int64_t *keys) {
    int64_t found = 0;
    for (int64_t key = 0; key < n; key++) {
        keys[found] = key;
        found += table[key] != 0;
    }
    return found;
}

/* out[i] = table[key]: tables of 2-, 4- or 8-byte values (copied as bits). */
#if HAVE_AVX512
/* Sixteen patterns, widened to 32-bit lanes. */
AVX512 static __m512i keys16(const uint16_t *p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)); }

/* Up to the last whole 16 weights of [start, stop); returns where the scalar loop goes on.  A 16-bit
 * entry is gathered as the 32 bits at its address (its own bits are the low half): pattern 0xffff is
 * masked off, as its upper half may lie past the table's end, and copied by the scalar code. */
AVX512 static int64_t expand16_avx512(const uint16_t *p, int64_t start, int64_t stop, const uint16_t *t,
                                      uint16_t *out) {
    const __m512i last = _mm512_set1_epi32(0xffff);
    int64_t i = start;
    for (; i + 16 <= stop; i += 16) {
        __m512i key = keys16(p + i);
        __mmask16 safe = _mm512_cmpneq_epi32_mask(key, last);
        __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), safe, key, t, 2);
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(v));
        if (safe != 0xffff)
            for (int j = 0; j < 16; j++) out[i + j] = t[p[i + j]];
    }
    return i;
}

AVX512 static int64_t expand32_avx512(const uint16_t *p, int64_t start, int64_t stop, const uint32_t *t,
                                      uint32_t *out) {
    int64_t i = start;
    for (; i + 16 <= stop; i += 16)
        _mm512_storeu_si512(out + i, _mm512_i32gather_epi32(keys16(p + i), t, 4));
    return i;
}
#endif

void tdkm_expand16(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const uint16_t *table,
                   uint16_t *out) {
    int vector = use_simd();
    FOR_EACH_SEGMENT(s) {
        const uint16_t *t = table + s.offset;
        int64_t i = s.start;
#if HAVE_AVX512
        if (vector) i = expand16_avx512(p, i, s.stop, t, out);
#endif
        for (; i < s.stop; i++) out[i] = t[p[i]];
    }
    (void)vector;
}

void tdkm_expand32(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const uint32_t *table,
                   uint32_t *out) {
    int vector = use_simd();
    FOR_EACH_SEGMENT(s) {
        const uint32_t *t = table + s.offset;
        int64_t i = s.start;
#if HAVE_AVX512
        if (vector) i = expand32_avx512(p, i, s.stop, t, out);
#endif
        for (; i < s.stop; i++) out[i] = t[p[i]];
    }
    (void)vector;
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
        int64_t i = s.start;
        for (; i + 4 <= s.stop; i += 4) {
            uint16_t a = p[i], b = p[i + 1], c = p[i + 2], d = p[i + 3];
            t[a] += values[i], t[b] += values[i + 1], t[c] += values[i + 2], t[d] += values[i + 3];
        }
        for (; i < s.stop; i++) t[p[i]] += values[i];
    }
}

static void add_bf16(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const uint16_t *values,
                     float *partial) {
    FOR_EACH_SEGMENT(s) {
        float *t = partial + s.offset;
        int64_t i = s.start;
        for (; i + 4 <= s.stop; i += 4) {
            uint16_t a = p[i], b = p[i + 1], c = p[i + 2], d = p[i + 3];
            t[a] += bf16_to_float(values[i]), t[b] += bf16_to_float(values[i + 1]);
            t[c] += bf16_to_float(values[i + 2]), t[d] += bf16_to_float(values[i + 3]);
        }
        for (; i < s.stop; i++) t[p[i]] += bf16_to_float(values[i]);
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
#if HAVE_AVX512
AVX512 static int64_t affine_f32_avx512(const uint16_t *p, int64_t start, int64_t stop, const float *a,
                                        const float *b, const float *grad, float *out) {
    int64_t i = start;
    for (; i + 16 <= stop; i += 16) {
        __m512i key = keys16(p + i);
        __m512 product = _mm512_mul_ps(_mm512_loadu_ps(grad + i), _mm512_i32gather_ps(key, b, 4));
        _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_i32gather_ps(key, a, 4), product));
    }
    return i;
}

/* float_to_bf16 on sixteen lanes: the same integer rounding, NaN to the quiet NaN. */
AVX512 static __m256i to_bf16_avx512(__m512 value) {
    __m512i bits = _mm512_castps_si512(value);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0)));
}

AVX512 static int64_t affine_bf16_avx512(const uint16_t *p, int64_t start, int64_t stop, const float *a,
                                         const float *b, const uint16_t *grad, uint16_t *out) {
    int64_t i = start;
    for (; i + 16 <= stop; i += 16) {
        __m512i key = keys16(p + i);
        __m512 g = _mm512_castsi512_ps(_mm512_slli_epi32(keys16(grad + i), 16)); /* bf16 -> float: a shift */
        __m512 value = _mm512_add_ps(_mm512_i32gather_ps(key, a, 4), _mm512_mul_ps(g, _mm512_i32gather_ps(key, b, 4)));
        _mm256_storeu_si256((__m256i *)(out + i), to_bf16_avx512(value));
    }
    return i;
}
#endif

void tdkm_affine_f32(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const float *shift,
                     const float *slope, const float *grad, float *out) {
    int vector = use_simd();
    FOR_EACH_SEGMENT(s) {
        const float *a = shift + s.offset, *b = slope + s.offset;
        int64_t i = s.start;
#if HAVE_AVX512
        if (vector) i = affine_f32_avx512(p, i, s.stop, a, b, grad, out);
#endif
        for (; i < s.stop; i++) out[i] = a[p[i]] + grad[i] * b[p[i]];
    }
    (void)vector;
}

void tdkm_affine_bf16(const uint16_t *p, int64_t n, int64_t first, int64_t group_numel, const float *shift,
                      const float *slope, const uint16_t *grad, uint16_t *out) {
    int vector = use_simd();
    FOR_EACH_SEGMENT(s) {
        const float *a = shift + s.offset, *b = slope + s.offset;
        int64_t i = s.start;
#if HAVE_AVX512
        if (vector) i = affine_bf16_avx512(p, i, s.stop, a, b, grad, out);
#endif
        for (; i < s.stop; i++) out[i] = float_to_bf16(a[p[i]] + bf16_to_float(grad[i]) * b[p[i]]);
    }
    (void)vector;
}

/* Block scales (torchdkm/cluster/scales.py): a float32 weight of `rows` rows of `row_len` values, each row
 * cut into blocks of `block` (the last may be shorter), with one value per block in the (rows, blocks)
 * tables below.  The forward loops compute what the torch kernels compute, bit for bit (a division, a
 * product then a sum: no FMA); the gradient loops sum each block in double.  Each is one pass over the
 * weights where torch needs several (and a full-size temporary per step of the formula). */
#define FOR_EACH_BLOCK                                                                                        \
    for (int64_t r = 0, blocks = (row_len + block - 1) / block; r < rows; r++)                                 \
        for (int64_t b = 0, at = r * blocks; b < blocks; b++, at = r * blocks + b)
#define BLOCK_SPAN                                                                                            \
    int64_t first_ = r * row_len + b * block, last_ = (b + 1) * block < row_len ? (b + 1) * block : row_len;  \
    int64_t size = last_ - b * block;                                                                          \
    (void)size

/* out = (w - offset) / safe (offset NULL: w / safe). */
void tdkm_normalise_f32(const float *w, int64_t rows, int64_t row_len, int64_t block, const float *safe,
                        const float *offset, float *out) {
    FOR_EACH_BLOCK {
        BLOCK_SPAN;
        const float *x = w + first_;
        float *y = out + first_, s = safe[at];
        if (offset) {
            float o = offset[at];
            for (int64_t i = 0; i < size; i++) y[i] = (x[i] - o) / s;
        } else {
            for (int64_t i = 0; i < size; i++) y[i] = x[i] / s;
        }
    }
}

/* out = n * scale + offset (offset NULL: n * scale). */
void tdkm_rescale_f32(const float *n, int64_t rows, int64_t row_len, int64_t block, const float *scale,
                      const float *offset, float *out) {
    FOR_EACH_BLOCK {
        BLOCK_SPAN;
        const float *x = n + first_;
        float *y = out + first_, s = scale[at];
        if (offset) {
            float o = offset[at];
            for (int64_t i = 0; i < size; i++) {
                float product = x[i] * s;
                y[i] = product + o;
            }
        } else {
            for (int64_t i = 0; i < size; i++) y[i] = x[i] * s;
        }
    }
}

/* Sums of `a[i]` and `a[i] * b[i]` over `size` values, in LANES independent float sums (the loop
 * vectorizes; a single running sum would be a chain of dependent additions), added up in double. */
#define LANES 8
static void two_sums(const float *a, const float *b, float shift, int64_t size, double *sum_a, double *sum_ab) {
    float lane_a[LANES] = {0}, lane_ab[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= size; i += LANES)
        for (int j = 0; j < LANES; j++) {
            lane_a[j] += a[i + j];
            lane_ab[j] += a[i + j] * (b[i + j] - shift);
        }
    double total_a = 0.0, total_ab = 0.0;
    for (; i < size; i++) {
        total_a += a[i];
        total_ab += (double)a[i] * (b[i] - shift);
    }
    for (int j = 0; j < LANES; j++) total_a += lane_a[j], total_ab += lane_ab[j];
    *sum_a = total_a, *sum_ab = total_ab;
}

/* The gradient of tdkm_rescale_f32 from `g`: grad_n = g * scale, and per block grad_scale = sum g * n and
 * grad_offset = sum g. */
void tdkm_rescale_grad_f32(const float *g, const float *n, int64_t rows, int64_t row_len, int64_t block,
                           const float *scale, float *grad_n, float *grad_scale, float *grad_offset) {
    FOR_EACH_BLOCK {
        BLOCK_SPAN;
        const float *gi = g + first_;
        float *out = grad_n + first_, s = scale[at];
        double total, by_n;
        for (int64_t i = 0; i < size; i++) out[i] = gi[i] * s;
        two_sums(gi, n + first_, 0.0f, size, &total, &by_n);
        grad_scale[at] = (float)by_n, grad_offset[at] = (float)total;
    }
}

/* The gradient into the weight of (w - offset) / safe with scale and offset derived from the block, from
 * `g` (the gradient of the normalised weight) and `extra_scale` / `extra_offset` (what reached the scale
 * and the offset otherwise; NULL: nothing).  With t = g / safe:
 *   grad_scale = extra_scale - sum t * n = extra_scale - sum g * (w - offset) / safe^2
 *   (nothing through safe where scale == 0: it is 1 there)
 *   grad_offset = extra_offset - sum t = extra_offset - sum g / safe
 * With an offset (scale = (high - low) / 2, offset = (high + low) / 2) the block's largest values share
 * (grad_scale + grad_offset) / 2 and its smallest (grad_offset - grad_scale) / 2; without (scale = high,
 * the largest magnitude) the values of magnitude `high` share grad_scale times their sign.  Ties share
 * evenly, as torch's amax; `pad` copies of a row's last value pad its last block (counted in the ties,
 * their shares going to that value).  Each weight: t plus its shares (in float). */
void tdkm_normalise_grad_f32(const float *g, const float *w, int64_t rows, int64_t row_len, int64_t block,
                             const float *scale, const float *safe, const float *offset, const float *high,
                             const float *low, const float *extra_scale, const float *extra_offset, int64_t pad,
                             float *out) {
    FOR_EACH_BLOCK {
        BLOCK_SPAN;
        const float *gi = g + first_, *x = w + first_;
        float *y = out + first_, s = safe[at], o = offset ? offset[at] : 0.0f;
        float hi = high[at], lo = offset ? low[at] : -high[at];
        double sum_g, sum_gx;
        two_sums(gi, x, o, size, &sum_g, &sum_gx);
        int at_hi = 0, at_lo = 0; /* (int: the comparisons vectorize) */
        for (int64_t i = 0; i < size; i++) at_hi += x[i] == hi, at_lo += x[i] == lo;
        int last = b * block + size == row_len;
        if (last && pad) {
            at_hi += (int)pad * (x[size - 1] == hi);
            at_lo += (int)pad * (x[size - 1] == lo);
        }
        double grad_scale = (extra_scale ? extra_scale[at] : 0.0) - (scale[at] != 0.0f ? sum_gx / s / s : 0.0);
        double share_hi, share_lo;
        if (offset) {
            double grad_offset = (extra_offset ? extra_offset[at] : 0.0) - sum_g / s;
            share_hi = at_hi > 0 ? (grad_scale + grad_offset) / 2 / at_hi : 0.0;
            share_lo = at_lo > 0 ? (grad_offset - grad_scale) / 2 / at_lo : 0.0;
        } else {
            int ties = at_hi + at_lo;
            share_hi = hi != 0.0f && ties > 0 ? grad_scale / ties : 0.0;
            share_lo = -share_hi;
        }
        /* selects, not branches: the loop vectorizes */
        float to_hi = (float)share_hi, to_lo = (float)share_lo;
        for (int64_t i = 0; i < size; i++) y[i] = gi[i] / s + (x[i] == hi ? to_hi : 0.0f) + (x[i] == lo ? to_lo : 0.0f);
        if (last && pad) /* the padding copies' shares */
            y[size - 1] += (float)pad * ((x[size - 1] == hi ? to_hi : 0.0f) + (x[size - 1] == lo ? to_lo : 0.0f));
    }
}
