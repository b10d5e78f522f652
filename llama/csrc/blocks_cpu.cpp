// Matrix products with weights in GGUF's blocks of 32 (llama/block_quant.py) for x86 CPUs with AVX-512 VNNI,
// called from llama/blocks_cpu.py through ctypes.
//
// y = x @ W.T, where each row of W (N, K) is cut into blocks of 32 values with float16 scales: Q4 blocks hold
// w = scale * q + min (q in 0..15), Q8 blocks w = scale * q (q int8). Each row of x (M, K) is quantized here, 32
// values at a time, to int8 q_x with one float scale d_x per block (llama.cpp's Q8_0 activations), so that a
// block's products are integer dot products (VPDPBUSD: unsigned bytes times signed bytes, summed four at a time):
//   Q4: sum_i w_i x_i = d_x * (scale * sum(q q_x) + min * sum(q_x))
//   Q8: the weights are stored as q + 128 (unsigned), so sum(q q_x) = sum((q + 128) q_x) - 128 * sum(q_x).
//
// Packed weights (llama/blocks_cpu.py, pack): (N_pad / 64, K / 32, block bytes), one stream per group
// of 64 rows. A block of a group holds its values as registers of 16 rows x 4 bytes (the layout VPDPBUSD sums
// over), step by step along k and, within a step, rows 0-15, 16-31, 32-47, 48-63; then the 64 rows' float16 scales
// (and, for Q4, mins). A Q4 step covers 8 k: byte t of a row holds k = t in its low nibble and k = t + 4 in its
// high nibble. Per weight that is 0.625 bytes for Q4 (as GGUF's Q4_1), 0.5625 for Q4 blocks whose minimum is -8
// scale (GGUF's Q4_0, packed without minimums), and 1.0625 for Q8.

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))

namespace {

constexpr int64_t kRows = 64;   // weight rows per packed group: four registers of 16 int32 lanes
constexpr int64_t kBlock = 32;  // values that share a scale, in weights and in activations
constexpr int64_t kAhead = 4;   // blocks prefetched ahead while streaming a group from DRAM

VNNI inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

VNNI inline __m512 load16(const uint16_t* p) {  // bfloat16 -> float32: the upper half of the float's bits
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

VNNI inline void store16(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }

VNNI inline void store16(uint16_t* p, __m512 v, __mmask16 mask) {  // float32 -> bfloat16, round to nearest even
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

VNNI inline __m512i broadcast4(const int8_t* p) {  // four activation bytes into every lane
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm512_set1_epi32(four);
}

VNNI inline __m512 halves(const uint8_t* p) {  // 16 float16 -> float32
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The activations as the kernels take them: q (M, K) int8, and per block its scale d and sum(q) (as a float).
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> d, sum;
  int64_t K, blocks;
};

template <typename T>
VNNI void quantize_row(const T* x, int64_t K, int8_t* q, float* d, float* sum) {
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    __m512 lo = load16(x + k0), hi = load16(x + k0 + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0 + 16), _mm512_cvtsepi32_epi8(qhi));
    d[k0 / kBlock] = amax / 127.f;
    sum[k0 / kBlock] = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
  }
}

template <typename T>
Activations quantize(const T* x, int64_t M, int64_t K) {
  Activations a{std::vector<int8_t>(M * K), std::vector<float>(M * (K / kBlock)), std::vector<float>(M * (K / kBlock)),
                K, K / kBlock};
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(x + m * K, K, a.q.data() + m * K, a.d.data() + m * a.blocks, a.sum.data() + m * a.blocks);
  });
  return a;
}

// One block of a group for MT activation rows: `dot` adds its integer products to sum (four registers of 16 rows
// each), `fold` scales them into acc.
struct Q4 {
  static constexpr int64_t kBytes = 16 * 64 + 2 * kRows * 2;  // values, then 64 scales and 64 mins (float16)

  template <int MT>
  VNNI static inline void dot(const uint8_t* w, const int8_t* const x[MT], __m512i sum[MT][4]) {
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    for (int s = 0; s < 4; ++s)  // 8 k a step
      for (int r = 0; r < 4; ++r) {
        __m512i packed = _mm512_loadu_si512(w + (s * 4 + r) * 64);
        __m512i lo = _mm512_and_si512(packed, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
        for (int m = 0; m < MT; ++m) {
          sum[m][r] = _mm512_dpbusd_epi32(sum[m][r], lo, broadcast4(x[m] + 8 * s));
          sum[m][r] = _mm512_dpbusd_epi32(sum[m][r], hi, broadcast4(x[m] + 8 * s + 4));
        }
      }
  }

  template <int MT>
  VNNI static inline void fold(const uint8_t* w, const float d[MT], const float qsum[MT], __m512i sum[MT][4],
                               __m512 acc[MT][4]) {
    for (int r = 0; r < 4; ++r) {
      __m512 scale = halves(w + 16 * 64 + r * 32), min = halves(w + 16 * 64 + 128 + r * 32);
      for (int m = 0; m < MT; ++m) {
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m][r]), _mm512_mul_ps(scale, _mm512_set1_ps(d[m])),
                                    acc[m][r]);
        acc[m][r] = _mm512_fmadd_ps(min, _mm512_set1_ps(d[m] * qsum[m]), acc[m][r]);
      }
    }
  }
};

// Blocks whose weights are scale * (u - kOffset) for unsigned stored values u, so that sum_i w_i x_i =
// d_x * scale * (sum(u q_x) - kOffset * sum(q_x)): no minimum stored.
template <int kOffset, int64_t kValueBytes>
struct Offset {
  static constexpr int64_t kBytes = kValueBytes + kRows * 2;  // values, then 64 scales (float16)

  template <int MT>
  VNNI static inline void fold(const uint8_t* w, const float d[MT], const float qsum[MT], __m512i sum[MT][4],
                               __m512 acc[MT][4]) {
    for (int r = 0; r < 4; ++r) {
      __m512 scale = halves(w + kValueBytes + r * 32);
      for (int m = 0; m < MT; ++m) {
        __m512 products = _mm512_sub_ps(_mm512_cvtepi32_ps(sum[m][r]), _mm512_set1_ps(kOffset * qsum[m]));
        acc[m][r] = _mm512_fmadd_ps(products, _mm512_mul_ps(scale, _mm512_set1_ps(d[m])), acc[m][r]);
      }
    }
  }
};

// GGUF's Q4_0: Q4 blocks whose minimum is -8 scale, w = scale * (q - 8), kept without their minimums (0.5625
// bytes a weight).
struct Q4_0 : Offset<8, 16 * 64> {
  template <int MT>
  VNNI static inline void dot(const uint8_t* w, const int8_t* const x[MT], __m512i sum[MT][4]) {
    Q4::dot<MT>(w, x, sum);
  }
};

struct Q8 : Offset<128, 32 * 64> {  // values stored + 128
  template <int MT>
  VNNI static inline void dot(const uint8_t* w, const int8_t* const x[MT], __m512i sum[MT][4]) {
    for (int s = 0; s < 8; ++s)  // 4 k a step
      for (int r = 0; r < 4; ++r) {
        __m512i values = _mm512_loadu_si512(w + (s * 4 + r) * 64);
        for (int m = 0; m < MT; ++m) sum[m][r] = _mm512_dpbusd_epi32(sum[m][r], values, broadcast4(x[m] + 4 * s));
      }
  }
};

// Rows m0..m0+MT of out, columns of the group at row n0 (those past N dropped).
template <class F, int MT, bool kPrefetch, typename T>
VNNI void tile(const uint8_t* group, const Activations& a, int64_t m0, int64_t n0, int64_t N, T* out) {
  __m512 acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.blocks; ++b) {
    const uint8_t* w = group + b * F::kBytes;
    if (kPrefetch)  // the weights stream from DRAM: ask for a block ahead
      for (int64_t i = 0; i < F::kBytes; i += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w) + kAhead * F::kBytes + i, _MM_HINT_T0);
    const int8_t* x[MT];
    float d[MT], qsum[MT];
    for (int m = 0; m < MT; ++m) {
      x[m] = a.q.data() + (m0 + m) * a.K + b * kBlock;
      d[m] = a.d[(m0 + m) * a.blocks + b];
      qsum[m] = a.sum[(m0 + m) * a.blocks + b];
    }
    __m512i sum[MT][4];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < 4; ++r) sum[m][r] = _mm512_setzero_si512();
    F::template dot<MT>(w, x, sum);
    F::template fold<MT>(w, d, qsum, sum, acc);
  }
  for (int r = 0; r < 4; ++r) {
    int64_t n = n0 + r * 16;
    if (n >= N) break;
    __mmask16 mask = N - n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (N - n)) - 1);
    for (int m = 0; m < MT; ++m) store16(out + (m0 + m) * N + n, acc[m][r], mask);
  }
}

// `rows` (1 to 4) rows of x from m0 on times the whole group. The first pass over a group streams it from DRAM
// (prefetching); later ones find it in the L2 cache.
template <class F, typename T>
VNNI void pass(const uint8_t* group, const Activations& a, int64_t m0, int64_t rows, bool first, int64_t n0,
               int64_t N, T* out) {
  switch (rows * 2 + first) {
    case 2: return tile<F, 1, false>(group, a, m0, n0, N, out);
    case 3: return tile<F, 1, true>(group, a, m0, n0, N, out);
    case 4: return tile<F, 2, false>(group, a, m0, n0, N, out);
    case 5: return tile<F, 2, true>(group, a, m0, n0, N, out);
    case 6: return tile<F, 3, false>(group, a, m0, n0, N, out);
    case 7: return tile<F, 3, true>(group, a, m0, n0, N, out);
    case 8: return tile<F, 4, false>(group, a, m0, n0, N, out);
    default: return tile<F, 4, true>(group, a, m0, n0, N, out);
  }
}

template <class F, typename T>
VNNI void linear(const T* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, T* out) {
  const Activations a = quantize(x, M, K);
  // Four rows a pass keep 32 registers of sums busy, a few of them spilled: fewer passes over a group pay for
  // that up to about 8 rows; beyond, three a pass fit the registers (5-10 % faster at 512 rows when measured).
  const int64_t tile_rows = M <= 8 ? 4 : 3;
  at::parallel_for(0, (N + kRows - 1) / kRows, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t m = 0; m < M; m += tile_rows)
        pass<F>(w + g * a.blocks * F::kBytes, a, m, std::min(tile_rows, M - m), m == 0, g * kRows, N, out);
  });
}

}  // namespace

extern "C" {

void llama_q4_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, uint16_t* out) {
  linear<Q4>(x, M, K, w, N, out);
}

void llama_q4_linear_f32(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* out) {
  linear<Q4>(x, M, K, w, N, out);
}

void llama_q4_0_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, uint16_t* out) {
  linear<Q4_0>(x, M, K, w, N, out);
}

void llama_q4_0_linear_f32(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* out) {
  linear<Q4_0>(x, M, K, w, N, out);
}

void llama_q8_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, uint16_t* out) {
  linear<Q8>(x, M, K, w, N, out);
}

void llama_q8_linear_f32(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* out) {
  linear<Q8>(x, M, K, w, N, out);
}

}  // extern "C"
