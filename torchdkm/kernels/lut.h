/* Shared by the inference loops (lut.c, lut_avx512.c, lut_avx2.c): the packed weight's view, the scalar
 * helpers every path uses, and the specialisation macros.  Helpers are plain `static` (each file has its
 * own copy, inlined or not as the compiler decides, as when the loops were one file): marking them
 * `inline` here made the batch-1 product 2x slower (the hot loops' code changed).  See lut.c for the
 * layout of the stream and what each loop computes. */
#ifndef TDKM_LUT_H
#define TDKM_LUT_H
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

#define SHARED static __attribute__((unused))

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

/* The instruction set in use (lut.c): -1 the current choice, else the best supported one up to `want`. */
int tdkm_lut_isa(int want);
/* lut.c's and lut_gemm.c's loops (pool.c runs them on threads, lut_gemm's GEMM_PANEL outputs at a time). */
#define GEMM_PANEL 32
int tdkm_lut_gemv(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, int64_t nb, float *y, int64_t ys);
void tdkm_lut_rows(const palette *p, const int64_t *rows, int64_t n, float *out, int scaled);
int tdkm_lut_gemm(const palette *p, int part, int parts, const float *x, int64_t xs, int64_t n, float *y, int64_t ys,
                  const float *bias, float *packed, int64_t *taken);
int64_t tdkm_lut_gemm_blocks(const palette *p, int64_t n);
int tdkm_lut_gemm_ok(const palette *p);
float *tdkm_lut_gemm_buffer(void);
/* pool.c: wait for every thread of the team running the current tdkm_parallel (parts > 1 only). */
void tdkm_barrier(void);

/* Index q of the stream (scalar): the bits may straddle two bytes. */
SHARED uint32_t index_at(const palette *p, int64_t q) {
    int64_t bit = q * p->bits, byte = bit >> 3;
    uint32_t word = p->packed[byte];
    if (byte + 1 < p->nbytes) word |= (uint32_t)p->packed[byte + 1] << 8;
    return (word >> (bit & 7)) & ((1u << p->bits) - 1u);
}

/* Weights [i0, i1) of row o, into out[0 .. i1 - i0) (any dim, any row length). */
SHARED void row_scalar(const palette *p, int64_t o, int64_t i0, int64_t i1, float *out) {
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
SHARED float stored_at(const void *table, int64_t half, int64_t q) {
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
SHARED void scale_row(const palette *p, int64_t o, int64_t i0, int64_t n, float *w) {
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

/* Up to 32 bytes of the stream from `byte`, zero-padded past its end: a whole load when it fits. */
SHARED const uint8_t *bytes_at(const palette *p, int64_t byte, uint8_t *spare) {
    if (byte + 32 <= p->nbytes) return p->packed + byte;
    memset(spare, 0, 32);
    if (byte < p->nbytes) memcpy(spare, p->packed + byte, (size_t)(p->nbytes - byte));
    return spare;
}

/* How many of a row's `whole` vectors, from its byte `start` on (`step` bytes a chunk), can be read with
 * whole loads, in groups of `unroll` chunks (the rest go through bytes_at: only the tensor's last rows). */
SHARED int64_t whole_loads(const palette *p, int64_t start, int64_t step, int64_t whole, int unroll) {
    int64_t room = p->nbytes - 32 - start;
    int64_t chunks = room < 0 ? 0 : room / step + 1;
    if (chunks * CHUNK > whole) chunks = whole / CHUNK;
    return chunks / unroll * unroll * CHUNK;
}

#if HAVE_X86
/* Lane l's index starts at bit shift + l * bits of 16 bytes (shift < 8): it lies in bytes b and b + 1,
 * b = (shift + l * bits) / 8, which a byte shuffle brings to the lane's low half (the 16 bytes are
 * broadcast to the four 128-bit lanes, as the shuffle stays in its lane).  Keys read through permutes
 * need no mask: a permute of 2**n entries reads the low n bits, and a LUT of fewer than 16 is repeated
 * to 16, so whatever lies above an index's bits picks the same entry. */
SHARED void lanes(int64_t bits, int64_t shift, int n, int32_t *pick, int32_t *right) {
    for (int l = 0; l < n; l++) {
        int64_t off = shift + l * bits, b = off >> 3;
        pick[l] = (int32_t)(b | (b + 1 < 16 ? b + 1 : 0x80) << 8 | 0x80800000u);
        right[l] = (int32_t)(off & 7);
    }
}

SHARED void first_entries(const float *table, int64_t entries, int64_t dim, float *first) {
    for (int i = 0; i < 64; i++) first[i] = dim == 1 || i < entries ? table[i & (entries - 1)] : 0.0f;
}

/* The lookup mode of a palette for a vector width: by how many float entries its LUT has (dim << bits). */
SHARED int mode_of(const palette *p, int wide) {
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
#define ROWS(fn, mode, ...)                                                                                        \
    switch (p->dim) {                                                                                             \
    case 1: BY_MODE(fn, mode, __VA_ARGS__, 1) break;                                                              \
    case 2: BY_MODE(fn, mode, __VA_ARGS__, 2) break;                                                              \
    default: BY_MODE(fn, mode, __VA_ARGS__, 4) break;                                                             \
    }

void tdkm_gemv512_any(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, float *y, int64_t ys,
                      const int32_t *cb, float *srow, int nb);
void tdkm_gemv256_any(const palette *p, int64_t r0, int64_t r1, const float *x, int64_t xs, float *y, int64_t ys,
                      const int32_t *cb, float *srow, int nb);
void tdkm_rows512_any(const palette *p, int64_t o0, int64_t nr, int64_t i0, int64_t i1, float *out, int64_t stride);
void tdkm_rows256_any(const palette *p, int64_t o, int64_t i0, int64_t i1, float *out);
#endif
#endif
