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
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const uint8_t *packed;
    int64_t nbytes;
    int64_t bits, dim, group_size, row_len, vectors;
    const float *lut; /* (G, 2**bits, dim) */
    const void *scales, *offsets; /* (rows, blocks), or NULL: no block scales (no offsets) */
    int64_t block, blocks, half;   /* half: the scales are float16 (as stored), else float32 */
} palette;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86 1
#define AVX512 __attribute__((target("avx512f,avx512bw")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))
#else
#define HAVE_X86 0
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
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

/* Index q of the stream (scalar): the bits may straddle two bytes. */
static uint32_t index_at(const palette *p, int64_t q) {
    int64_t bit = q * p->bits, byte = bit >> 3;
    uint32_t word = p->packed[byte];
    if (byte + 1 < p->nbytes) word |= (uint32_t)p->packed[byte + 1] << 8;
    return (word >> (bit & 7)) & ((1u << p->bits) - 1u);
}

/* Weights [i0, i1) of row o, into out[0 .. i1 - i0) (any dim, any row length). */
static void row_scalar(const palette *p, int64_t o, int64_t i0, int64_t i1, float *out) {
    int64_t g = o / p->group_size, pos = (o - g * p->group_size) * p->row_len + i0;
    int64_t v = pos / p->dim, c = pos % p->dim, base = g * p->vectors;
    const float *table = p->lut + (g << p->bits) * p->dim;
    uint32_t key = index_at(p, base + v);
    for (int64_t i = i0; i < i1; i++) {
        *out++ = table[key * p->dim + c];
        if (++c == p->dim && i + 1 < i1) c = 0, key = index_at(p, base + ++v);
    }
}

/* A row is vectorised in chunks of 16 indices (16 * dim weights). */
#define CHUNK 16

/* Entry q of a float16 (half) or float32 table, as float32 (float16 widens exactly). */
static float stored_at(const void *table, int64_t half, int64_t q) {
    if (!half) return ((const float *)table)[q];
    uint32_t h = ((const uint16_t *)table)[q], sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | man << 13; /* inf, nan */
    else if (exp) bits = sign | (exp + 112) << 23 | man << 13;
    else if (man) { /* subnormal: normalised, one exponent step per shift */
        uint32_t e = 113;
        while (!(man & 0x400u)) man <<= 1, e--;
        bits = sign | e << 23 | (man & 0x3ffu) << 13;
    } else bits = sign;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Block scales on weights [i0, i0 + n) of row o, decoded into w (the scalar paths and the tails). */
static void scale_row(const palette *p, int64_t o, int64_t i0, int64_t n, float *w) {
    if (!p->scales) return;
    for (int64_t i = 0; i < n;) { /* a block at a time: one scale (and offset) per loop, which vectorises */
        int64_t b = (i0 + i) / p->block, end = (b + 1) * p->block - i0;
        float scale = stored_at(p->scales, p->half, o * p->blocks + b);
        float shift = p->offsets ? stored_at(p->offsets, p->half, o * p->blocks + b) : 0.0f;
        if (end > n) end = n;
        if (p->offsets)
            for (; i < end; i++) w[i] = w[i] * scale + shift;
        else
            for (; i < end; i++) w[i] = w[i] * scale;
    }
}

/* Each 16-index chunk's block, for the rows' chunks (NULL without scales): the vector loops' lookup. */
static int32_t *chunk_blocks(const palette *p, int64_t chunks) {
    if (!p->scales) return NULL;
    int32_t *out = (int32_t *)malloc((size_t)(chunks > 0 ? chunks : 1) * sizeof(int32_t));
    if (out)
        for (int64_t c = 0; c < chunks; c++) out[c] = (int32_t)(c * CHUNK * p->dim / p->block);
    return out;
}

/* Up to 32 bytes of the stream from `byte`, zero-padded past its end: a whole load when it fits. */
static const uint8_t *bytes_at(const palette *p, int64_t byte, uint8_t *spare) {
    if (byte + 32 <= p->nbytes) return p->packed + byte;
    memset(spare, 0, 32);
    if (byte < p->nbytes) memcpy(spare, p->packed + byte, (size_t)(p->nbytes - byte));
    return spare;
}


/* How many of a row's `whole` vectors, from its byte `start` on (`step` bytes a chunk), can be read with
 * whole loads, in groups of `unroll` chunks (the rest go through bytes_at: only the tensor's last rows). */
static int64_t whole_loads(const palette *p, int64_t start, int64_t step, int64_t whole, int unroll) {
    int64_t room = p->nbytes - 32 - start;
    int64_t chunks = room < 0 ? 0 : room / step + 1;
    if (chunks * CHUNK > whole) chunks = whole / CHUNK;
    return chunks / unroll * unroll * CHUNK;
}


#if HAVE_X86
/* -- AVX-512: 16 indices a chunk ------------------------------------------------------------------------ */
typedef struct {
    __m512i pick, right, mask; /* per lane: the two bytes holding its bits, the shift, the bit mask */
    __m512 t[4];               /* the first 64 LUT entries (of this row's group), for the permutes */
    const float *table;
    int64_t entries;
} unpack512;

/* Lane l's index starts at bit shift + l * bits of 16 bytes (shift < 8): it lies in bytes b and b + 1,
 * b = (shift + l * bits) / 8, which a byte shuffle brings to the lane's low half (the 16 bytes are
 * broadcast to the four 128-bit lanes, as the shuffle stays in its lane).  Keys read through permutes
 * need no mask: a permute of 2**n entries reads the low n bits, and a LUT of fewer than 16 is repeated
 * to 16, so whatever lies above an index's bits picks the same entry. */
static void lanes(int64_t bits, int64_t shift, int n, int32_t *pick, int32_t *right) {
    for (int l = 0; l < n; l++) {
        int64_t off = shift + l * bits, b = off >> 3;
        pick[l] = (int32_t)(b | (b + 1 < 16 ? b + 1 : 0x80) << 8 | 0x80800000u);
        right[l] = (int32_t)(off & 7);
    }
}

static void first_entries(const float *table, int64_t entries, int64_t dim, float *first) {
    for (int i = 0; i < 64; i++) first[i] = dim == 1 || i < entries ? table[i & (entries - 1)] : 0.0f;
}

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

AVX512 INLINE void rows512(const palette *p, int64_t o, float *out, const int dim, const int mode) {
    int64_t row_vectors = p->row_len / dim, whole = row_vectors / CHUNK * CHUNK;
    int64_t g = o / p->group_size, q0 = g * p->vectors + (o - g * p->group_size) * row_vectors;
    unpack512 u = setup512(p, (q0 * p->bits) & 7, p->lut + (g << p->bits) * dim);
    uint8_t spare[32];
    for (int64_t v = 0; v < whole; v += CHUNK) {
        __m512 w[4];
        weights512(bytes_at(p, ((q0 + v) * p->bits) >> 3, spare), &u, dim, mode, w);
        for (int s = 0; s < dim; s++) _mm512_storeu_ps(out + v * dim + s * 16, w[s]);
    }
    if (whole * dim < p->row_len) row_scalar(p, o, whole * dim, p->row_len, out + whole * dim);
}

/* -- AVX2: 8 indices a chunk (two per 16-index chunk, so chunks and tails line up with AVX-512's) ---------- */
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

AVX2 INLINE void rows256(const palette *p, int64_t o, float *out, const int dim, const int mode) {
    int64_t row_vectors = p->row_len / dim, whole = row_vectors / CHUNK * CHUNK;
    int64_t g = o / p->group_size, q0 = g * p->vectors + (o - g * p->group_size) * row_vectors;
    unpack256 u = setup256(p, (q0 * p->bits) & 7, p->lut + (g << p->bits) * dim);
    uint8_t spare[32];
    for (int64_t v = 0; v < whole; v += CHUNK / 2) {
        __m256 w[4];
        weights256(bytes_at(p, ((q0 + v) * p->bits) >> 3, spare), &u, dim, mode, w);
        for (int s = 0; s < dim; s++) _mm256_storeu_ps(out + v * dim + s * 8, w[s]);
    }
    if (whole * dim < p->row_len) row_scalar(p, o, whole * dim, p->row_len, out + whole * dim);
}

/* The lookup mode of a palette for a vector width: by how many float entries its LUT has (dim << bits). */
static int mode_of(const palette *p, int wide) {
    int64_t entries = p->dim << p->bits;
    if (wide) return entries <= 16 ? 0 : entries <= 32 ? 1 : entries <= 64 ? 2 : 3;
    return entries <= 8 ? 0 : entries <= 16 ? 1 : 2;
}

/* One specialised copy per (dim, batch rows, lookup mode): accumulators in registers, no branch per chunk. */
#define BY_MODE(fn, mode, ...)                                                                                     \
    switch (mode) {                                                                                               \
    case 0: fn(__VA_ARGS__, 0); break;                                                                            \
    case 1: fn(__VA_ARGS__, 1); break;                                                                            \
    case 2: fn(__VA_ARGS__, 2); break;                                                                            \
    default: fn(__VA_ARGS__, 3); break;                                                                           \
    }
#define BY_BATCH(fn, mode, nb, ...)                                                                                \
    switch (nb) {                                                                                                 \
    case 1: BY_MODE(fn, mode, __VA_ARGS__, 1) break;                                                              \
    case 2: BY_MODE(fn, mode, __VA_ARGS__, 2) break;                                                              \
    case 4: BY_MODE(fn, mode, __VA_ARGS__, 4) break;                                                              \
    default: BY_MODE(fn, mode, __VA_ARGS__, 8) break;                                                             \
    }
#define BY_DIM(fn, mode, nb, ...)                                                                                  \
    switch (p->dim) {                                                                                             \
    case 1: BY_BATCH(fn, mode, nb, __VA_ARGS__, 1) break;                                                         \
    case 2: BY_BATCH(fn, mode, nb, __VA_ARGS__, 2) break;                                                         \
    default: BY_BATCH(fn, mode, nb, __VA_ARGS__, 4) break;                                                        \
    }
AVX512 static void gemv512_any(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, float *y, int64_t ys,
                               const int32_t *cb, float *srow, int nb) {
    BY_DIM(gemv512, mode_of(p, 1), nb, p, r0, r1, x, xs, y, ys, cb, srow)
}
AVX2 static void gemv256_any(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, float *y, int64_t ys,
                             const int32_t *cb, float *srow, int nb) {
    BY_DIM(gemv256, mode_of(p, 0), nb, p, r0, r1, x, xs, y, ys, cb, srow)
}
#define ROWS(fn, mode, o, out)                                                                                     \
    switch (p->dim) {                                                                                             \
    case 1: BY_MODE(fn, mode, p, o, out, 1) break;                                                                \
    case 2: BY_MODE(fn, mode, p, o, out, 2) break;                                                                \
    default: BY_MODE(fn, mode, p, o, out, 4) break;                                                               \
    }
AVX512 static void rows512_any(const palette *p, int64_t o, float *out) { ROWS(rows512, mode_of(p, 1), o, out) }
AVX2 static void rows256_any(const palette *p, int64_t o, float *out) { ROWS(rows256, mode_of(p, 0), o, out) }
#endif
/* Whether rows of this palette take the vector loops: dim 1, 2 or 4, no vector across two rows. */
static int vectorised(const palette *p) {
    return (p->dim == 1 || p->dim == 2 || p->dim == 4) && p->row_len % p->dim == 0 && tdkm_lut_isa(-1) != ISA_SCALAR;
}

/* Whether the block scales (if any) leave every chunk in one block (else gemv takes the scalar loop). */
int64_t tdkm_lut_row_len(const palette *p) { return p->row_len; }

int tdkm_lut_whole_chunks(const palette *p) {
    return !p->scales || p->block >= p->row_len || p->block % (CHUNK * p->dim) == 0;
}

/* out[j * row_len ..] = row rows[j] of W, for j < n; `scaled`: with the block scales applied (w * s + o, two
 * roundings, as the decoder computes them), else the LUT entries. */
void tdkm_lut_rows(const palette *p, const int64_t *rows, int64_t n, float *out, int scaled) {
    int vector = vectorised(p), which = tdkm_lut_isa(-1);
    for (int64_t j = 0; j < n; j++, out += p->row_len) {
#if HAVE_X86
        if (vector && which == ISA_AVX512) rows512_any(p, rows[j], out);
        else if (vector && which == ISA_AVX2) rows256_any(p, rows[j], out);
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
        if (vector && which == ISA_AVX512) gemv512_any(p, r0, r1, x, xs, y, ys, cb, srow, step);
        else if (vector && which == ISA_AVX2) gemv256_any(p, r0, r1, x, xs, y, ys, cb, srow, step);
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
