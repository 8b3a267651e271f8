/* lowbit's native matrix-vector kernels for packed integer weights (and plain fp32 weights).
 *
 * Every kernel computes y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for a few rows of x (decode:
 * one token, or a handful), reading the weight once per call.  Integer weights are read in the
 * layout lowbit stores them (compressed-tensors' pack: codes made unsigned, packed little-endian
 * into int32 words, so byte j of a 4-bit row holds codes 2j (low nibble) and 2j+1 (high nibble)):
 *
 *     W[n, k] = scale[n, g] * (u[n, k] - offset - zero[n, g]),   g = k / group_size,
 *
 * with offset 8 (4-bit) or 128 (8-bit), zero the signed zero point (none: 0).  Each group's dot
 * product is accumulated in fp32 over (u - offset - zero) (exact small integers) and then scaled:
 * the reference (dequantize, then matmul) differs only by where the scale multiply sits.
 *
 * Built once per machine by lowbit.packed.native (gcc -O3 -march=native -fopenmp), linked against
 * the OpenMP runtime torch already loaded, so both share one thread pool.  AVX-512 paths are used
 * where the compiler targets them and the group size is a multiple of 32 (4-bit) or 16 (8-bit);
 * otherwise plain loops (auto-vectorised for the machine) compute the same sums.
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LB_AVX512 1
#endif

#define LB_TILE 8 /* rows of x handled together: each weight group is unpacked once per tile */

int lowbit_native_avx512(void) {
#ifdef LB_AVX512
    return 1;
#else
    return 0;
#endif
}

static inline float zero_at(const int8_t *zero, int64_t n, int64_t ng, int64_t g) {
    return zero ? (float)zero[n * ng + g] : 0.0f;
}

/* Plain loop over one row n of a group-quantized weight, for a tile of mt (<= LB_TILE) rows of x. */
static void row_generic(const float *x, int64_t mt, int64_t K, const uint8_t *row, int bits, const float *scale,
                        const int8_t *zero, int64_t n, int64_t G, int64_t ng, float *acc) {
    const float offset = bits == 4 ? 8.0f : 128.0f;
    for (int64_t g = 0; g < ng; g++) {
        const float z = offset + zero_at(zero, n, ng, g), s = scale[n * ng + g];
        const int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
        for (int64_t m = 0; m < mt; m++) {
            const float *xm = x + m * K;
            float d = 0.0f;
            for (int64_t k = k0; k < k1; k++) {
                const int u = bits == 4 ? (row[k >> 1] >> ((k & 1) * 4)) & 15 : row[k];
                d += xm[k] * ((float)u - z);
            }
            acc[m] += s * d;
        }
    }
}

#ifdef LB_AVX512
/* Helpers of the tile kernels (up to LB_TILE rows of x against one weight row): add x[m, k:k+16] * w to each
 * row's partial sum of the group; at a group's end, fold the partial sums into the accumulators with its scale. */
static inline void tile_fma(__m512 *part, const float *x, int64_t K, int64_t k, int64_t mt, __m512 w) {
    for (int64_t m = 0; m < mt; m++) part[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w, part[m]);
}

static inline void tile_group_end(__m512 *acc, __m512 *part, int64_t mt, float scale) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t m = 0; m < mt; m++) {
        acc[m] = _mm512_fmadd_ps(s, part[m], acc[m]);
        part[m] = _mm512_setzero_ps();
    }
}

/* A 4- or 8-bit row (group size a multiple of 32 / 16) against a tile of x.  For 4 bits x arrives
 * deinterleaved per 32 columns (16 even columns, then the 16 odd ones), so 16 packed bytes widen to 16 int32
 * lanes whose low nibbles are the even codes and whose high nibbles the odd ones: no byte shuffles.  The zero
 * point is subtracted in integers (exact), each group's dot product accumulated in fp32, then scaled. */
static void row_tile_avx512(const float *x, int64_t mt, int64_t K, const uint8_t *row, int bits, const float *scale,
                            const int8_t *zero, int64_t n, int64_t G, int64_t ng, float *out) {
    const __m512i low4 = _mm512_set1_epi32(15);
    __m512 acc[LB_TILE], part[LB_TILE];
    for (int64_t m = 0; m < mt; m++) acc[m] = part[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const __m512i z = _mm512_set1_epi32((bits == 4 ? 8 : 128) + (zero ? zero[n * ng + g] : 0));
        for (int64_t k = g * G; k < (g + 1) * G; k += bits == 4 ? 32 : 16) {
            if (bits == 4) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (k >> 1))));
                tile_fma(part, x, K, k, mt, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, low4), z)));
                tile_fma(part, x, K, k + 16, mt, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), z)));
            } else {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k)));
                tile_fma(part, x, K, k, mt, _mm512_cvtepi32_ps(_mm512_sub_epi32(v, z)));
            }
        }
        tile_group_end(acc, part, mt, scale[n * ng + g]);
    }
    for (int64_t m = 0; m < mt; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

/* row_q4_avx512 for one token, its accumulators in registers (the tile version keeps them in arrays indexed at
 * run time, which the compiler leaves in memory).  Each group's 16 possible weights scale * (u - 8 - zero)
 * form a table, and vpermps looks codes up in it (it reads only the low 4 bits of each lane, so the even
 * codes need no mask): the products are those of the dequantized weight itself, with no per-weight
 * conversion or scaling (a 4-row variant sharing the loads of x measured slower here). */
static float row_q4_avx512_m1(const float *xd, const uint8_t *row, const float *scale, const int8_t *zero, int64_t n,
                              int64_t G, int64_t ng) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const __m512 z = _mm512_set1_ps(8.0f + zero_at(zero, n, ng, g));
        const __m512 table = _mm512_mul_ps(_mm512_set1_ps(scale[n * ng + g]), _mm512_sub_ps(iota, z));
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (k >> 1))));
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(xd + k), _mm512_permutexvar_ps(v, table), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(xd + k + 16), _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table),
                                   acc1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

#endif

/* y (M, N) = x (M, K) @ W^T (+ bias) for a bits-bit (4 or 8) group-quantized W stored as
 * (N, K * bits / 8) bytes; scale (N, ng) fp32, zero (N, ng) int8 signed or NULL, ng = ceil(K / G). */
void lowbit_qgemv(const float *x, int64_t M, int64_t K, const uint8_t *w, int bits, const float *scale,
                  const int8_t *zero, int64_t N, int64_t G, const float *bias, float *y, int threads) {
    const int64_t ng = (K + G - 1) / G, row_bytes = K * bits / 8;
#ifdef LB_AVX512
    const int fast = K % G == 0 && G % (bits == 4 ? 32 : 16) == 0;
    const float *xd = x;
    float *scratch = NULL;
    if (fast && bits == 4 && (scratch = malloc(sizeof(float) * M * K))) { /* each 32 columns: 16 even, 16 odd */
        for (int64_t i = 0; i < M * K; i += 32)
            for (int j = 0; j < 16; j++) {
                scratch[i + j] = x[i + 2 * j];
                scratch[i + 16 + j] = x[i + 2 * j + 1];
            }
        xd = scratch;
    }
    const int q4fast = scratch != NULL;
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += LB_TILE) {
            const int64_t mt = M - m0 < LB_TILE ? M - m0 : LB_TILE;
            float acc[LB_TILE] = {0};
#ifdef LB_AVX512
            if (q4fast && mt == 1)
                acc[0] = row_q4_avx512_m1(xd + m0 * K, row, scale, zero, n, G, ng);
            else if (q4fast || (fast && bits == 8))
                row_tile_avx512(xd + m0 * K, mt, K, row, bits, scale, zero, n, G, ng, acc);
            else
#endif
                row_generic(x + m0 * K, mt, K, row, bits, scale, zero, n, G, ng, acc);
            for (int64_t m = 0; m < mt; m++) y[(m0 + m) * N + n] = acc[m] + (bias ? bias[n] : 0.0f);
        }
    }
#ifdef LB_AVX512
    free(scratch);
#endif
}

/* y (M, N) = x (M, K) @ W^T (+ bias) for a plain fp32 W (N, K): a large output head read at full
 * memory bandwidth, each thread streaming its own rows. */
void lowbit_fgemv(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias, float *y,
                  int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *row = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += LB_TILE) {
            const int64_t mt = M - m0 < LB_TILE ? M - m0 : LB_TILE;
            float acc[LB_TILE] = {0};
            int64_t k = 0;
#ifdef LB_AVX512
            __m512 v[LB_TILE];
            for (int64_t m = 0; m < mt; m++) v[m] = _mm512_setzero_ps();
            for (; k + 16 <= K; k += 16) {
                const __m512 wv = _mm512_loadu_ps(row + k);
                for (int64_t m = 0; m < mt; m++)
                    v[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (m0 + m) * K + k), wv, v[m]);
            }
            for (int64_t m = 0; m < mt; m++) acc[m] = _mm512_reduce_add_ps(v[m]);
#endif
            for (int64_t m = 0; m < mt; m++)
                for (int64_t kk = k; kk < K; kk++) acc[m] += x[(m0 + m) * K + kk] * row[kk];
            for (int64_t m = 0; m < mt; m++) y[(m0 + m) * N + n] = acc[m] + (bias ? bias[n] : 0.0f);
        }
    }
}

/* out (N, K) fp32 = the dequantized weight, W[n, k] = scale[n, g] * (u - offset - zero[n, g]), in one pass over
 * the packed bytes (the prefill path multiplies it with a BLAS GEMM).  Every value is the same single rounding
 * of scale * (an exact small integer) as lowbit.packed.kernels.dequantize_packed's torch expression. */
#ifdef LB_AVX512
static void dequant_q4_row_avx512(const uint8_t *row, const float *scale, const int8_t *zero, int64_t n, int64_t G,
                                  int64_t ng, float *o) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t g = 0; g < ng; g++) {
        const __m512 table = _mm512_mul_ps(_mm512_set1_ps(scale[n * ng + g]),
                                           _mm512_sub_ps(iota, _mm512_set1_ps(8.0f + zero_at(zero, n, ng, g))));
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (k >> 1))));
            const __m512 even = _mm512_permutexvar_ps(v, table);
            const __m512 odd = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
            _mm512_storeu_ps(o + k, _mm512_permutex2var_ps(even, first, odd));
            _mm512_storeu_ps(o + k + 16, _mm512_permutex2var_ps(even, second, odd));
        }
    }
}

static void dequant_q8_row_avx512(const uint8_t *row, const float *scale, const int8_t *zero, int64_t n, int64_t G,
                                  int64_t ng, float *o) {
    for (int64_t g = 0; g < ng; g++) {
        const __m512i z = _mm512_set1_epi32(128 + (zero ? zero[n * ng + g] : 0));
        const __m512 s = _mm512_set1_ps(scale[n * ng + g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k)));
            _mm512_storeu_ps(o + k, _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(v, z))));
        }
    }
}
#endif

void lowbit_dequant(const uint8_t *w, int bits, const float *scale, const int8_t *zero, int64_t N, int64_t K,
                    int64_t G, float *out, int threads) {
    const int64_t ng = (K + G - 1) / G, row_bytes = K * bits / 8;
    const float offset = bits == 4 ? 8.0f : 128.0f;
#ifdef LB_AVX512
    const int fast = K % G == 0 && G % (bits == 4 ? 32 : 16) == 0;
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        float *o = out + n * K;
#ifdef LB_AVX512
        if (fast && bits == 4) {
            dequant_q4_row_avx512(row, scale, zero, n, G, ng, o);
            continue;
        }
        if (fast) {
            dequant_q8_row_avx512(row, scale, zero, n, G, ng, o);
            continue;
        }
#endif
        for (int64_t g = 0; g < ng; g++) {
            const float z = offset + zero_at(zero, n, ng, g), s = scale[n * ng + g];
            const int64_t k1 = (g + 1) * G < K ? (g + 1) * G : K;
            if (bits == 4)
                for (int64_t k = g * G; k < k1; k++) o[k] = s * ((float)((row[k >> 1] >> ((k & 1) * 4)) & 15) - z);
            else
                for (int64_t k = g * G; k < k1; k++) o[k] = s * ((float)row[k] - z);
        }
    }
}
