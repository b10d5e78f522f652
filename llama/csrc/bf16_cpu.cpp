// bfloat16 matrix products with few rows (decoding) for x86 CPUs with AVX-512 BF16, called from llama/bf16_cpu.py
// through ctypes.
//
// y = x @ W.T for x (M, K) and W (N, K), both bfloat16 and row-major: W is the checkpoint's own layout, so the same
// tensor serves torch's matmul for prompts. VDPBF16PS multiplies 32 bfloat16 pairs of x and of one row of W and
// adds each pair's two products into one of 16 float32 lanes, so a row's dot product runs along K in registers
// and is summed across lanes once at the end; the float32 sums are rounded to bfloat16 once.
//
// A decode step reads every weight once, so the speed is that of memory: each thread reads its range of W's rows
// as one sequential stream, and the x rows (a few KB) stay in L1. K need not be a multiple of 32 (nor even): the
// last loads are masked. The file also holds a decode step's attention in one call (llama_bf16_decode_attention).

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

constexpr int64_t kLanes = 32;  // bfloat16 values per register
constexpr int64_t kQueries = 8;  // query heads of one kv head whose sums are kept in registers at once

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

// out[m * ldo] = x[m] . w for MT rows of x (stride K) and one row w of W, summed along K in float32 lanes: U
// independent sums per row of x hide VDPBF16PS's latency.
template <int MT>
BF16 inline void row_dot(const uint16_t* x, int64_t K, const uint16_t* w, uint16_t* out, int64_t ldo) {
  constexpr int U = MT == 1 ? 4 : 2;  // MT x U sums in registers, beside MT rows of x
  __m512 acc[MT][U];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + U * kLanes <= K; k += U * kLanes)
    for (int u = 0; u < U; ++u) {
      __m512bh wv = load(w + k + u * kLanes);
      for (int m = 0; m < MT; ++m) acc[m][u] = _mm512_dpbf16_ps(acc[m][u], load(x + m * K + k + u * kLanes), wv);
    }
  for (; k < K; k += kLanes) {  // the rest, zeros past K in both operands adding nothing
    __mmask32 mask = K - k >= kLanes ? ~static_cast<__mmask32>(0) : static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512bh wv = load_masked(w + k, mask);
    for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_dpbf16_ps(acc[m][0], load_masked(x + m * K + k, mask), wv);
  }
  for (int m = 0; m < MT; ++m) {
    __m512 sum = acc[m][0];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[m][u]);
    out[m * ldo] = to_bf16(_mm512_reduce_add_ps(sum));
  }
}

BF16 void linear(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, uint16_t* out) {
  // Each thread takes a contiguous range of W's rows and reads them one after another: one sequential stream,
  // which the hardware prefetcher follows at the memory's speed (streaming several rows at once was slower). Each
  // row meets every row of x, four at a time, while it is in L1.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* row = w + n * K;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) row_dot<4>(x + m * K, K, row, out + m * N + n, N);
      switch (M - m) {
        case 3: row_dot<3>(x + m * K, K, row, out + m * N + n, N); break;
        case 2: row_dot<2>(x + m * K, K, row, out + m * N + n, N); break;
        case 1: row_dot<1>(x + m * K, K, row, out + m * N + n, N); break;
        default: break;
      }
    }
  });
}

// e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7 (relative error < 2e-7),
// times 2^n by VSCALEFPS. Below -87 (where float32 e^x runs out) the result is 0, as softmax's masked scores need.
BF16 inline __m512 exp16(__m512 x) {
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: exact n * hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  __m512 result = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ), result);
}

BF16 inline __m512 load16_f32(const uint16_t* p) {  // 16 bfloat16 -> float32: the upper half of the float's bits
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// One kv head of one row: its G query heads q (G x D, stride D) against positions [0, L) of k and v (stride
// `step` between positions), `visible` (L bools) or null for all. Scores are computed 16 positions at a time, one
// position a lane: each VPGATHERDD fetches the same two dims of 16 positions, and VDPBF16PS adds their products
// with the query's two dims. out: G x D bfloat16.
BF16 void attend(const uint16_t* q, int64_t G, int64_t D, const uint16_t* k, const uint16_t* v, int64_t step,
                 int64_t L, const bool* visible, float scale, float* scores, uint16_t* out) {
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(step / 2)));
  for (int64_t l0 = 0; l0 < L; l0 += 16) {
    __mmask16 in = L - l0 >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (L - l0)) - 1);
    const int* base = reinterpret_cast<const int*>(k + l0 * step);
    for (int64_t g0 = 0; g0 < G; g0 += kQueries) {  // up to kQueries heads per gather of their kv head's dims
      const int64_t queries = G - g0 < kQueries ? G - g0 : kQueries;
      __m512 acc[kQueries];
      for (int64_t g = 0; g < queries; ++g) acc[g] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 2) {
        __m512i pairs = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, _mm512_add_epi32(lanes,
                                                    _mm512_set1_epi32(static_cast<int>(d / 2))), base, 4);
        for (int64_t g = 0; g < queries; ++g) {
          uint32_t qpair;
          __builtin_memcpy(&qpair, q + (g0 + g) * D + d, 4);
          acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)pairs, (__m512bh)_mm512_set1_epi32(static_cast<int>(qpair)));
        }
      }
      __mmask16 keep = in;
      if (visible != nullptr) {
        __m128i bytes = _mm_maskz_loadu_epi8(in, visible + l0);
        keep &= _mm_test_epi8_mask(bytes, bytes);
      }
      for (int64_t g = 0; g < queries; ++g) {
        __m512 scaled = _mm512_mul_ps(acc[g], _mm512_set1_ps(scale));
        scaled = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, scaled);  // hidden positions weigh nothing
        _mm512_mask_storeu_ps(scores + (g0 + g) * L + l0, in, scaled);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax of each query's scores, in place
    float* s = scores + g * L;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t l = 0; l < L; l += 16) {
      __mmask16 in = L - l >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (L - l)) - 1);
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, s + l));
    }
    __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l += 16) {
      __mmask16 in = L - l >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (L - l)) - 1);
      __m512 e = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, s + l), most));
      e = _mm512_maskz_mov_ps(in, e);
      total = _mm512_add_ps(total, e);
      _mm512_mask_storeu_ps(s + l, in, e);
    }
    float inverse = 1.f / _mm512_reduce_add_ps(total);
    for (int64_t l = 0; l < L; ++l) s[l] *= inverse;
  }
  for (int64_t d0 = 0; d0 < D; d0 += 16) {  // out = probabilities @ v, 16 dims of kQueries heads at a time
    for (int64_t g0 = 0; g0 < G; g0 += kQueries) {
      const int64_t queries = G - g0 < kQueries ? G - g0 : kQueries;
      __m512 acc[kQueries];
      for (int64_t g = 0; g < queries; ++g) acc[g] = _mm512_setzero_ps();
      for (int64_t l = 0; l < L; ++l) {
        __m512 row = load16_f32(v + l * step + d0);
        for (int64_t g = 0; g < queries; ++g)
          acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(g0 + g) * L + l]), row, acc[g]);
      }
      for (int64_t g = 0; g < queries; ++g)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (g0 + g) * D + d0), (__m256i)_mm512_cvtneps_pbh(acc[g]));
    }
  }
}


BF16 inline __m512 widen(__m256i bf16) {  // 16 bfloat16 -> float32: the upper half of the float's bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

// One row: y = bf16(x / rms(x)) then bf16(y * weight), the two roundings of the model's RMSNorm in bfloat16.
BF16 void rms_norm_row(const uint16_t* x, int64_t dim, const uint16_t* weight, float eps, uint16_t* out) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < dim; i += 16) {
    __mmask16 in = dim - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (dim - i)) - 1);
    __m512 v = widen(_mm256_maskz_loadu_epi16(in, x + i));
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / dim + eps));
  for (int64_t i = 0; i < dim; i += 16) {
    __mmask16 in = dim - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (dim - i)) - 1);
    __m512 y = widen((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(widen(_mm256_maskz_loadu_epi16(in, x + i)), scale)));
    __m512 w = widen(_mm256_maskz_loadu_epi16(in, weight + i));
    _mm256_mask_storeu_epi16(out + i, in, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(y, w)));
  }
}

}  // namespace

extern "C" {

// x (M, K), w (N, K) and out (M, N): contiguous bfloat16.
void llama_bf16_linear(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, uint16_t* out) {
  linear(x, M, K, w, N, out);
}

// Attention of one new token per row: q (B, H, D) contiguous; k and v the rows' cache slots, (B, L, Hkv, D) with
// strides (row_stride, Hkv * D, D, 1); visible (B, L) bools or null; out (B, H, D). D a multiple of 16.
void llama_bf16_decode_attention(const uint16_t* q, int64_t B, int64_t H, int64_t Hkv, int64_t D, const uint16_t* k,
                                 const uint16_t* v, int64_t row_stride, int64_t L, const bool* visible, float scale,
                                 uint16_t* out) {
  const int64_t G = H / Hkv, step = Hkv * D;
  at::parallel_for(0, B * Hkv, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(G * L);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b = t / Hkv, h = t % Hkv;
      attend(q + (b * H + h * G) * D, G, D, k + b * row_stride + h * D, v + b * row_stride + h * D, step, L,
             visible == nullptr ? nullptr : visible + b * L, scale, scores.data(), out + (b * H + h * G) * D);
    }
  });
}

// RMSNorm of x (rows, dim) with weight (dim), all bfloat16 and contiguous, into out (rows, dim).
void llama_bf16_rms_norm(const uint16_t* x, int64_t rows, int64_t dim, const uint16_t* weight, float eps,
                         uint16_t* out) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(x + r * dim, dim, weight, eps, out + r * dim);
  });
}

}  // extern "C"
