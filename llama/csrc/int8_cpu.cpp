// int8 x int8 matrix products for x86 CPUs with AVX-512 VNNI, called from llama/int8_cpu.py through ctypes.
//
// y = x @ W.T where W (N, K) is int8 with one float scale per row (llama.kernels.quantize_int8) and x (M, K) is
// quantized here, 32 values at a time, to int8 with one float scale per block: the scheme of llama.cpp's Q8_0
// activations. VPDPBUSD multiplies unsigned by signed bytes, so the packed weights carry +128 (stored as
// uint8) and each row of x subtracts 128 * sum(q) once.
//
// Packed weights (see llama/int8_cpu.py, pack): (N_pad / 64, K_pad / 4, 64, 4) bytes. One register holds four
// consecutive k of 16 rows, the layout VPDPBUSD sums over, and a group of 64 rows is one contiguous stream.

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace {

constexpr int64_t kRows = 64;   // weight rows per packed group: four registers of 16 int32 lanes
constexpr int64_t kBlock = 32;  // activation values that share one scale

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

// One row x (K) -> q (K_pad) int8 and d (K_pad / 32): x ~ q * d per block; returns 128 * sum_b d_b * sum(q_b).
template <typename T>
VNNI float quantize_row(const T* x, int64_t K, int64_t K_pad, int8_t* q, float* d) {
  float correction = 0.f;
  for (int64_t k0 = 0; k0 < K_pad; k0 += kBlock) {
    T block[kBlock] = {};  // zeros past K
    std::memcpy(block, x + k0, sizeof(T) * (k0 + kBlock <= K ? kBlock : K - k0));
    __m512 lo = load16(block), hi = load16(block + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0 + 16), _mm512_cvtsepi32_epi8(qhi));
    d[k0 / kBlock] = amax / 127.f;
    correction += d[k0 / kBlock] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
  }
  return 128.f * correction;
}

// acc[m][r] = sum over blocks b of d[m][b] * (packed rows 16r..16r+15 of the group) . q[m] over block b.
template <int MT>
VNNI inline void group_dot(const uint8_t* w, const int8_t* q, const float* d, int64_t K_pad, __m512 acc[MT][4]) {
  const int64_t blocks = K_pad / kBlock;
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, w += kBlock * kRows) {
    for (int i = 0; i < kBlock * kRows; i += 64)  // the next block: the weights stream from DRAM
      _mm_prefetch(reinterpret_cast<const char*>(w) + kBlock * kRows + i, _MM_HINT_T0);
    __m512i sum[MT][4];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < 4; ++r) sum[m][r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int j = 0; j < kBlock / 4; ++j) {  // four k per step
      __m512i wv[4];
      for (int r = 0; r < 4; ++r) wv[r] = _mm512_loadu_si512(w + (j * 4 + r) * 64);
      for (int m = 0; m < MT; ++m) {
        int32_t four;
        std::memcpy(&four, q + m * K_pad + b * kBlock + j * 4, 4);
        __m512i xv = _mm512_set1_epi32(four);
        for (int r = 0; r < 4; ++r) sum[m][r] = _mm512_dpbusd_epi32(sum[m][r], wv[r], xv);
      }
    }
    for (int m = 0; m < MT; ++m) {
      __m512 dm = _mm512_set1_ps(d[m * blocks + b]);
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m][r]), dm, acc[m][r]);
    }
  }
}

// Rows [n0, n0 + 64) of out (MT rows of stride N), dropping those past N (padding).
template <int MT, typename T>
VNNI inline void group_rows(const uint8_t* w, const int8_t* q, const float* d, const float* correction,
                            const float* scale, int64_t K_pad, int64_t n0, int64_t N, T* out) {
  __m512 acc[MT][4];
  group_dot<MT>(w, q, d, K_pad, acc);
  for (int r = 0; r < 4 && n0 + r * 16 < N; ++r) {
    int64_t n = n0 + r * 16;
    __mmask16 mask = N - n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (N - n)) - 1);
    __m512 s = _mm512_maskz_loadu_ps(mask, scale + n);
    for (int m = 0; m < MT; ++m) {
      __m512 y = _mm512_mul_ps(_mm512_sub_ps(acc[m][r], _mm512_set1_ps(correction[m])), s);
      store16(out + m * N + n, y, mask);
    }
  }
}

template <typename T>
VNNI void linear(const T* x, int64_t M, int64_t K, const uint8_t* w, const float* scale, int64_t N, int64_t K_pad,
                 T* out) {
  const int64_t blocks = K_pad / kBlock;
  std::vector<int8_t> q(M * K_pad);
  std::vector<float> d(M * blocks), correction(M);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      correction[m] = quantize_row(x + m * K, K, K_pad, q.data() + m * K_pad, d.data() + m * blocks);
  });
  at::parallel_for(0, (N + kRows - 1) / kRows, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* group = w + g * kRows * K_pad;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2)  // two rows of x per pass: each weight load feeds eight VPDPBUSD
        group_rows<2>(group, q.data() + m * K_pad, d.data() + m * blocks, correction.data() + m, scale, K_pad,
                      g * kRows, N, out + m * N);
      if (m < M)
        group_rows<1>(group, q.data() + m * K_pad, d.data() + m * blocks, correction.data() + m, scale, K_pad,
                      g * kRows, N, out + m * N);
    }
  });
}

}  // namespace

extern "C" {

void llama_int8_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                            int64_t N, int64_t K_pad, uint16_t* out) {
  linear(x, M, K, w, scale, N, K_pad, out);
}

void llama_int8_linear_f32(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* scale, int64_t N,
                           int64_t K_pad, float* out) {
  linear(x, M, K, w, scale, N, K_pad, out);
}

// A layer's packed values, scales and padded width together (int8_cpu.Weight), so that the bfloat16 kernel is
// called as every linear kernel is: out (M, N) = x (M, K) @ W.T from (x, M, K, weight, N, out).
struct Weight {
  const uint8_t* packed;
  const float* scale;
  int64_t K_pad;
};

void llama_int8_linear_bf16_of(const uint16_t* x, int64_t M, int64_t K, const Weight* w, int64_t N, uint16_t* out) {
  linear(x, M, K, w->packed, w->scale, N, w->K_pad, out);
}

}  // extern "C"
