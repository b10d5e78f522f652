// bfloat16 matrix products with few rows (decoding) for x86 CPUs with AVX-512 BF16, called from llama/bf16_cpu.py
// through ctypes.
//
// y = x @ W.T for x (M, K) and W (N, K), both bfloat16 and row-major: W is the checkpoint's own layout, so the same
// tensor serves torch's matmul for prompts. VDPBF16PS multiplies 32 bfloat16 pairs of x and of one row of W and
// adds each pair's two products into one of 16 float32 lanes, so a row's dot product runs along K in registers
// and is summed across lanes once at the end; the float32 sums are rounded to bfloat16 once.
//
// A decode step reads every weight once, so the speed is that of memory: each thread takes a contiguous range of
// W's rows and streams several of them at once (8 for one row of x), which keeps enough loads in flight, and the
// x rows (a few KB) stay in L1. K need not be a multiple of 32 (nor even): the last loads are masked.

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

constexpr int64_t kLanes = 32;  // bfloat16 values per register

BF16 inline __m512bh load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

BF16 inline __m512bh load_masked(const uint16_t* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

inline uint16_t to_bf16(float value) {  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t bits;
  __builtin_memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// out[m * ldo + r] = x[m] . w[r] for MT rows of x (stride K) and NT rows of w (stride K).
template <int MT, int NT>
BF16 inline void tile(const uint16_t* x, const uint16_t* w, int64_t K, uint16_t* out, int64_t ldo) {
  __m512 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NT; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    __m512bh wv[NT];
#ifdef PF
    for (int r = 0; r < NT; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + PF), _MM_HINT_T0);
#endif
    for (int r = 0; r < NT; ++r) wv[r] = load(w + r * K + k);
    for (int m = 0; m < MT; ++m) {
      __m512bh xv = load(x + m * K + k);
      for (int r = 0; r < NT; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {  // zeros past K in both operands add nothing
    __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512bh wv[NT];
    for (int r = 0; r < NT; ++r) wv[r] = load_masked(w + r * K + k, mask);
    for (int m = 0; m < MT; ++m) {
      __m512bh xv = load_masked(x + m * K + k, mask);
      for (int r = 0; r < NT; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NT; ++r) out[m * ldo + r] = to_bf16(_mm512_reduce_add_ps(acc[m][r]));
}

// NT rows of W (from w) against all M rows of x, four rows of x at a time while those rows of W are in cache.
template <int NT>
BF16 void rows_of_w(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, uint16_t* out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, NT>(x + m * K, w, K, out + m * N, N);
  switch (M - m) {
    case 3: tile<3, NT>(x + m * K, w, K, out + m * N, N); break;
    case 2: tile<2, NT>(x + m * K, w, K, out + m * N, N); break;
    case 1: tile<1, NT>(x + m * K, w, K, out + m * N, N); break;
    default: break;
  }
}

BF16 void linear(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, uint16_t* out) {
  // Threads split W's rows in multiples of 8, so that tiles stay whole. One row of x takes eight rows of W at a
  // time: eight streams in flight, and eight independent sums to hide VDPBF16PS's latency. More rows of x reuse
  // each loaded register of W, and 4 x 4 sums fill the registers.
  constexpr int64_t kGrain = 8;
  at::parallel_for(0, (N + kGrain - 1) / kGrain, 1, [&](int64_t t0, int64_t t1) {
    int64_t n = t0 * kGrain, n1 = t1 * kGrain < N ? t1 * kGrain : N;
#ifndef NT1
#define NT1 8
#endif
    if (M == 1)
      for (; n + NT1 <= n1; n += NT1) rows_of_w<NT1>(x, M, K, w + n * K, N, out + n);
    for (; n + 4 <= n1; n += 4) rows_of_w<4>(x, M, K, w + n * K, N, out + n);
    for (; n < n1; ++n) rows_of_w<1>(x, M, K, w + n * K, N, out + n);
  });
}

}  // namespace

extern "C" {

// x (M, K), w (N, K) and out (M, N): contiguous bfloat16.
void llama_bf16_linear(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, uint16_t* out) {
  linear(x, M, K, w, N, out);
}

}  // extern "C"
