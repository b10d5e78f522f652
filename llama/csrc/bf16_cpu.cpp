// bfloat16 matrix products and a decode step's attention for x86 CPUs with AVX-512 BF16, called from
// llama/bf16_cpu.py through ctypes.
//
// y = x @ W.T for x (M, K) bfloat16 and W (N, K) packed at load (bf16_cpu.pack) in groups of 32 output rows: for
// each pair of inputs (k, k + 1), the group's 32 rows' two values, 64 bfloat16 (two registers). VDPBF16PS
// multiplies the pair (x[k], x[k + 1]), broadcast to every lane, by such a register and adds each lane's two
// products into one of 16 float32 sums: 16 output rows at once, so that one load of the weight serves every row
// of x (a row-major W needs a load of x per row of W) and no sum has to be reduced across lanes. The float32 sums
// are rounded to bfloat16 once. Each group is one contiguous stream and each thread reads its groups one after
// another: a decode step streams the weight at the memory's speed, and a prompt's rows meet a group up to 8 at a
// time while it sits in L2. K may be odd (the last pair's second weight is zero padding), N any size (the last
// group's padded rows are not stored).

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

constexpr int64_t kGroup = 32;    // output rows per packed group: two registers of 16 float32 sums
constexpr int64_t kAhead = 64;    // pairs of a group prefetched ahead (8 KB): a little faster than none
constexpr int64_t kQueries = 8;  // query heads of one kv head scored at once, their sums in registers
constexpr int64_t kAheadPositions = 48;  // cached positions prefetched ahead of the scores: 2-4 % of a decode step

inline __mmask16 first_lanes(int64_t n) {  // the first n of 16 lanes (all 16 for n >= 16, none for n <= 0)
  return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

BF16 inline __m512bh pair(const uint16_t* x, int64_t k) {  // (x[k], x[k + 1]) in every 32-bit lane
  uint32_t bits;
  __builtin_memcpy(&bits, x + k, 4);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
}

// x[k] alone, the last value of an odd row: its pair's second value is 0, not what lies past the row (a NaN there
// would spoil the sum even against the weight's zero padding).
BF16 inline __m512bh last(const uint16_t* x, int64_t k) { return (__m512bh)_mm512_set1_epi32(x[k]); }

BF16 inline __m512 widen(__m256i bf16) {  // 16 bfloat16 -> float32: the upper half of the float's bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

// The sums of the lanes in `lanes`, rounded to bfloat16; into a float32 `out`, widened again (the same numbers as
// bfloat16 results converted to float32, without writing and reading them twice).
BF16 inline void store(uint16_t* out, __mmask16 lanes, __m512 sums) {
  _mm256_mask_storeu_epi16(out, lanes, (__m256i)_mm512_cvtneps_pbh(sums));
}
BF16 inline void store(float* out, __mmask16 lanes, __m512 sums) {
  _mm512_mask_storeu_ps(out, lanes, widen((__m256i)_mm512_cvtneps_pbh(sums)));
}

BF16 inline void accumulate(__m512 (&acc)[2], __m512bh xv, const uint16_t* w) {
  acc[0] = _mm512_dpbf16_ps(acc[0], xv, (__m512bh)_mm512_loadu_si512(w));
  acc[1] = _mm512_dpbf16_ps(acc[1], xv, (__m512bh)_mm512_loadu_si512(w + 32));
}

// out[m * N + n0 + r] = x[m] . W[n0 + r] for MT rows of x (stride K) and the group g of W's rows from n0. With
// few rows, U sets of sums along K hide VDPBF16PS's latency.
template <int MT, typename Out>
BF16 inline void group_rows(const uint16_t* x, int64_t K, const uint16_t* g, Out* out, int64_t N, int64_t n0) {
  constexpr int U = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
  __m512 acc[U][MT][2];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MT; ++m) acc[u][m][0] = acc[u][m][1] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  int64_t j = 0;
  for (; j + U <= pairs; j += U) {
    _mm_prefetch(reinterpret_cast<const char*>(g + (j + kAhead) * 2 * kGroup), _MM_HINT_T0);
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MT; ++m) accumulate(acc[u][m], pair(x + m * K, 2 * (j + u)), g + (j + u) * 2 * kGroup);
  }
  for (; j < (K + 1) / 2; ++j)
    for (int m = 0; m < MT; ++m)
      accumulate(acc[0][m], 2 * j + 1 < K ? pair(x + m * K, 2 * j) : last(x + m * K, 2 * j), g + j * 2 * kGroup);
  const int64_t left = N - n0;
  const __mmask16 low = first_lanes(left), high = first_lanes(left - 16);
  for (int m = 0; m < MT; ++m) {
    __m512 first = acc[0][m][0], second = acc[0][m][1];
    for (int u = 1; u < U; ++u) {
      first = _mm512_add_ps(first, acc[u][m][0]);
      second = _mm512_add_ps(second, acc[u][m][1]);
    }
    store(out + m * N + n0, low, first);
    store(out + m * N + n0 + 16, high, second);
  }
}

template <int MT, typename Out>
BF16 void group_rows_at(int64_t rows, const uint16_t* x, int64_t K, const uint16_t* g, Out* out, int64_t N,
                        int64_t n0) {
  if constexpr (MT > 1) {
    if (rows < MT) return group_rows_at<MT - 1>(rows, x, K, g, out, N, n0);
  }
  group_rows<MT>(x, K, g, out, N, n0);
}

template <typename Out>
BF16 void linear(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, Out* out) {
  const int64_t groups = (N + kGroup - 1) / kGroup, group_size = (K + 1) / 2 * 2 * kGroup;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t m = 0; m < M; m += 8)  // a prompt's rows 8 at a time: 16 sums in registers
        group_rows_at<8>(M - m < 8 ? M - m : 8, x + m * K, K, w + g * group_size, out + m * N, N, g * kGroup);
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

// Prefetches the `bytes` from p onward, a line at a time, into L1.
inline void prefetch(const uint16_t* p, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + at, _MM_HINT_T0);
}

// rows[p] = the p-th 32-bit element (a pair of bfloat16 dims) of each of the 16 registers `rows`, one a lane: a
// 16 x 16 transpose in four rounds of shuffles (within 128-bit lanes by 32 then 64 bits, then of whole 128-bit
// lanes twice).
BF16 inline void transpose16(__m512i (&rows)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int a = 0; a < 16; a += 4) {  // u[a + i]: element 4k + i of rows a..a+3, in 128-bit lane k
    u[a] = _mm512_unpacklo_epi64(t[a], t[a + 2]);
    u[a + 1] = _mm512_unpackhi_epi64(t[a], t[a + 2]);
    u[a + 2] = _mm512_unpacklo_epi64(t[a + 1], t[a + 3]);
    u[a + 3] = _mm512_unpackhi_epi64(t[a + 1], t[a + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    __m512i even0 = _mm512_shuffle_i32x4(u[i], u[4 + i], 0x88), odd0 = _mm512_shuffle_i32x4(u[i], u[4 + i], 0xdd);
    __m512i even1 = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0x88);
    __m512i odd1 = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0xdd);
    rows[i] = _mm512_shuffle_i32x4(even0, even1, 0x88);
    rows[4 + i] = _mm512_shuffle_i32x4(odd0, odd1, 0x88);
    rows[8 + i] = _mm512_shuffle_i32x4(even0, even1, 0xdd);
    rows[12 + i] = _mm512_shuffle_i32x4(odd0, odd1, 0xdd);
  }
}

// The scores of Q query heads (q, stride D) against `count` (up to 16) positions whose keys start at k, `step`
// apart, one position a lane: 32 dims of the 16 keys are loaded and transposed, so that each register holds the
// same two dims of every position, and VDPBF16PS adds their products with a query's two dims. Q is a template
// argument so that the sums stay in registers.
template <int Q>
BF16 inline void score16(const uint16_t* q, int64_t D, const uint16_t* k, int64_t step, int64_t count,
                         __m512 (&acc)[Q]) {
  for (int g = 0; g < Q; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    const __mmask16 dims = first_lanes((D - d0) / 2);  // D is a multiple of 16: 8 or 16 pairs
    __m512i rows[16];
    for (int j = 0; j < 16; ++j)
      rows[j] = j < count ? _mm512_maskz_loadu_epi32(dims, k + j * step + d0) : _mm512_setzero_si512();
    transpose16(rows);
    for (int64_t p = 0; p < 16 && d0 + 2 * p < D; ++p)
      for (int g = 0; g < Q; ++g) acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)rows[p], pair(q + g * D, d0 + 2 * p));
  }
}

// scores (Q x L, stride L) = q k^T * scale for Q query heads, -inf where `visible` (L bools, or null) says no.
// The keys and values of positions kAheadPositions on are prefetched meanwhile: in a decode step the cache comes
// from memory, the weights streamed since its last use having pushed it out of every cache.
template <int Q>
BF16 void score(const uint16_t* q, int64_t D, const uint16_t* k, const uint16_t* v, int64_t step, int64_t L,
                const bool* visible, float scale, float* scores) {
  for (int64_t l0 = 0; l0 < L; l0 += 16) {
    for (int64_t l = l0 + kAheadPositions; l < l0 + kAheadPositions + 16 && l < L; ++l) {
      prefetch(k + l * step, 2 * D);
      prefetch(v + l * step, 2 * D);
    }
    const __mmask16 in = first_lanes(L - l0);
    __m512 acc[Q];
    score16<Q>(q, D, k + l0 * step, step, L - l0, acc);
    __mmask16 keep = in;
    if (visible != nullptr) {
      __m128i bytes = _mm_maskz_loadu_epi8(in, visible + l0);
      keep &= _mm_test_epi8_mask(bytes, bytes);
    }
    for (int g = 0; g < Q; ++g) {
      __m512 scaled = _mm512_mul_ps(acc[g], _mm512_set1_ps(scale));
      scaled = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, scaled);  // hidden positions weigh nothing
      _mm512_mask_storeu_ps(scores + g * L + l0, in, scaled);
    }
  }
}

// Each of the G rows of `scores` (stride L) in place by e^(score - its largest), the sums' inverses into inverse.
BF16 void exponentiate(float* scores, int64_t G, int64_t L, float* inverse) {
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * L;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t l = 0; l < L; l += 16)
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first_lanes(L - l), s + l));
    const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l += 16) {
      const __mmask16 in = first_lanes(L - l);
      __m512 e = _mm512_maskz_mov_ps(in, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, s + l), most)));
      total = _mm512_add_ps(total, e);
      _mm512_mask_storeu_ps(s + l, in, e);
    }
    inverse[g] = 1.f / _mm512_reduce_add_ps(total);
  }
}

// out (Q x 16C dims, stride D) = weights @ v / their sums, for Q query heads' weights (stride L) and C registers
// of 16 dims of v from v (positions `step` apart): one pass over the positions, every sum in a register.
template <int Q, int C>
BF16 void weigh(const float* weights, int64_t L, const float* inverse, const uint16_t* v, int64_t step, int64_t D,
                uint16_t* out) {
  __m512 acc[Q][C];
  for (int g = 0; g < Q; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t l = 0; l < L; ++l) {
    if (l + 8 < L) prefetch(v + (l + 8) * step, 32 * C);
    __m512 row[C];
    for (int c = 0; c < C; ++c) row[c] = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + l * step) + c));
    for (int g = 0; g < Q; ++g) {
      const __m512 w = _mm512_set1_ps(weights[g * L + l]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(w, row[c], acc[g][c]);
    }
  }
  for (int g = 0; g < Q; ++g)
    for (int c = 0; c < C; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * D) + c,
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][c], _mm512_set1_ps(inverse[g]))));
}

using Weigh = void (*)(const float*, int64_t, const float*, const uint16_t*, int64_t, int64_t, uint16_t*);
constexpr Weigh kWeigh[4][4] = {{weigh<1, 1>, weigh<1, 2>, weigh<1, 3>, weigh<1, 4>},  // [heads - 1][registers - 1]
                                {weigh<2, 1>, weigh<2, 2>, weigh<2, 3>, weigh<2, 4>},
                                {weigh<3, 1>, weigh<3, 2>, weigh<3, 3>, weigh<3, 4>},
                                {weigh<4, 1>, weigh<4, 2>, weigh<4, 3>, weigh<4, 4>}};

// One kv head of one row, Q of its query heads: q (Q x D, stride D) against positions [0, L) of k and v (stride
// `step`), `visible` (L bools) or null for all; out (Q x D) bfloat16. Computed in float32 and rounded once. The
// Q heads share each load of the keys; the values are weighed for 4 heads and 64 dims at a time (16 sums in
// registers).
template <int Q>
BF16 void attend(const uint16_t* q, int64_t D, const uint16_t* k, const uint16_t* v, int64_t step, int64_t L,
                 const bool* visible, float scale, float* scores, uint16_t* out) {
  float inverse[Q];
  score<Q>(q, D, k, v, step, L, visible, scale, scores);
  exponentiate(scores, Q, L, inverse);
  for (int64_t g0 = 0; g0 < Q; g0 += 4)
    for (int64_t d0 = 0; d0 < D; d0 += 64)
      kWeigh[(Q - g0 < 4 ? Q - g0 : 4) - 1][(D - d0 < 64 ? D - d0 : 64) / 16 - 1](
          scores + g0 * L, L, inverse + g0, v + d0, step, D, out + g0 * D + d0);
}

// attend<Q> for each block of up to kQueries of a kv head's G query heads.
BF16 void attend_group(const uint16_t* q, int64_t G, int64_t D, const uint16_t* k, const uint16_t* v, int64_t step,
                       int64_t L, const bool* visible, float scale, float* scores, uint16_t* out) {
  using Attend = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, int64_t, const bool*,
                          float, float*, uint16_t*);
  static constexpr Attend kAttend[kQueries] = {attend<1>, attend<2>, attend<3>, attend<4>,
                                               attend<5>, attend<6>, attend<7>, attend<8>};
  for (int64_t g0 = 0; g0 < G; g0 += kQueries) {
    const int64_t queries = G - g0 < kQueries ? G - g0 : kQueries;
    kAttend[queries - 1](q + g0 * D, D, k, v, step, L, visible, scale, scores, out + g0 * D);
  }
}

// One row: y = bf16(x / rms(x)) then bf16(y * weight), the two roundings of the model's RMSNorm in bfloat16.
BF16 void rms_norm_row(const uint16_t* x, int64_t dim, const uint16_t* weight, float eps, uint16_t* out) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < dim; i += 16) {
    __mmask16 in = first_lanes(dim - i);
    __m512 v = widen(_mm256_maskz_loadu_epi16(in, x + i));
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / dim + eps));
  for (int64_t i = 0; i < dim; i += 16) {
    __mmask16 in = first_lanes(dim - i);
    __m512 y = widen((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(widen(_mm256_maskz_loadu_epi16(in, x + i)), scale)));
    __m512 w = widen(_mm256_maskz_loadu_epi16(in, weight + i));
    _mm256_mask_storeu_epi16(out + i, in, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(y, w)));
  }
}

// One row of SwiGLU's product: out[i] = bf16(bf16(silu(gate[i])) * up[i]) for the row's gate and up halves (n
// values each), torch's two roundings; silu(g) = g / (1 + e^-g) in float32, as torch computes it.
BF16 void silu_mul_row(const uint16_t* gate, const uint16_t* up, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = first_lanes(n - i);
    const __m512 g = widen(_mm256_maskz_loadu_epi16(in, gate + i));
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = widen((__m256i)_mm512_cvtneps_pbh(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e))));
    const __m512 product = _mm512_mul_ps(silu, widen(_mm256_maskz_loadu_epi16(in, up + i)));
    _mm256_mask_storeu_epi16(out + i, in, (__m256i)_mm512_cvtneps_pbh(product));
  }
}

// One row's heads (n of them, D dims each, D a multiple of 16) rotated by its rope row (cos, then signed sin, D
// floats each): x * cos + swapped * signed_sin in float32, where swapped exchanges each pair of dims, rounded to
// bfloat16 once (the model's apply_rope, the same operations in the same order).
BF16 void rotate(const uint16_t* x, int64_t n, int64_t D, const float* rope, int64_t out_stride, uint16_t* out) {
  for (int64_t h = 0; h < n; ++h)
    for (int64_t d = 0; d < D; d += 16) {
      __m512 v = widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + h * D + d)));
      __m512 swapped = _mm512_permute_ps(v, 0xb1);  // lanes (1, 0, 3, 2, ...)
      __m512 sum = _mm512_add_ps(_mm512_mul_ps(v, _mm512_loadu_ps(rope + d)),
                                 _mm512_mul_ps(swapped, _mm512_loadu_ps(rope + D + d)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * out_stride + d), (__m256i)_mm512_cvtneps_pbh(sum));
    }
}

}  // namespace

extern "C" {

// x (M, K) and out (M, N) contiguous bfloat16; w as bf16_cpu.pack packs (N, K).
void llama_bf16_linear(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, uint16_t* out) {
  linear(x, M, K, w, N, out);
}

// The same with out (M, N) float32, holding the bfloat16-rounded results.
void llama_bf16_linear_widened(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* out) {
  linear(x, M, K, w, N, out);
}

// Attention of one new token per row: q (B, H, D) contiguous; k and v the rows' cache slots, (B, L, Hkv, D) with
// strides (row_stride, Hkv * D, D, 1); visible (B, L) bools or null; out (B, H, D). D a multiple of 16.
void llama_bf16_decode_attention(const uint16_t* q, int64_t B, int64_t H, int64_t Hkv, int64_t D, const uint16_t* k,
                                 const uint16_t* v, int64_t row_stride, int64_t L, const bool* visible, float scale,
                                 uint16_t* out) {
  const int64_t G = H / Hkv, step = Hkv * D;
  at::parallel_for(0, B * Hkv, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(kQueries * L);
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b = t / Hkv, h = t % Hkv;
      attend_group(q + (b * H + h * G) * D, G, D, k + b * row_stride + h * D, v + b * row_stride + h * D, step, L,
             visible == nullptr ? nullptr : visible + b * L, scale, scores.data(), out + (b * H + h * G) * D);
    }
  });
}

// A decode step's new keys and values into the KV cache, and its queries: qkv (B, (H + 2 Hkv) D) holds each row's
// query heads, key heads and value heads; rope (B, 2, D) float32 its position's rope row; row b's keys (rotated)
// and values go to position positions[b] of cache row b, at k + b * row_stride + positions[b] * Hkv * D (v alike);
// q_out (B, H, D) gets the rotated queries. Returns the number of rows whose position is outside [0, L), which
// are not stored.
int64_t llama_bf16_rope_and_store(const uint16_t* qkv, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                  const float* rope, const int64_t* positions, uint16_t* k, uint16_t* v,
                                  int64_t row_stride, int64_t L, uint16_t* q_out) {
  const int64_t width = (H + 2 * Hkv) * D;
  int64_t refused = 0;
  for (int64_t b = 0; b < B; ++b) {
    const uint16_t* row = qkv + b * width;
    const float* angles = rope + b * 2 * D;
    rotate(row, H, D, angles, D, q_out + b * H * D);
    if (positions[b] < 0 || positions[b] >= L) {
      ++refused;
      continue;
    }
    const int64_t at = b * row_stride + positions[b] * Hkv * D;
    rotate(row + H * D, Hkv, D, angles, D, k + at);
    std::memcpy(v + at, row + (H + Hkv) * D, Hkv * D * sizeof(uint16_t));
  }
  return refused;
}

// SwiGLU's silu(gate) * up for x (rows, 2 n): each row's gate then up values, into out (rows, n); bfloat16.
void llama_bf16_silu_mul(const uint16_t* x, int64_t rows, int64_t n, uint16_t* out) {
  at::parallel_for(0, rows, (1 << 14) / n + 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul_row(x + r * 2 * n, x + r * 2 * n + n, n, out + r * n);
  });
}

// RMSNorm of x (rows, dim) with weight (dim), all bfloat16 and contiguous, into out (rows, dim).
void llama_bf16_rms_norm(const uint16_t* x, int64_t rows, int64_t dim, const uint16_t* weight, float eps,
                         uint16_t* out) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(x + r * dim, dim, weight, eps, out + r * dim);
  });
}

// A transformer block's one-token decode step: its weights, each linear layer's kernel (this file's bfloat16 one or
// blocks_cpu's), its norms and its attention's shape. Built once per block (bf16_cpu.DecodeLayer mirrors it).
struct DecodeLayer {
  using Linear = void (*)(const uint16_t* x, int64_t M, int64_t K, const void* w, int64_t N, uint16_t* out);
  Linear wqkv, wo, w13, w2;
  const void *wqkv_weight, *wo_weight, *w13_weight, *w2_weight;
  const uint16_t *attention_norm, *ffn_norm;
  float eps, scale;  // the norms' epsilon; attention's 1 / sqrt(head_dim)
  int64_t dim, hidden, n_heads, n_kv_heads, head_dim;
};

// out = bf16(a + b) for n bfloat16 values: torch's bfloat16 addition.
BF16 void add(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = first_lanes(n - i);
    const __m512 sum = _mm512_add_ps(widen(_mm256_maskz_loadu_epi16(in, a + i)),
                                     widen(_mm256_maskz_loadu_epi16(in, b + i)));
    _mm256_mask_storeu_epi16(out + i, in, (__m256i)_mm512_cvtneps_pbh(sum));
  }
}

// The block's decode step for x (B, dim) into out (B, dim): h = x + wo(attention(rope(wqkv(norm(x))))), then
// out = h + w2(silu_mul(w13(norm(h)))), every step the call this file (or the layer's kernel) makes for the
// model's own modules, in their order: the same numbers. rope (B, 2, D), positions (B), the cache slots from k
// and v (row_stride apart, L_max positions each), attention over positions [0, L) seen where `visible` (B, L) says,
// or all. Returns the rows whose position is outside the cache (nothing is computed then).
int64_t llama_bf16_decode_layer(const DecodeLayer* layer, const uint16_t* x, int64_t B, const float* rope,
                                const int64_t* positions, uint16_t* k, uint16_t* v, int64_t row_stride,
                                int64_t L_max, int64_t L, const bool* visible, uint16_t* out) {
  const int64_t dim = layer->dim, hidden = layer->hidden, H = layer->n_heads, Hkv = layer->n_kv_heads,
                D = layer->head_dim;
  for (int64_t b = 0; b < B; ++b)
    if (positions[b] < 0 || positions[b] >= L_max) return 1;
  std::vector<uint16_t> normed(B * dim), qkv(B * (H + 2 * Hkv) * D), q(B * H * D), attended(B * H * D);
  std::vector<uint16_t> projected(B * dim), gate_up(B * 2 * hidden), product(B * hidden);
  llama_bf16_rms_norm(x, B, dim, layer->attention_norm, layer->eps, normed.data());
  layer->wqkv(normed.data(), B, dim, layer->wqkv_weight, (H + 2 * Hkv) * D, qkv.data());
  llama_bf16_rope_and_store(qkv.data(), B, H, Hkv, D, rope, positions, k, v, row_stride, L_max, q.data());
  llama_bf16_decode_attention(q.data(), B, H, Hkv, D, k, v, row_stride, L, visible, layer->scale, attended.data());
  layer->wo(attended.data(), B, H * D, layer->wo_weight, dim, projected.data());
  add(x, projected.data(), B * dim, out);
  llama_bf16_rms_norm(out, B, dim, layer->ffn_norm, layer->eps, normed.data());
  layer->w13(normed.data(), B, dim, layer->w13_weight, 2 * hidden, gate_up.data());
  llama_bf16_silu_mul(gate_up.data(), B, hidden, product.data());
  layer->w2(product.data(), B, hidden, layer->w2_weight, dim, projected.data());
  add(out, projected.data(), B * dim, out);
  return 0;
}

}  // extern "C"
