// Fused CPU ops for decode steps (a few tokens per call), fp32, built by engine/model/cpu_decode.py.
//
// At decode a step is dozens of tiny tensors: the PyTorch path spends most of its time dispatching
// elementwise ops and GEMVs too small for the thread pool. Each op here replaces one such cluster with a
// single call that reads its weights once, in place. Same maths as the PyTorch path (engine/model/layers.py,
// engine/model/attention.py, engine/model/moe.py), summed in other orders: fp32 rounding differences only.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // the AVX2 kernels of the 4-bit formats (qgemm4_avx2)
#define ADVISOR_X86_KERNELS 1
#endif

// AVX-512 and AVX2 + FMA builds of the hot loops beside the baseline one, picked at load time by the
// CPU's features. "arch=x86-64-v3" and not "arch=haswell": GCC dispatches the latter on the CPU model
// (Intel Haswell only), so every AMD CPU would get the baseline SSE2 code. Helpers are always inlined into
// these, so they are compiled for the same instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define ADVISOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ADVISOR_CLONES
#endif
#define ADVISOR_INLINE inline __attribute__((always_inline))

namespace {

typedef float f32x8 __attribute__((vector_size(32), aligned(4)));   // 8 floats, any alignment
typedef float f32x16 __attribute__((vector_size(64), aligned(4)));  // 16 floats: one AVX-512 register, two AVX2
typedef int32_t i32x16 __attribute__((vector_size(64), aligned(4)));  // 16 int32s: exp16's integer parts

ADVISOR_INLINE f32x8 load_f32x8(const float* p) {
  f32x8 v;
  __builtin_memcpy(&v, p, 32);
  return v;
}

ADVISOR_INLINE f32x16 load_f32x16(const float* p) {
  f32x16 v;
  __builtin_memcpy(&v, p, 64);
  return v;
}

ADVISOR_INLINE void store_f32x16(float* p, f32x16 v) { __builtin_memcpy(p, &v, 64); }

ADVISOR_INLINE float sum_lanes8(f32x8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp of 16 floats: 2^n * e^r with |r| <= ln2 / 2, e^r by the Cephes polynomial (within 2 ulp of expf
// over the range; inputs below -87 give exp(-87), above 88 exp(88)). A softmax row or a SwiGLU block calls
// std::exp hundreds of times; scalar, that was a fifth of a decode step's attention and experts.
ADVISOR_INLINE f32x16 exp16(f32x16 x) {
  const f32x16 lo = f32x16{} - 87.f, hi = f32x16{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f32x16 fx = x * 1.44269504088896341f + 0.5f;
  f32x16 fn = __builtin_convertvector(__builtin_convertvector(fx, i32x16), f32x16);
  fn = fn > fx ? fn - 1.f : fn;  // floor: the conversion truncated towards zero
  const f32x16 r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  f32x16 p = f32x16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const i32x16 bits = (__builtin_convertvector(fn, i32x16) + 127) << 23;
  f32x16 two_n;
  __builtin_memcpy(&two_n, &bits, 64);
  return p * two_n;
}

// exp16, with 0 below -87 (for -inf: a masked attention slot).
ADVISOR_INLINE f32x16 exp16_or_zero(f32x16 x) {
  const f32x16 e = exp16(x);
  return x < -87.f ? f32x16{} : e;
}

void check_f32(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.device().is_cpu() && t.is_contiguous(), op, ": ", name,
              " must be a contiguous fp32 CPU tensor");
}

// Gemma-style RMSNorm of one row: y = x / rms(x) * scale, where scale already holds (1 + w).
ADVISOR_INLINE void norm_row(const float* x, const float* scale, float eps, int64_t D, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < D; ++j) ss += x[j] * x[j];
  const float r = 1.f / std::sqrt(ss / D + eps);
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) y[j] = x[j] * r * scale[j];
}

ADVISOR_CLONES
void norm_rows(const float* x, const float* scale, float eps, int64_t D, float* y, int64_t lo, int64_t hi) {
  for (int64_t t = lo; t < hi; ++t) norm_row(x + t * D, scale, eps, D, y + t * D);
}

// NeoX rotate-halves on the first rot_dims dims of one head, in place (cos/sin hold the halves repeated).
ADVISOR_INLINE void rope_head(float* x, const float* cos, const float* sin, int64_t rot_dims) {
  const int64_t half = rot_dims / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = x[j], x2 = x[j + half];
    x[j] = x1 * cos[j] - x2 * sin[j];
    x[j + half] = x2 * cos[j + half] + x1 * sin[j + half];
  }
}

// One token's clamped SwiGLU in place: h[j] = w * min(silu(g), limit) * clamp(u, +-limit) for j < I, where
// g = h[0, I) and u = h[I, 2I) (no clamp when limit <= 0).
ADVISOR_INLINE void swiglu_row(float* h, int64_t I, float limit, float w) {
  int64_t j = 0;
  const f32x16 hi = f32x16{} + limit, lo = f32x16{} - limit;
  for (; j + 16 <= I; j += 16) {
    f32x16 g = load_f32x16(h + j), u = load_f32x16(h + I + j);
    g = g / (1.f + exp16(-g));
    if (limit > 0) {
      g = g > hi ? hi : g;
      u = u > hi ? hi : u;
      u = u < lo ? lo : u;
    }
    store_f32x16(h + j, g * u * w);
  }
  for (; j < I; ++j) {
    float g = h[j], u = h[I + j];
    g = g / (1.f + std::exp(-g));
    if (limit > 0) {
      g = std::min(g, limit);
      u = std::max(-limit, std::min(u, limit));
    }
    h[j] = g * u * w;
  }
}

// out[r] (+)= a[rows[r]] @ W for c rows, a rows of stride lda, out rows of stride N; W [K, N] either
// K-major row-major, or blocked: [K/16][N/16][16][16], each 16 x 16 tile contiguous (1 KiB) and the tiles
// in the order the loops read them. Register tiles of up to 4 rows x 16 columns, accumulated over blocks
// of 16 weight rows: each weight is loaded once per 4 rows instead of once per row, and the accumulators
// stay in registers instead of going through memory at every step.
template <int R>
ADVISOR_INLINE void gemm_tile(const float* const* a, const float* w_tile, int64_t w_stride, int64_t k0, int64_t k1,
                               int64_t n0,                         float* const* out) {
  f32x16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = load_f32x16(out[r] + n0);
  for (int64_t k = k0; k < k1; ++k, w_tile += w_stride) {
    const f32x16 w = load_f32x16(w_tile);
    for (int r = 0; r < R; ++r) acc[r] += a[r][k] * w;
  }
  for (int r = 0; r < R; ++r) store_f32x16(out[r] + n0, acc[r]);
}

ADVISOR_INLINE void small_gemm(const float* a, const int64_t* rows, int64_t c, int64_t lda, const float* W,
                               bool blocked, int64_t K, int64_t N, float* out) {
  std::fill(out, out + c * N, 0.f);
  for (int64_t r0 = 0; r0 < c; r0 += 4) {
    const int R = (int)std::min<int64_t>(4, c - r0);
    const float* a_rows[4];
    float* out_rows[4];
    for (int r = 0; r < R; ++r) {
      a_rows[r] = a + (rows ? rows[r0 + r] : r0 + r) * lda;
      out_rows[r] = out + (r0 + r) * N;
    }
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t k1 = std::min<int64_t>(K, k0 + 16);
      for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const float* w_tile = blocked ? W + (k0 * N + n0 * 16) : W + k0 * N + n0;
        // K-major, the tiles walk a 16-row block column by column: sixteen strided streams, more than the
        // hardware prefetchers follow. Ask for the next block's lines of this column while this one
        // computes (measured: 2.0 -> 1.3 ms per MoE layer at batch 16, E=64, H=512, I=128). Blocked, the
        // reads are one sequential stream, which the prefetchers follow alone (1.17 -> 1.04 ms).
        if (!blocked && r0 == 0)
          for (int64_t t = k1; t < std::min<int64_t>(K, k1 + 16); ++t) __builtin_prefetch(W + t * N + n0, 0, 3);
        const int64_t w_stride = blocked ? 16 : N;
        switch (R) {
          case 4: gemm_tile<4>(a_rows, w_tile, w_stride, k0, k1, n0, out_rows); break;
          case 3: gemm_tile<3>(a_rows, w_tile, w_stride, k0, k1, n0, out_rows); break;
          case 2: gemm_tile<2>(a_rows, w_tile, w_stride, k0, k1, n0, out_rows); break;
          default: gemm_tile<1>(a_rows, w_tile, w_stride, k0, k1, n0, out_rows); break;
        }
      }
    }
  }
}

// Which kernels run: 0 the best this CPU has, 1 the generic loops (`set_qkernels`, for the tests to hold both
// against the same reference): the 4-bit formats', the fp32 experts' and fp32 panel_linear's.
std::atomic<int> g_qkernel_mode{0};

#if ADVISOR_X86_KERNELS
#define ADVISOR_AVX2 __attribute__((target("avx2,fma")))

bool use_avx2_f32() {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2 && g_qkernel_mode.load(std::memory_order_relaxed) == 0;
}

// ---- AVX2 + FMA kernel of the fp32 expert GEMMs (gate_up, then down), the generic register tiles' replacement
// where the CPU has them. The generic tiles are f32x16 arrays, which GCC keeps in memory on a 256-bit CPU (every
// accumulator through the stack at each k); and they stop at 16 weight rows, storing the accumulators between
// blocks. This one keeps a tile of up to 6 rows x 16 columns (12 ymm accumulators) in registers over the whole
// K, each k's 16 weights loaded once for the 6 rows, the next 16-row block of the panel read ahead; for 1-3
// rows, 2-4 accumulator sets over alternating k (otherwise one row waits out the FMA latency at every k). The
// panel (K x 16 weights: 32 KiB at K = 512) then serves every tile of rows from the L1/L2 cache.
template <int R, int U>
ADVISOR_AVX2 ADVISOR_INLINE void f32tile_avx2(const float* const* a, const float* w, int64_t K, int64_t row_stride,
                                              int64_t block_stride, float* const* out) {
  __m256 lo[U][R], hi[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) lo[u][r] = hi[u][r] = _mm256_setzero_ps();
  int64_t k0 = 0;
  for (; k0 + 16 <= K; k0 += 16) {
    const float* t = w + (k0 / 16) * block_stride;
    for (int kk = 0; kk < 16; kk += U) {
      if (k0 + 16 < K) _mm_prefetch(reinterpret_cast<const char*>(t + block_stride + kk * row_stride), _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const float* wr = t + (kk + u) * row_stride;
        const __m256 w0 = _mm256_loadu_ps(wr), w1 = _mm256_loadu_ps(wr + 8);
        for (int r = 0; r < R; ++r) {
          const __m256 xb = _mm256_broadcast_ss(a[r] + k0 + kk + u);
          lo[u][r] = _mm256_fmadd_ps(xb, w0, lo[u][r]);
          hi[u][r] = _mm256_fmadd_ps(xb, w1, hi[u][r]);
        }
      }
    }
  }
  // K-major only: a last block of fewer than 16 rows
  for (const float* t = w + (k0 / 16) * block_stride; k0 < K; ++k0, t += row_stride) {
    const __m256 w0 = _mm256_loadu_ps(t), w1 = _mm256_loadu_ps(t + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(a[r] + k0);
      lo[0][r] = _mm256_fmadd_ps(xb, w0, lo[0][r]);
      hi[0][r] = _mm256_fmadd_ps(xb, w1, hi[0][r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 s0 = lo[0][r], s1 = hi[0][r];
    for (int u = 1; u < U; ++u) {
      s0 = _mm256_add_ps(s0, lo[u][r]);
      s1 = _mm256_add_ps(s1, hi[u][r]);
    }
    _mm256_storeu_ps(out[r], s0);
    _mm256_storeu_ps(out[r] + 8, s1);
  }
}

// out[r] = a[rows[r]] @ W for c rows (a rows of stride lda, out rows of stride N), W [K, N] K-major or blocked
// as `small_gemm` reads it (N a multiple of 16; blocked: K too): panel by panel, the rows six at a time.
ADVISOR_AVX2 void f32gemm_avx2(const float* a, const int64_t* rows, int64_t c, int64_t lda, const float* W,
                               bool blocked, int64_t K, int64_t N, float* out) {
  const int64_t row_stride = blocked ? 16 : N, block_stride = blocked ? N * 16 : 16 * N;
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const float* panel = blocked ? W + n0 * 16 : W + n0;
    for (int64_t r0 = 0; r0 < c; r0 += 6) {
      const int R = (int)std::min<int64_t>(6, c - r0);
      const float* ar[6];
      float* orow[6];
      for (int r = 0; r < R; ++r) {
        ar[r] = a + (rows ? rows[r0 + r] : r0 + r) * lda;
        orow[r] = out + (r0 + r) * N + n0;
      }
      switch (R) {
        case 6: f32tile_avx2<6, 1>(ar, panel, K, row_stride, block_stride, orow); break;
        case 5: f32tile_avx2<5, 1>(ar, panel, K, row_stride, block_stride, orow); break;
        case 4: f32tile_avx2<4, 1>(ar, panel, K, row_stride, block_stride, orow); break;
        case 3: f32tile_avx2<3, 2>(ar, panel, K, row_stride, block_stride, orow); break;
        case 2: f32tile_avx2<2, 2>(ar, panel, K, row_stride, block_stride, orow); break;
        default: f32tile_avx2<1, 4>(ar, panel, K, row_stride, block_stride, orow); break;
      }
    }
  }
}

// `expert` through f32gemm_avx2 (its contract; N of both GEMMs a multiple of 16).
ADVISOR_AVX2 void expert_avx2(const float* x, const int64_t* rows, const float* w, int64_t c, const float* gate_up,
                              const float* down, bool blocked, float limit, int64_t H, int64_t I, float* inter,
                              float* y) {
  f32gemm_avx2(x, rows, c, H, gate_up, blocked, H, 2 * I, inter);
  for (int64_t r = 0; r < c; ++r) swiglu_row(inter + r * 2 * I, I, limit, w[r]);
  f32gemm_avx2(inter, nullptr, c, 2 * I, down, blocked, I, H, y);
}
#endif

// One expert (or the shared expert) on its c tokens: y[r] = w[r] * down(swiglu(x[rows[r]] @ gate_up)),
// with K-major weights (gate_up [H, 2I], down [I, H]), so each weight row is read once for all c tokens,
// or the same blocked (then always in register tiles, one token too).
ADVISOR_CLONES
void expert(const float* x, const int64_t* rows, const float* w, int64_t c, const float* gate_up, const float* down,
            bool blocked, float limit, int64_t H, int64_t I, float* inter, float* y) {
  const int64_t I2 = 2 * I;
#if ADVISOR_X86_KERNELS
  if ((blocked || (I2 % 16 == 0 && H % 16 == 0)) && use_avx2_f32())
    return expert_avx2(x, rows, w, c, gate_up, down, blocked, limit, H, I, inter, y);
#endif
  const bool tiled = blocked || (c > 1 && I2 % 16 == 0 && H % 16 == 0);
  if (tiled) small_gemm(x, rows, c, H, gate_up, blocked, H, I2, inter);
  else std::fill(inter, inter + c * I2, 0.f);
  // One token: the weight rows are read one after the other, each a few cache lines; asking for the rows
  // a few ahead keeps more loads in flight than the prefetchers do (MoE layer at batch 1: 257 -> 233 us).
  for (int64_t i = 0; i < H && !tiled; ++i) {
    const float* row = gate_up + i * I2;
    if (i + 8 < H)
      for (int64_t j = 0; j < I2; j += 16) __builtin_prefetch(row + 8 * I2 + j, 0, 3);
    for (int64_t r = 0; r < c; ++r) {
      const float xi = x[rows[r] * H + i];
      float* inter_row = inter + r * I2;
#pragma omp simd
      for (int64_t j = 0; j < I2; ++j) inter_row[j] += xi * row[j];
    }
  }
  for (int64_t r = 0; r < c; ++r) swiglu_row(inter + r * I2, I, limit, w[r]);
  if (tiled) {
    // the SwiGLU output sits in the first I columns of each inter row (stride 2I)
    small_gemm(inter, nullptr, c, I2, down, blocked, I, H, y);
    return;
  }
  std::fill(y, y + c * H, 0.f);
  for (int64_t i = 0; i < I; ++i) {
    const float* row = down + i * H;
    if (i + 4 < I)
      for (int64_t j = 0; j < H; j += 16) __builtin_prefetch(row + 4 * H + j, 0, 3);
    for (int64_t r = 0; r < c; ++r) {
      const float ai = inter[r * I2 + i];
      float* y_row = y + r * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) y_row[j] += ai * row[j];
    }
  }
}

// dot(a, b) over n floats, four independent accumulators (one chain would wait on each FMA's latency).
ADVISOR_INLINE float dot(const float* a, const float* b, int64_t n) {
  f32x8 acc[4] = {};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32)
    for (int u = 0; u < 4; ++u) acc[u] += load_f32x8(a + j + 8 * u) * load_f32x8(b + j + 8 * u);
  for (; j + 8 <= n; j += 8) acc[0] += load_f32x8(a + j) * load_f32x8(b + j);
  float tail = 0.f;
  for (; j < n; ++j) tail += a[j] * b[j];
  return sum_lanes8((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail;
}

ADVISOR_INLINE float sum_lanes16(f32x16 v) {
  f32x8 lo, hi;
  __builtin_memcpy(&lo, &v, 32);
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  return sum_lanes8(lo + hi);
}

// One head's attention weights in place: p holds its scores plus `mask` (0 at visible slots, -inf at the
// others); softmax over the row (the masked slots come out 0), times f (the head's sigmoid gate, folded in
// here rather than applied to the output).
ADVISOR_INLINE void softmax_row(float* p, int64_t S, float f) {
  int64_t s = 0;
  f32x16 max_vec = f32x16{} - std::numeric_limits<float>::infinity();
  for (; s + 16 <= S; s += 16) {
    const f32x16 x = load_f32x16(p + s);
    max_vec = x > max_vec ? x : max_vec;
  }
  float mx = max_vec[0];
  for (int j = 1; j < 16; ++j) mx = std::max(mx, max_vec[j]);
  for (; s < S; ++s) mx = std::max(mx, p[s]);
  f32x16 sum_vec = {};
  for (s = 0; s + 16 <= S; s += 16) {
    const f32x16 e = exp16_or_zero(load_f32x16(p + s) - mx);
    store_f32x16(p + s, e);
    sum_vec += e;
  }
  float sum = sum_lanes16(sum_vec);
  for (; s < S; ++s) {
    p[s] = std::exp(p[s] - mx);
    sum += p[s];
  }
  f /= sum;
  for (s = 0; s + 16 <= S; s += 16) store_f32x16(p + s, load_f32x16(p + s) * f);
  for (; s < S; ++s) p[s] *= f;
}

// Attention of G query heads (q [G, 16 * VECS_PER_HEAD]) over one KV head's slots K, V [S, 16 * VECS_PER_HEAD],
// in passes of up to HEADS_PER_PASS heads whose queries (for q . k) and outputs (for p @ V) stay in registers
// while each key and value row is read once for all of them: HEADS_PER_PASS * VECS_PER_HEAD <= 24 of
// AVX-512's 32 vector registers.
template <int VECS_PER_HEAD>
ADVISOR_INLINE void attend_heads(const float* q, const float* K, const float* V, const char* visible,
                                 const float* mask, const float* gate, int64_t G, int64_t S, float scale, float* p,
                                 float* out, const float* next_K) {
  constexpr int64_t D = 16 * VECS_PER_HEAD;
  constexpr int HEADS_PER_PASS = VECS_PER_HEAD >= 8 ? 3 : (24 / VECS_PER_HEAD > 8 ? 8 : 24 / VECS_PER_HEAD);
  for (int64_t g0 = 0; g0 < G; g0 += HEADS_PER_PASS) {
    const int n_heads = (int)std::min<int64_t>(HEADS_PER_PASS, G - g0);
    f32x16 acc[HEADS_PER_PASS][VECS_PER_HEAD];
    for (int h = 0; h < HEADS_PER_PASS; ++h)
      for (int d = 0; d < VECS_PER_HEAD; ++d)
        acc[h][d] = h < n_heads ? load_f32x16(q + (g0 + h) * D + 16 * d) : f32x16{};
    for (int64_t s = 0; s < S; ++s) {
      f32x16 key[VECS_PER_HEAD];
      for (int d = 0; d < VECS_PER_HEAD; ++d) key[d] = load_f32x16(K + s * D + 16 * d);
      if (g0 == 0)
        for (int d = 0; d < VECS_PER_HEAD; ++d) __builtin_prefetch(V + s * D + 16 * d, 0, 3);
      for (int h = 0; h < HEADS_PER_PASS; ++h) {
        if (h >= n_heads) break;
        f32x16 t = acc[h][0] * key[0];
        for (int d = 1; d < VECS_PER_HEAD; ++d) t += acc[h][d] * key[d];
        p[(g0 + h) * S + s] = sum_lanes16(t) * scale + mask[s];
      }
    }
    for (int h = 0; h < n_heads; ++h) softmax_row(p + (g0 + h) * S, S, 1.f / (1.f + std::exp(-gate[g0 + h])));
    for (int h = 0; h < HEADS_PER_PASS; ++h)
      for (int d = 0; d < VECS_PER_HEAD; ++d) acc[h][d] = f32x16{};
    for (int64_t s = 0; s < S; ++s) {
      if (next_K && g0 + HEADS_PER_PASS >= G)
        for (int d = 0; d < VECS_PER_HEAD; ++d) __builtin_prefetch(next_K + s * D + 16 * d, 0, 3);
      if (!visible[s]) continue;
      f32x16 val[VECS_PER_HEAD];
      for (int d = 0; d < VECS_PER_HEAD; ++d) val[d] = load_f32x16(V + s * D + 16 * d);
      for (int h = 0; h < HEADS_PER_PASS; ++h) {
        if (h >= n_heads) break;
        const float ph = p[(g0 + h) * S + s];
        for (int d = 0; d < VECS_PER_HEAD; ++d) acc[h][d] += ph * val[d];
      }
    }
    for (int h = 0; h < n_heads; ++h)
      for (int d = 0; d < VECS_PER_HEAD; ++d) store_f32x16(out + (g0 + h) * D + 16 * d, acc[h][d]);
  }
}

// Everything one decode step of attention does for one row b and one KV head (the G query heads that
// share it): the new key's q/k RMSNorm and RoPE, its key and value written to the cache slot, q . k over
// the visible slots (each key and value row read once for all G heads), the softmax, p @ V and the
// head-wise sigmoid gate. The tasks are independent: a (row, KV head) owns its cache rows.
struct AttentionStep {
  const float *qkvg, *q_scale, *k_scale, *cos, *sin;
  const int64_t *qpos, *kpos;
  float *k_cache, *v_cache, *out;
  int64_t B, Hq, Hkv, G, D, rot_dims, capacity, S, slot, window, kpos_stride, width;
  float eps, scale;
};

ADVISOR_CLONES
void attend(const AttentionStep& a, int64_t b, int64_t kvh, float* work, int64_t next) {
  const int64_t G = a.G, D = a.D, S = a.S, rot_dims = a.rot_dims;
  float* q = work;          // [G, D]
  float* p = q + G * D;     // [G, S]
  float* mask = p + G * S;  // [S]: 0 where visible, -inf elsewhere
  char* visible = reinterpret_cast<char*>(mask + S);
  const int64_t query_pos = a.qpos[b];
  const float *cos_row = a.cos + b * rot_dims, *sin_row = a.sin + b * rot_dims;
  const float* row = a.qkvg + b * a.width;
  const int64_t row_kv = b * a.Hkv + kvh;
  float* K = a.k_cache + row_kv * a.capacity * D;
  float* V = a.v_cache + row_kv * a.capacity * D;
  norm_row(row + a.Hq * D + kvh * D, a.k_scale, a.eps, D, K + a.slot * D);
  rope_head(K + a.slot * D, cos_row, sin_row, rot_dims);
  const float* v = row + a.Hq * D + a.Hkv * D + kvh * D;
  std::copy(v, v + D, V + a.slot * D);
  for (int64_t g = 0; g < G; ++g) {
    norm_row(row + (kvh * G + g) * D, a.q_scale, a.eps, D, q + g * D);
    rope_head(q + g * D, cos_row, sin_row, rot_dims);
  }
  // Which slots the query sees: causal, within the window when there is one; a padding row with nothing
  // visible sees everything (its output is unused).
  const int64_t* key_pos = a.kpos + b * a.kpos_stride;
  bool any = false;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t k = key_pos[s];
    visible[s] = k >= 0 && k <= query_pos && (a.window <= 0 || k > query_pos - a.window);
    any |= visible[s];
  }
  if (!any) std::fill(visible, visible + S, 1);
  for (int64_t s = 0; s < S; ++s) mask[s] = visible[s] ? 0.f : -std::numeric_limits<float>::infinity();
  const float* gate = row + a.Hq * D + 2 * a.Hkv * D + kvh * G;
  float* out = a.out + (b * a.Hq + kvh * G) * D;
  const float scale = a.scale;
  // The next task's keys, fetched while this one's values are summed (its values are fetched during its
  // q . k): the cache rows come from memory at every step, and the two loads then overlap the arithmetic.
  const float* next_K = next >= 0 ? a.k_cache + next * a.capacity * D : nullptr;
  switch (D) {  // head sizes of 16 to 128: the query heads and their outputs held in registers
    case 16: return attend_heads<1>(q, K, V, visible, mask, gate, G, S, scale, p, out, next_K);
    case 32: return attend_heads<2>(q, K, V, visible, mask, gate, G, S, scale, p, out, next_K);
    case 48: return attend_heads<3>(q, K, V, visible, mask, gate, G, S, scale, p, out, next_K);
    case 64: return attend_heads<4>(q, K, V, visible, mask, gate, G, S, scale, p, out, next_K);
    case 96: return attend_heads<6>(q, K, V, visible, mask, gate, G, S, scale, p, out, next_K);
    case 128: return attend_heads<8>(q, K, V, visible, mask, gate, G, S, scale, p, out, next_K);
    default: break;
  }
  for (int64_t s = 0; s < S; ++s)
    for (int64_t g = 0; g < G; ++g) p[g * S + s] = dot(q + g * D, K + s * D, D) * scale + mask[s];
  for (int64_t g = 0; g < G; ++g) softmax_row(p + g * S, S, 1.f / (1.f + std::exp(-gate[g])));
  std::fill(out, out + G * D, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    if (!visible[s]) continue;
    const float* vs = V + s * D;
    for (int64_t g = 0; g < G; ++g) {
      const float ps = p[g * S + s];
      float* o = out + g * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) o[j] += ps * vs[j];
    }
  }
}

// The router for tokens [lo, hi): sigmoid scores, top-k of (score + bias), the chosen scores renormalised
// and scaled; ids in descending order of score + bias (ties: the lower expert id first).
ADVISOR_CLONES
void route_rows(const float* x, const float* w, const float* bias, int64_t H, int64_t E, int64_t k, float scale,
                int64_t lo, int64_t hi, float* weights, int64_t* ids) {
  std::vector<float> score(E);
  std::vector<int64_t> order(E);
  for (int64_t t = lo; t < hi; ++t) {
    const float* xt = x + t * H;
    for (int64_t i = 0; i < E; ++i) {
      score[i] = 1.f / (1.f + std::exp(-dot(xt, w + i * H, H)));
      order[i] = i;
    }
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      const float sa = score[a] + bias[a], sb = score[b] + bias[b];
      return sa > sb || (sa == sb && a < b);
    });
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) sum += score[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      weights[t * k + j] = score[order[j]] * (scale / sum);
      ids[t * k + j] = order[j];
    }
  }
}

// A projection for a few rows on a weight in column panels: P = ceil(N/16) panels [K][16] (panel p holds
// columns p*16.., zero past N), each contiguous. One panel against R rows of x, given transposed as
// xt [K][R]: R accumulators of 16 columns, each k one weight vector and R broadcast FMAs; no sums across
// lanes, and the panels are one sequential stream, read 8 KiB ahead (without that the FMAs of 16 rows left
// the memory idle: 19 GB/s). The generic loop: where the CPU has AVX2 + FMA, `fpanel_avx2` runs instead (these
// arrays of 512-bit vectors spill on 256-bit registers, ~1 G weights/s a thread). Measured with 512-bit
// registers on a 2-core Zen 5, weights not in cache, against oneDNN's
// packed linear: 16 rows 35 against 26 GB/s on the 16384 x 512 head, 31 against 20 on 1036 x 512; one
// row 40 against 35 and 34 against 26; 64 rows still 13 against 11 (an [out, in] dot-product kernel tried
// first stalled at 22 GB/s at 16 rows, its cross-lane sums a quarter of the work).
template <int R>
ADVISOR_INLINE void panel_rows(const float* xt, const float* panel, int64_t K, float* out, int64_t ldo,
                               int64_t cols) {
  f32x16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = f32x16{};
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(panel + (k + 128) * 16, 0, 3);  // past the panel's end: the next one's start
    const f32x16 w = load_f32x16(panel + k * 16);
    for (int r = 0; r < R; ++r) acc[r] += xt[k * R + r] * w;
  }
  for (int r = 0; r < R; ++r) {
    if (cols == 16) store_f32x16(out + r * ldo, acc[r]);
    else
      for (int64_t j = 0; j < cols; ++j) out[r * ldo + j] = acc[r][j];
  }
}

// Panels [p0, p1) for all M rows: groups of 16 rows (xt holds them as [M/16][K][16]), the rest padded to
// tail_r = 1, 2, 4, 8 or 16 rows (its xt block [K][tail_r]). Each panel stays in L1 across the groups.
ADVISOR_CLONES
void panel_cols(const float* xt, int64_t M, const float* W, int64_t K, int64_t N, int64_t p0, int64_t p1,
                int64_t tail_r, float* out) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = W + p * K * 16;
    const int64_t cols = std::min<int64_t>(16, N - p * 16);
    int64_t m = 0;
    for (; m + 16 <= M; m += 16) panel_rows<16>(xt + m * K, panel, K, out + m * N + p * 16, N, cols);
    if (m < M) {
      const float* t = xt + m * K;
      float* o = out + m * N + p * 16;
      // rows past M in the padded group land in scratch rows of `out` (it has tail_r - (M - m) spare)
      switch (tail_r) {
        case 16: panel_rows<16>(t, panel, K, o, N, cols); break;
        case 8: panel_rows<8>(t, panel, K, o, N, cols); break;
        case 4: panel_rows<4>(t, panel, K, o, N, cols); break;
        case 2: panel_rows<2>(t, panel, K, o, N, cols); break;
        default: panel_rows<1>(t, panel, K, o, N, cols); break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Quantized weights (engine/quant/packed.py): the output columns in panels of 16, each panel its K input
// rows one after the other, each row 16 codes: 16 bytes of e4m3 (fmt 0, FP8) or 8 bytes of 4-bit codes
// (fmt 1 int4: value = code - 8; fmt 2 NVFP4: e2m1), byte j holding column j low and column j + 8 high.
// Scales [K / group, Np]: fp32 (fmt 0, 1) or e4m3 bytes times a per-column fp32 scale_2 [Np] (fmt 2). The
// codes are turned into floats in registers, 16 at a time, and scaled once per 16 rows (a group is a
// multiple of 16 rows): the weights cross the memory bus at 4 or 8 bits and never exist as fp32 in memory.
struct QMat {
  const uint8_t* codes;  // [P, K, B]
  const void* scales;    // [K / group, Np]
  const float* s2;       // [Np] (fmt 2)
  int64_t P, K, group, Np, N;
};

typedef int32_t i32x4 __attribute__((vector_size(16), aligned(1)));

ADVISOR_INLINE f32x16 as_f32x16(i32x16 bits) {
  f32x16 f;
  __builtin_memcpy(&f, &bits, 64);
  return f;
}

// 16 e4m3 bytes -> floats: the magnitude's bits moved under fp32's exponent and mantissa and rebased
// (bias 7 -> 127), subnormals (exponent 0) as m * 2^-9, then the sign. NaN codes are never written.
// Byte and nibble unpacking through 32-bit words spread over the lanes and shifted per lane: GCC turns a
// __builtin_convertvector from a uint8 vector into one insert per byte (a 4096 x 512 int4 projection ran at
// 0.4 G weights/s that way), while word shuffles and per-lane shifts stay in vector registers.
ADVISOR_INLINE i32x16 bytes16(const uint8_t* p) {
  i32x4 v;
  __builtin_memcpy(&v, p, 16);
  const i32x16 w = __builtin_shufflevector(v, v, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const i32x16 sh = {0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24};
  return (w >> sh) & 0xFF;
}

ADVISOR_INLINE f32x16 e4m3x16(const uint8_t* p) {
  const i32x16 u = bytes16(p);
  const i32x16 mag = u & 0x7F;
  const f32x16 normal = as_f32x16((mag << 20) + (120 << 23));
  const f32x16 sub = __builtin_convertvector(mag, f32x16) * (1.f / 512.f);
  f32x16 f = mag < 8 ? sub : normal;
  i32x16 bits;
  __builtin_memcpy(&bits, &f, 64);
  return as_f32x16(bits | ((u & 0x80) << 24));
}

// 8 bytes -> 16 four-bit codes: lanes 0-7 the low nibbles, 8-15 the high ones.
ADVISOR_INLINE i32x16 nibbles16(const uint8_t* p) {
  i32x4 v = {};
  __builtin_memcpy(&v, p, 8);
  const i32x16 w = __builtin_shufflevector(v, v, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
  const i32x16 sh = {0, 8, 16, 24, 0, 8, 16, 24, 4, 12, 20, 28, 4, 12, 20, 28};
  return (w >> sh) & 15;
}

// e2m1: exponent e = bits 2-1 (bias 1), mantissa m = bit 0; e = 0 is 0 or 0.5; bit 3 the sign.
ADVISOR_INLINE f32x16 e2m1x16(i32x16 c) {
  const i32x16 mag = c & 7, e = mag >> 1, m = mag & 1;
  const i32x16 normal = ((e + 126) << 23) | (m << 22);
  const i32x16 sub = m != 0 ? (i32x16{} + 0x3F000000) : i32x16{};
  const i32x16 bits = e != 0 ? normal : sub;
  return as_f32x16(bits | ((c & 8) << 28));
}

template <int FMT>
ADVISOR_INLINE f32x16 qdecode(const uint8_t* p) {
  if constexpr (FMT == 0) return e4m3x16(p);
  else if constexpr (FMT == 1) return __builtin_convertvector(nibbles16(p), f32x16) - 8.f;
  else return e2m1x16(nibbles16(p));
}

template <int FMT>
ADVISOR_INLINE f32x16 qscale(const QMat& q, int64_t k, int64_t p) {
  const int64_t at = (k / q.group) * q.Np + p * 16;
  if constexpr (FMT == 2) return e4m3x16(static_cast<const uint8_t*>(q.scales) + at) * load_f32x16(q.s2 + p * 16);
  else return load_f32x16(static_cast<const float*>(q.scales) + at);
}

// Panel p of the weight against R rows of activations: R accumulators of 16 columns in registers over all
// K; each row of 16 codes decoded and scaled once for the R rows. The panel is one sequential stream.
template <int R, int FMT>
ADVISOR_INLINE void qpanel(const float* const* a, const QMat& q, int64_t p, float* const* out) {
  constexpr int64_t B = FMT == 0 ? 16 : 8;
  const int64_t K = q.K;
  const uint8_t* c = q.codes + p * K * B;
  f32x16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = f32x16{};
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t k1 = std::min<int64_t>(K, k0 + 16);
    const f32x16 s = qscale<FMT>(q, k0, p);
    __builtin_prefetch(c + (k0 + 64) * B, 0, 3);
    for (int64_t k = k0; k < k1; ++k) {
      const f32x16 w = qdecode<FMT>(c + k * B) * s;
      for (int r = 0; r < R; ++r) acc[r] += a[r][k] * w;
    }
  }
  const int64_t cols = std::min<int64_t>(16, q.N - p * 16);
  for (int r = 0; r < R; ++r) {
    if (cols == 16) store_f32x16(out[r] + p * 16, acc[r]);
    else
      for (int64_t j = 0; j < cols; ++j) out[r][p * 16 + j] = acc[r][j];
  }
}

// out[r] = a[rows[r]] @ W for c rows (a rows of stride lda, out rows of stride q.N), panels [p0, p1): each
// panel against the rows four at a time (it stays in L1 across the groups).
template <int FMT>
ADVISOR_INLINE void qgemm_t(const float* a, const int64_t* rows, int64_t c, int64_t lda, const QMat& q, int64_t p0,
                            int64_t p1, float* out) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t r0 = 0; r0 < c; r0 += 4) {
      const int R = (int)std::min<int64_t>(4, c - r0);
      const float* ar[4];
      float* orow[4];
      for (int r = 0; r < R; ++r) {
        ar[r] = a + (rows ? rows[r0 + r] : r0 + r) * lda;
        orow[r] = out + (r0 + r) * q.N;
      }
      switch (R) {
        case 4: qpanel<4, FMT>(ar, q, p, orow); break;
        case 3: qpanel<3, FMT>(ar, q, p, orow); break;
        case 2: qpanel<2, FMT>(ar, q, p, orow); break;
        default: qpanel<1, FMT>(ar, q, p, orow); break;
      }
    }
}

// ---- AVX2 + FMA kernels of the 4-bit formats (int4, NVFP4), the generic loops' replacement where the CPU has them.
// Why not the generic f32x16 loops: on a CPU with 256-bit registers GCC (12) keeps their arrays of 512-bit vectors
// in memory, round-tripping every accumulator through the stack at each k; and one row's accumulator is one FMA
// dependency chain, so a single row waits out the FMA latency at every k however fast the decoding. Measured alone
// on the AVX2 Zen here (1 thread, thread CPU time, 1280 x 512, one row): the generic int4 loop 5.5 G weights/s,
// the generic fp32 panel loop 1.0, this int4 kernel 19 and the NVFP4 one 9 (16 rows: 0.2, 1.9 and 1.4 G
// row-weights/s x 16); fp32 has its own AVX2 kernel since (`fpanel_avx2` below, `python -m advisor.engine.bench_linear`).
// What they do instead:
// - each k's 8 code bytes zero-extended into 8 int32 lanes by one vpmovzxbd (byte j: column j low, j + 8 high);
//   the low nibbles are `& 15`, the high ones `>> 4`, converted in registers;
// - int4: the codes are summed unsigned over a group (sum_k x_k c_k) and the offset of 8 taken off once per
//   group with the rows' sums over it (sum_k x_k (c_k - 8) = sum_k x_k c_k - 8 sum_k x_k), then scaled: per k
//   only decode and FMAs, per group one multiply-add per column;
// - NVFP4: e2m1 through an in-lane byte shuffle (vpshufb) of a 16-entry table of twice the values (-12..12, so
//   integers; the 1/2 goes into the group's scale): the nibble moved to byte 3 of its lane (the other bytes look
//   up entry 0, which is 0), shuffled, shifted back arithmetically: one shuffle and three shifts per half;
// - U independent accumulator pairs per row for few rows (U k-rows in flight: one row no longer waits on FMA
//   latency), the rows four at a time so each decoded row of codes serves four rows of activations.
#if ADVISOR_X86_KERNELS
#define ADVISOR_AVX2 __attribute__((target("avx2,fma")))

template <int FMT, int R, int U>
ADVISOR_AVX2 ADVISOR_INLINE void q4panel_avx2(const float* const* a, const float* xs, const QMat& q, int64_t p,
                                               float* const* out) {
  const int64_t K = q.K, g = q.group, G = K / g, Np = q.Np;
  const uint8_t* c = q.codes + p * K * 8;
  const __m256i m15 = _mm256_set1_epi32(15);
  const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,  //
                                       0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  __m256 f0[R], f1[R], h0, h1;
  for (int r = 0; r < R; ++r) f0[r] = f1[r] = _mm256_setzero_ps();
  if constexpr (FMT == 2) {  // scale_2, and the 1/2 of the doubled e2m1 table
    h0 = _mm256_mul_ps(_mm256_loadu_ps(q.s2 + p * 16), _mm256_set1_ps(0.5f));
    h1 = _mm256_mul_ps(_mm256_loadu_ps(q.s2 + p * 16 + 8), _mm256_set1_ps(0.5f));
  }
  for (int64_t gi = 0; gi < G; ++gi) {
    const uint8_t* cg = c + gi * g * 8;
    const int64_t kg = gi * g;
    __m256 a0[R][U], a1[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) a0[r][u] = a1[r][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < g; k += U) {
      _mm_prefetch(reinterpret_cast<const char*>(cg + (k + 64) * 8), _MM_HINT_T0);  // 512 bytes ahead
      for (int u = 0; u < U; ++u) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cg + (k + u) * 8)));
        __m256 lo, hi;
        if constexpr (FMT == 1) {
          lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, m15));
          hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        } else {
          const __m256i il = _mm256_srli_epi32(_mm256_slli_epi32(v, 28), 4), ih = _mm256_slli_epi32(v, 20);
          lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_shuffle_epi8(lut, il), 24));
          hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_shuffle_epi8(lut, ih), 24));
        }
        for (int r = 0; r < R; ++r) {
          const __m256 xb = _mm256_broadcast_ss(a[r] + kg + k + u);
          a0[r][u] = _mm256_fmadd_ps(xb, lo, a0[r][u]);
          a1[r][u] = _mm256_fmadd_ps(xb, hi, a1[r][u]);
        }
      }
    }
    __m256 s0, s1;
    if constexpr (FMT == 1) {
      const float* sp = static_cast<const float*>(q.scales) + gi * Np + p * 16;
      s0 = _mm256_loadu_ps(sp);
      s1 = _mm256_loadu_ps(sp + 8);
    } else {  // e4m3: the magnitude's bits under fp32's, times 2^120 (exact, subnormals included), then the sign
      const uint8_t* sp = static_cast<const uint8_t*>(q.scales) + gi * Np + p * 16;
      __m256 s[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sp + 8 * h)));
        const __m256i mag = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)), 20);
        const __m256 f = _mm256_mul_ps(_mm256_castsi256_ps(mag), _mm256_castsi256_ps(_mm256_set1_epi32(247 << 23)));
        const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
        s[h] = _mm256_or_ps(f, _mm256_castsi256_ps(sign));
      }
      s0 = _mm256_mul_ps(s[0], h0);
      s1 = _mm256_mul_ps(s[1], h1);
    }
    for (int r = 0; r < R; ++r) {
      __m256 t0 = a0[r][0], t1 = a1[r][0];
      for (int u = 1; u < U; ++u) {
        t0 = _mm256_add_ps(t0, a0[r][u]);
        t1 = _mm256_add_ps(t1, a1[r][u]);
      }
      if constexpr (FMT == 1) {
        const __m256 off = _mm256_set1_ps(8.f * xs[r * G + gi]);
        t0 = _mm256_sub_ps(t0, off);
        t1 = _mm256_sub_ps(t1, off);
      }
      f0[r] = _mm256_fmadd_ps(s0, t0, f0[r]);
      f1[r] = _mm256_fmadd_ps(s1, t1, f1[r]);
    }
  }
  const int64_t cols = std::min<int64_t>(16, q.N - p * 16);
  for (int r = 0; r < R; ++r) {
    float* o = out[r] + p * 16;
    if (cols == 16) {
      _mm256_storeu_ps(o, f0[r]);
      _mm256_storeu_ps(o + 8, f1[r]);
    } else {
      alignas(32) float t[16];
      _mm256_store_ps(t, f0[r]);
      _mm256_store_ps(t + 8, f1[r]);
      std::copy(t, t + cols, o);
    }
  }
}

// The generic qgemm's contract (out[r] = a[rows[r]] @ W, panels [p0, p1)) for int4 and NVFP4.
template <int FMT>
ADVISOR_AVX2 void qgemm4_avx2(const float* a, const int64_t* rows, int64_t c, int64_t lda, const QMat& q, int64_t p0,
                              int64_t p1, float* out) {
  const int64_t G = q.K / q.group;
  std::vector<float> xs;  // int4: each row's sum over each group, [c][G]
  if constexpr (FMT == 1) {
    xs.resize(c * G);
    for (int64_t r = 0; r < c; ++r) {
      const float* x = a + (rows ? rows[r] : r) * lda;
      for (int64_t gi = 0; gi < G; ++gi) {
        float s = 0.f;
        for (int64_t k = gi * q.group; k < (gi + 1) * q.group; ++k) s += x[k];
        xs[r * G + gi] = s;
      }
    }
  }
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t r0 = 0; r0 < c; r0 += 4) {
      const int R = (int)std::min<int64_t>(4, c - r0);
      const float* ar[4];
      float* orow[4];
      for (int r = 0; r < R; ++r) {
        ar[r] = a + (rows ? rows[r0 + r] : r0 + r) * lda;
        orow[r] = out + (r0 + r) * q.N;
      }
      const float* xr = FMT == 1 ? xs.data() + r0 * G : nullptr;
      switch (R) {  // FMA chains in flight per row: 8 for one row, 4 for two, 2 from three (int4; NVFP4 half)
        case 4: q4panel_avx2<FMT, 4, 1>(ar, xr, q, p, orow); break;
        case 3: q4panel_avx2<FMT, 3, 1>(ar, xr, q, p, orow); break;
        case 2: q4panel_avx2<FMT, 2, 2>(ar, xr, q, p, orow); break;
        default: q4panel_avx2<FMT, 1, FMT == 1 ? 4 : 2>(ar, xr, q, p, orow); break;
      }
    }
}

// ---- The AVX2 + FMA kernel of fp32 panel_linear (the generic panel_rows' replacement where the CPU has them),
// for the reasons above: R rows against one panel, its 16 columns two 256-bit accumulators per row, each k one
// pair of weight loads and R broadcast FMA pairs, all in registers (R = 6: 12 accumulators, 2 weights and the
// broadcast, 15 of the 16 ymm registers). Fewer rows keep U independent accumulator pairs per row (one row: 4
// k in flight, 8 FMA chains), so a single row waits on the memory, not on FMA latency. The rows are read in
// place (no transposed copy), six at a time, so each loaded panel serves six rows; the first group of a panel
// asks for the lines 8 KiB ahead (the next panels: the weights are one sequential stream), the later groups
// find the panel in L1 or L2.
template <int R, int U, bool PREFETCH>
ADVISOR_AVX2 ADVISOR_INLINE void fpanel_avx2(const float* const* a, const float* panel, int64_t K, float* const* out,
                                             int64_t cols) {
  __m256 c0[R][U], c1[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) c0[r][u] = c1[r][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U)
    for (int u = 0; u < U; ++u) {
      const float* w = panel + (k + u) * 16;  // one 64-byte line
      if constexpr (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(w + 128 * 16), _MM_HINT_T0);
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(a[r] + k + u);
        c0[r][u] = _mm256_fmadd_ps(xb, w0, c0[r][u]);
        c1[r][u] = _mm256_fmadd_ps(xb, w1, c1[r][u]);
      }
    }
  for (; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * 16), w1 = _mm256_loadu_ps(panel + k * 16 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(a[r] + k);
      c0[r][0] = _mm256_fmadd_ps(xb, w0, c0[r][0]);
      c1[r][0] = _mm256_fmadd_ps(xb, w1, c1[r][0]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 t0 = c0[r][0], t1 = c1[r][0];
    for (int u = 1; u < U; ++u) {
      t0 = _mm256_add_ps(t0, c0[r][u]);
      t1 = _mm256_add_ps(t1, c1[r][u]);
    }
    if (cols == 16) {
      _mm256_storeu_ps(out[r], t0);
      _mm256_storeu_ps(out[r] + 8, t1);
    } else {
      alignas(32) float t[16];
      _mm256_store_ps(t, t0);
      _mm256_store_ps(t + 8, t1);
      std::copy(t, t + cols, out[r]);
    }
  }
}

template <int R, int U>
ADVISOR_AVX2 ADVISOR_INLINE void fpanel_group_avx2(const float* const* a, const float* panel, int64_t K,
                                                   float* const* out, int64_t cols, bool first) {
  if (first) fpanel_avx2<R, U, true>(a, panel, K, out, cols);
  else fpanel_avx2<R, U, false>(a, panel, K, out, cols);
}

// out [M, N] = x [M, K] @ W for panels [p0, p1) (W in column panels [P][K][16]).
ADVISOR_AVX2 void panel_cols_avx2(const float* x, int64_t M, const float* W, int64_t K, int64_t N, int64_t p0,
                                  int64_t p1, float* out) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = W + p * K * 16;
    const int64_t cols = std::min<int64_t>(16, N - p * 16);
    for (int64_t m = 0; m < M; m += 6) {
      const int R = (int)std::min<int64_t>(6, M - m);
      const float* a[6];
      float* o[6];
      for (int r = 0; r < R; ++r) {
        a[r] = x + (m + r) * K;
        o[r] = out + (m + r) * N + p * 16;
      }
      const bool first = m == 0;
      switch (R) {  // FMA chains in flight: 12 from three rows, 8 for one, two or four
        case 6: fpanel_group_avx2<6, 1>(a, panel, K, o, cols, first); break;
        case 5: fpanel_group_avx2<5, 1>(a, panel, K, o, cols, first); break;
        case 4: fpanel_group_avx2<4, 1>(a, panel, K, o, cols, first); break;
        case 3: fpanel_group_avx2<3, 2>(a, panel, K, o, cols, first); break;
        case 2: fpanel_group_avx2<2, 2>(a, panel, K, o, cols, first); break;
        default: fpanel_group_avx2<1, 4>(a, panel, K, o, cols, first); break;
      }
    }
  }
}
#endif

bool use_avx2_q4(int fmt, const QMat& q) {
#if ADVISOR_X86_KERNELS
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2 && (fmt == 1 || fmt == 2) && g_qkernel_mode.load(std::memory_order_relaxed) == 0 && q.K % q.group == 0;
#else
  (void)fmt;
  (void)q;
  return false;
#endif
}

ADVISOR_CLONES
void qgemm_generic(int fmt, const float* a, const int64_t* rows, int64_t c, int64_t lda, const QMat& q, int64_t p0,
                   int64_t p1, float* out) {
  switch (fmt) {
    case 0: return qgemm_t<0>(a, rows, c, lda, q, p0, p1, out);
    case 1: return qgemm_t<1>(a, rows, c, lda, q, p0, p1, out);
    default: return qgemm_t<2>(a, rows, c, lda, q, p0, p1, out);
  }
}

void qgemm(int fmt, const float* a, const int64_t* rows, int64_t c, int64_t lda, const QMat& q, int64_t p0, int64_t p1,
           float* out) {
#if ADVISOR_X86_KERNELS
  if (use_avx2_q4(fmt, q)) {
    if (fmt == 1) return qgemm4_avx2<1>(a, rows, c, lda, q, p0, p1, out);
    return qgemm4_avx2<2>(a, rows, c, lda, q, p0, p1, out);
  }
#endif
  qgemm_generic(fmt, a, rows, c, lda, q, p0, p1, out);
}

template <int FMT>
ADVISOR_INLINE void qdequant_t(const QMat& q, int64_t p0, int64_t p1, float* out) {
  constexpr int64_t B = FMT == 0 ? 16 : 8;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* c = q.codes + p * q.K * B;
    const int64_t cols = std::min<int64_t>(16, q.N - p * 16);
    for (int64_t k0 = 0; k0 < q.K; k0 += 16) {
      const f32x16 s = qscale<FMT>(q, k0, p);
      for (int64_t k = k0; k < std::min<int64_t>(q.K, k0 + 16); ++k) {
        const f32x16 w = qdecode<FMT>(c + k * B) * s;
        float* o = out + k * q.N + p * 16;
        if (cols == 16) store_f32x16(o, w);
        else
          for (int64_t j = 0; j < cols; ++j) o[j] = w[j];
      }
    }
  }
}

// The weight dequantized K-major into out [K, N] (longer inputs: a reused buffer, then one GEMM).
ADVISOR_CLONES
void qdequant_panels(int fmt, const QMat& q, int64_t p0, int64_t p1, float* out) {
  switch (fmt) {
    case 0: return qdequant_t<0>(q, p0, p1, out);
    case 1: return qdequant_t<1>(q, p0, p1, out);
    default: return qdequant_t<2>(q, p0, p1, out);
  }
}

// One expert on its c tokens with quantized weights: y[r] = w[r] * down(swiglu(x[rows[r]] @ gate_up)).
void qexpert(int fmt, const float* x, const int64_t* rows, const float* w, int64_t c, const QMat& gu, const QMat& dn,
             float limit, int64_t H, int64_t I, float* h, float* y) {
  qgemm(fmt, x, rows, c, H, gu, 0, gu.P, h);
  for (int64_t r = 0; r < c; ++r) swiglu_row(h + r * 2 * I, I, limit, w[r]);
  qgemm(fmt, h, nullptr, c, 2 * I, dn, 0, dn.P, y);
}

}  // namespace

// x [T, D] -> RMSNorm(x) * scale. With a residual r: returns (x + r, RMSNorm(x + r) * scale), the sum
// being the stream the next block adds to (one pass instead of an add and five norm ops).
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor scale,
                                    double eps) {
  check_f32(x, "rms_norm", "x");
  check_f32(scale, "rms_norm", "scale");
  const int64_t D = x.size(-1), T = x.numel() / D;
  TORCH_CHECK(scale.numel() == D, "rms_norm: scale has ", scale.numel(), " entries, rows have ", D);
  auto y = torch::empty_like(x);
  torch::Tensor sum = x;
  if (residual.has_value()) {
    check_f32(*residual, "rms_norm", "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "rms_norm: residual shape differs from x");
    sum = torch::empty_like(x);
    const float *xp = x.data_ptr<float>(), *rp = residual->data_ptr<float>();
    float* sp = sum.data_ptr<float>();
    for (int64_t i = 0; i < T * D; ++i) sp[i] = xp[i] + rp[i];
  }
  const float* sp = sum.data_ptr<float>();
  const float* wp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) { norm_rows(sp, wp, (float)eps, D, yp, b, e); });
  return {sum, y};
}

namespace {

// Panels per task: at least ~64 KiB of weights, below which waking a second thread costs more than it saves.
int64_t panel_grain(int64_t K) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(16, 16 * K)); }

#if ADVISOR_X86_KERNELS
// x [M, K] @ panels into out [M, N] with the AVX2 kernel, the panels split across ATen's threads.
void panel_cols_into(const float* x, int64_t M, int64_t K, const float* panels, int64_t N, float* out) {
  at::parallel_for(0, (N + 15) / 16, panel_grain(K),
                   [&](int64_t b, int64_t e) { panel_cols_avx2(x, M, panels, K, N, b, e, out); });
}
#endif

}  // namespace

// x [M, K] @ W -> [M, N], W in column panels [ceil(N/16), K, 16] (`advisor.engine.model.layers.to_panels`), for a few
// rows. The panels split across ATen's threads in contiguous ranges, one sequential stream each.
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N) {
  check_f32(x, "panel_linear", "x");
  check_f32(panels, "panel_linear", "weight panels");
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3 && panels.size(2) == 16 && x.size(1) == panels.size(1) &&
                  panels.size(0) == (N + 15) / 16,
              "panel_linear: x ", x.sizes(), " and weight panels ", panels.sizes(), " do not match ", N,
              " outputs");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  const int64_t grain = panel_grain(K);
#if ADVISOR_X86_KERNELS
  if (use_avx2_f32()) {
    auto out = torch::empty({M, N}, x.options());
    panel_cols_into(x.data_ptr<float>(), M, K, panels.data_ptr<float>(), N, out.data_ptr<float>());
    return out;
  }
#endif
  const int64_t full = M / 16 * 16, rest = M - full;
  const int64_t tail_r = rest == 0 ? 0 : rest <= 1 ? 1 : rest <= 2 ? 2 : rest <= 4 ? 4 : rest <= 8 ? 8 : 16;
  // x transposed per group of rows, padded with zero rows (their outputs go to spare rows, dropped)
  std::vector<float> xt((full + tail_r) * K, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const int64_t g = m < full ? m / 16 * 16 : full, R = m < full ? 16 : tail_r, r = m - g;
    for (int64_t k = 0; k < K; ++k) xt[g * K + k * R + r] = xp[m * K + k];
  }
  auto out = torch::empty({full + tail_r, N}, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, P, grain, [&](int64_t b, int64_t e) {
    panel_cols(xt.data(), M, panels.data_ptr<float>(), K, N, b, e, tail_r, op);
  });
  return out.narrow(0, 0, M);  // without the padded group's spare rows
}

// One decode step of Step attention for B rows, one new token each, from the fused projection
// qkvg [B, Hq*D + 2*Hkv*D + Hq] (q, k, v, gate): q/k RMSNorm, partial NeoX RoPE with the rows' tables
// cos, sin [B, rotary dims] (NeoX layout, halves repeated: one table per attention type and step, shared by
// its layers), the new k/v written to cache slot `slot`, attention over cache
// slots [0, S) whose key positions kpos [B, S] are visible from the query (causal, within `window` when
// > 0; a padding row with nothing visible sees everything, its output unused), the head-wise sigmoid
// gate. Returns [B, Hq*D]. Query head h reads KV head h / (Hq / Hkv). The (row, KV head) pairs split
// across ATen's threads.
torch::Tensor decode_attention(torch::Tensor qkvg, torch::Tensor q_scale, torch::Tensor k_scale,
                               torch::Tensor cos, torch::Tensor sin, torch::Tensor qpos, torch::Tensor k_cache,
                               torch::Tensor v_cache, int64_t slot, torch::Tensor kpos, int64_t window, int64_t Hq,
                               double eps, double scale) {
  const char* op = "decode_attention";
  check_f32(qkvg, op, "qkvg");
  check_f32(q_scale, op, "q_scale");
  check_f32(k_scale, op, "k_scale");
  check_f32(cos, op, "cos");
  check_f32(sin, op, "sin");
  check_f32(k_cache, op, "k_cache");
  check_f32(v_cache, op, "v_cache");
  TORCH_CHECK(kpos.dtype() == torch::kInt64 && kpos.dim() == 2 && kpos.stride(1) == 1 &&
                  qpos.dtype() == torch::kInt64 &&
                  qpos.is_contiguous(),
              op, ": kpos [B, S] and qpos [B] must be int64 with unit stride");
  AttentionStep a;
  a.B = qkvg.size(0);
  a.Hq = Hq;
  a.Hkv = k_cache.size(1);
  a.capacity = k_cache.size(2);
  a.D = k_cache.size(3);
  a.S = kpos.size(1);
  a.rot_dims = cos.numel() / std::max<int64_t>(a.B, 1);
  TORCH_CHECK(a.Hkv > 0 && Hq % a.Hkv == 0, op, ": ", Hq, " query heads do not group over ", a.Hkv, " KV heads");
  a.G = Hq / a.Hkv;
  a.width = qkvg.size(1);
  TORCH_CHECK(a.width == Hq * a.D + 2 * a.Hkv * a.D + Hq, op, ": qkvg width ", a.width, " does not match ", Hq,
              " query heads, ", a.Hkv, " KV heads of ", a.D);
  TORCH_CHECK(kpos.size(0) == a.B && qpos.numel() == a.B && a.S <= a.capacity && slot >= 0 && slot < a.capacity &&
                  k_cache.size(0) == a.B && v_cache.sizes() == k_cache.sizes() && a.rot_dims <= a.D &&
                  a.rot_dims % 2 == 0 &&
                  cos.numel() == a.B * a.rot_dims && sin.numel() == a.B * a.rot_dims,
              op, ": cache, positions, slot or rotary dims out of range");
  auto out = torch::empty({a.B, Hq * a.D}, qkvg.options());
  a.qkvg = qkvg.data_ptr<float>();
  a.q_scale = q_scale.data_ptr<float>();
  a.k_scale = k_scale.data_ptr<float>();
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.qpos = qpos.data_ptr<int64_t>();
  a.kpos = kpos.data_ptr<int64_t>();
  a.kpos_stride = kpos.stride(0);
  a.k_cache = k_cache.data_ptr<float>();
  a.v_cache = v_cache.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.slot = slot;
  a.window = window;
  a.eps = (float)eps;
  a.scale = (float)scale;
  // q [G, D], p [G, S], the mask [S], then S visibility bytes
  const int64_t work = a.G * a.D + a.G * a.S + a.S + (a.S + 3) / 4;
  at::parallel_for(0, a.B * a.Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(work);
    for (int64_t row_kv = lo; row_kv < hi; ++row_kv)
      attend(a, row_kv / a.Hkv, row_kv % a.Hkv, buf.data(), row_kv + 1 < hi ? row_kv + 1 : -1);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Attention over block tables (engine/serving/paged_attention.py): the serving core's flat step.
namespace {

// Attention of P (query token, head) pairs that share one KV head, over key rows reached through row
// pointers (the paged storage: a sequence's keys are scattered over its blocks). Pair i sees the slots
// [lo[i], hi[i]) of the S gathered ones (causal within its run, its window); the pairs go in passes of up
// to PAIRS_PER_PASS whose queries and outputs stay in registers while each key and value row is read once
// for all of them (as attend_heads, one mask per pair instead of one per pass).
template <int VECS_PER_HEAD>
ADVISOR_INLINE void attend_pairs(const float* const* q, const float* const* K, const float* const* V,
                                 const int64_t* lo, const int64_t* hi, const float* gate, int64_t P, int64_t S,
                                 float scale, float* p, float* const* out) {
  constexpr int PAIRS_PER_PASS = VECS_PER_HEAD >= 8 ? 3 : (24 / VECS_PER_HEAD > 8 ? 8 : 24 / VECS_PER_HEAD);
  constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
  for (int64_t p0 = 0; p0 < P; p0 += PAIRS_PER_PASS) {
    const int n = (int)std::min<int64_t>(PAIRS_PER_PASS, P - p0);
    int64_t s0 = S, s1 = 0;  // the slots any pair of this pass sees
    for (int i = 0; i < n; ++i) {
      s0 = std::min(s0, lo[p0 + i]);
      s1 = std::max(s1, hi[p0 + i]);
    }
    f32x16 acc[PAIRS_PER_PASS][VECS_PER_HEAD];
    for (int i = 0; i < PAIRS_PER_PASS; ++i)
      for (int d = 0; d < VECS_PER_HEAD; ++d) acc[i][d] = i < n ? load_f32x16(q[p0 + i] + 16 * d) : f32x16{};
    for (int64_t s = s0; s < s1; ++s) {
      const float* k_row = K[s];
      if (s + 4 < s1) __builtin_prefetch(K[s + 4], 0, 3);
      f32x16 key[VECS_PER_HEAD];
      for (int d = 0; d < VECS_PER_HEAD; ++d) key[d] = load_f32x16(k_row + 16 * d);
      for (int i = 0; i < PAIRS_PER_PASS; ++i) {
        if (i >= n) break;
        float* row = p + (p0 + i) * S;
        if (s < lo[p0 + i] || s >= hi[p0 + i]) {
          row[s] = NEG_INF;
          continue;
        }
        f32x16 t = acc[i][0] * key[0];
        for (int d = 1; d < VECS_PER_HEAD; ++d) t += acc[i][d] * key[d];
        row[s] = sum_lanes16(t) * scale;
      }
    }
    for (int i = 0; i < n; ++i)
      softmax_row(p + (p0 + i) * S + s0, s1 - s0, 1.f / (1.f + std::exp(-gate[p0 + i])));
    for (int i = 0; i < PAIRS_PER_PASS; ++i)
      for (int d = 0; d < VECS_PER_HEAD; ++d) acc[i][d] = f32x16{};
    for (int64_t s = s0; s < s1; ++s) {
      const float* v_row = V[s];
      if (s + 4 < s1) __builtin_prefetch(V[s + 4], 0, 3);
      f32x16 val[VECS_PER_HEAD];
      for (int d = 0; d < VECS_PER_HEAD; ++d) val[d] = load_f32x16(v_row + 16 * d);
      for (int i = 0; i < PAIRS_PER_PASS; ++i) {
        if (i >= n) break;
        const float w = p[(p0 + i) * S + s];
        for (int d = 0; d < VECS_PER_HEAD; ++d) acc[i][d] += w * val[d];
      }
    }
    for (int i = 0; i < n; ++i)
      for (int d = 0; d < VECS_PER_HEAD; ++d) store_f32x16(out[p0 + i] + 16 * d, acc[i][d]);
  }
}

// The same for any head size, one pair at a time.
ADVISOR_INLINE void attend_pairs_any(const float* const* q, const float* const* K, const float* const* V,
                                     const int64_t* lo, const int64_t* hi, const float* gate, int64_t P,
                                     int64_t S, int64_t D, float scale, float* p, float* const* out) {
  for (int64_t i = 0; i < P; ++i) {
    float* row = p + i * S;
    for (int64_t s = lo[i]; s < hi[i]; ++s) row[s] = dot(q[i], K[s], D) * scale;
    softmax_row(row + lo[i], hi[i] - lo[i], 1.f / (1.f + std::exp(-gate[i])));
    float* o = out[i];
    std::fill(o, o + D, 0.f);
    for (int64_t s = lo[i]; s < hi[i]; ++s) {
      const float w = row[s];
      const float* vs = V[s];
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) o[j] += w * vs[j];
    }
  }
}

struct PagedStep {
  const float *qkvg, *q_scale, *k_scale, *cos, *sin;
  const int64_t *tables, *cu_q, *start;
  float *k_cache, *v_cache, *q, *out;
  int64_t N, T, Hq, Hkv, G, D, rot_dims, width, table_width, block_size, window;
  float eps, scale;

  ADVISOR_INLINE int64_t row_of(int64_t seq, int64_t pos) const {
    return tables[seq * table_width + pos / block_size] * block_size + pos % block_size;
  }
  ADVISOR_INLINE int64_t first_seen(int64_t pos) const { return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; }
};

// Token t (of sequence `seq`, at position `pos`): q/k RMSNorm and RoPE, its key and value written to its
// cache row, its normed and rotated queries into a.q [T, Hq, D].
ADVISOR_CLONES
void paged_prepare(const PagedStep& a, int64_t t, int64_t seq, int64_t pos) {
  const int64_t D = a.D;
  const float* row = a.qkvg + t * a.width;
  const float *cos_row = a.cos + t * a.rot_dims, *sin_row = a.sin + t * a.rot_dims;
  const int64_t r = a.row_of(seq, pos);
  for (int64_t h = 0; h < a.Hkv; ++h) {
    float* k = a.k_cache + (r * a.Hkv + h) * D;
    norm_row(row + a.Hq * D + h * D, a.k_scale, a.eps, D, k);
    rope_head(k, cos_row, sin_row, a.rot_dims);
    const float* v = row + a.Hq * D + a.Hkv * D + h * D;
    std::copy(v, v + D, a.v_cache + (r * a.Hkv + h) * D);
  }
  for (int64_t h = 0; h < a.Hq; ++h) {
    float* q = a.q + (t * a.Hq + h) * D;
    norm_row(row + h * D, a.q_scale, a.eps, D, q);
    rope_head(q, cos_row, sin_row, a.rot_dims);
  }
}

// One task: query tokens [j0, j1) of sequence `seq` against KV head `kvh` (their G query heads each).
ADVISOR_CLONES
void paged_tile(const PagedStep& a, int64_t seq, int64_t j0, int64_t j1, int64_t kvh, std::vector<char>& work) {
  const int64_t G = a.G, D = a.D, t0 = a.cu_q[seq], p0 = a.start[seq];
  const int64_t lo_pos = a.first_seen(p0 + j0), S = p0 + j1 - lo_pos, P = (j1 - j0) * G;
  const size_t bytes = sizeof(float*) * (2 * S + 2 * P) + sizeof(int64_t) * 2 * P + sizeof(float) * (P + P * S);
  if (work.size() < bytes) work.resize(bytes);
  const float** K = reinterpret_cast<const float**>(work.data());
  const float** V = K + S;
  const float** q = V + S;
  float** out = const_cast<float**>(q + P);
  int64_t* lo = reinterpret_cast<int64_t*>(out + P);
  int64_t* hi = lo + P;
  float* gate = reinterpret_cast<float*>(hi + P);
  float* p = gate + P;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t r = a.row_of(seq, lo_pos + s);
    K[s] = a.k_cache + (r * a.Hkv + kvh) * D;
    V[s] = a.v_cache + (r * a.Hkv + kvh) * D;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t t = t0 + j, pos = p0 + j;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = (j - j0) * G + g, h = kvh * G + g;
      q[i] = a.q + (t * a.Hq + h) * D;
      out[i] = a.out + (t * a.Hq + h) * D;
      lo[i] = a.first_seen(pos) - lo_pos;
      hi[i] = pos + 1 - lo_pos;
      gate[i] = a.qkvg[t * a.width + a.Hq * D + 2 * a.Hkv * D + h];
    }
  }
  const float scale = a.scale;
  switch (D) {
    case 16: return attend_pairs<1>(q, K, V, lo, hi, gate, P, S, scale, p, out);
    case 32: return attend_pairs<2>(q, K, V, lo, hi, gate, P, S, scale, p, out);
    case 48: return attend_pairs<3>(q, K, V, lo, hi, gate, P, S, scale, p, out);
    case 64: return attend_pairs<4>(q, K, V, lo, hi, gate, P, S, scale, p, out);
    case 96: return attend_pairs<6>(q, K, V, lo, hi, gate, P, S, scale, p, out);
    case 128: return attend_pairs<8>(q, K, V, lo, hi, gate, P, S, scale, p, out);
    default: return attend_pairs_any(q, K, V, lo, hi, gate, P, S, D, scale, p, out);
  }
}

}  // namespace

// Step attention for one serving step over a paged KV cache. The step's T tokens are one flat row:
// sequence i owns tokens [cu_q[i], cu_q[i+1]), a run of consecutive positions start[i], start[i] + 1, ...
// (one token for a decode, several for a prefill chunk or a speculative verify). From the fused projection
// qkvg [T, Hq*D + 2*Hkv*D + Hq] (q, k, v, gate): q/k RMSNorm, partial NeoX RoPE with the tokens' tables
// cos, sin [T, rotary dims], every new key and value written to its row of k_cache, v_cache
// [num_blocks * block_size, Hkv, D] (position p of sequence i at row tables[i, p / block_size] *
// block_size + p % block_size; tables [N, width] int64, -1 where no block), then each token attends over
// its sequence's positions [0, p] (full attention, window <= 0) or (p - window, p] (sliding), which
// includes the run's own earlier tokens (causal within the run), and the head-wise sigmoid gate.
// Returns [T, Hq*D]. GQA: query head h reads KV head h / (Hq / Hkv). Every block a token reads or writes is
// checked to be in the pool before anything runs. Two phases across ATen's threads: the writes (per
// token), then the attention, per (sequence, run of up to 16 tokens, KV head).
torch::Tensor paged_attention(torch::Tensor qkvg, torch::Tensor q_scale, torch::Tensor k_scale, torch::Tensor cos,
                              torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                              torch::Tensor cu_q, torch::Tensor start, int64_t block_size, int64_t window,
                              int64_t Hq, double eps, double scale) {
  const char* op = "paged_attention";
  check_f32(qkvg, op, "qkvg");
  check_f32(q_scale, op, "q_scale");
  check_f32(k_scale, op, "k_scale");
  check_f32(cos, op, "cos");
  check_f32(sin, op, "sin");
  check_f32(k_cache, op, "k_cache");
  check_f32(v_cache, op, "v_cache");
  TORCH_CHECK(tables.dtype() == torch::kInt64 && tables.dim() == 2 && tables.is_contiguous() &&
                  cu_q.dtype() == torch::kInt64 && cu_q.is_contiguous() && start.dtype() == torch::kInt64 &&
                  start.is_contiguous(),
              op, ": tables [N, width], cu_q [N + 1] and start [N] must be contiguous int64");
  TORCH_CHECK(qkvg.dim() == 2 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && block_size > 0 &&
                  k_cache.size(0) % block_size == 0,
              op, ": qkvg [T, width] and caches [num_blocks * block_size, Hkv, D] expected");
  PagedStep a;
  a.T = qkvg.size(0);
  a.N = tables.size(0);
  a.table_width = tables.size(1);
  a.Hq = Hq;
  a.Hkv = k_cache.size(1);
  a.D = k_cache.size(2);
  TORCH_CHECK(a.Hkv > 0 && Hq % a.Hkv == 0, op, ": ", Hq, " query heads do not group over ", a.Hkv, " KV heads");
  a.G = Hq / a.Hkv;
  a.width = qkvg.size(1);
  TORCH_CHECK(a.width == Hq * a.D + 2 * a.Hkv * a.D + Hq, op, ": qkvg width ", a.width, " does not match ", Hq,
              " query heads, ", a.Hkv, " KV heads of ", a.D);
  a.rot_dims = a.T > 0 ? cos.numel() / a.T : 0;
  TORCH_CHECK(cos.numel() == a.T * a.rot_dims && sin.numel() == cos.numel() && a.rot_dims <= a.D &&
                  a.rot_dims % 2 == 0 && q_scale.numel() == a.D && k_scale.numel() == a.D,
              op, ": rotary tables or norm scales do not match ", a.T, " tokens of head size ", a.D);
  TORCH_CHECK(cu_q.numel() == a.N + 1 && start.numel() == a.N, op, ": cu_q needs N + 1 and start N entries for ",
              a.N, " sequences");
  a.tables = tables.data_ptr<int64_t>();
  a.cu_q = cu_q.data_ptr<int64_t>();
  a.start = start.data_ptr<int64_t>();
  a.block_size = block_size;
  a.window = window;
  const int64_t num_blocks = k_cache.size(0) / block_size;
  TORCH_CHECK(a.N == 0 ? a.T == 0 : (a.cu_q[0] == 0 && a.cu_q[a.N] == a.T), op, ": cu_q must run from 0 to ", a.T);
  std::vector<int64_t> seq_of(a.T);
  std::vector<std::array<int64_t, 3>> tiles;  // (sequence, first token, end token) of each attention task
  constexpr int64_t TILE = 16;
  for (int64_t i = 0; i < a.N; ++i) {
    const int64_t n = a.cu_q[i + 1] - a.cu_q[i], p0 = a.start[i];
    TORCH_CHECK(n >= 0 && p0 >= 0, op, ": sequence ", i, " has a negative run or start");
    if (n == 0) continue;
    TORCH_CHECK((p0 + n - 1) / block_size < a.table_width, op, ": sequence ", i, "'s positions up to ", p0 + n - 1,
                " run past its block table (", a.table_width, " blocks of ", block_size, ")");
    for (int64_t b = a.first_seen(p0) / block_size; b <= (p0 + n - 1) / block_size; ++b) {
      const int64_t id = a.tables[i * a.table_width + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, op, ": sequence ", i, " reads block ", b, " of its table, id ", id,
                  ", not in the pool of ", num_blocks, " (freed or never allocated)");
    }
    for (int64_t t = a.cu_q[i]; t < a.cu_q[i + 1]; ++t) seq_of[t] = i;
    for (int64_t j = 0; j < n; j += TILE) tiles.push_back({i, j, std::min(n, j + TILE)});
  }
  auto out = torch::empty({a.T, Hq * a.D}, qkvg.options());
  auto q = torch::empty({a.T, Hq * a.D}, qkvg.options());
  a.qkvg = qkvg.data_ptr<float>();
  a.q_scale = q_scale.data_ptr<float>();
  a.k_scale = k_scale.data_ptr<float>();
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.k_cache = k_cache.data_ptr<float>();
  a.v_cache = v_cache.data_ptr<float>();
  a.q = q.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.eps = (float)eps;
  a.scale = (float)scale;
  at::parallel_for(0, a.T, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t i = seq_of[t];
      paged_prepare(a, t, i, a.start[i] + t - a.cu_q[i]);
    }
  });
  const int64_t n_tasks = (int64_t)tiles.size() * a.Hkv;
  at::parallel_for(0, n_tasks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<char> work;
    for (int64_t k = lo; k < hi; ++k) {
      const auto& tile = tiles[k / a.Hkv];
      paged_tile(a, tile[0], tile[1], tile[2], k % a.Hkv, work);
    }
  });
  return out;
}

// Routed experts for the (token, slot) pairs in ids [T, k] with routing weights [T, k], plus, when given,
// the shared expert (weight 1) on every token: out = sum over slots + shared. Experts and the shared one
// split across ATen's threads (taken one at a time); each token's pairs are summed in expert order.
torch::Tensor decode_experts(torch::Tensor x, torch::Tensor gate_up, torch::Tensor down, torch::Tensor weights,
                             torch::Tensor ids, double limit, c10::optional<torch::Tensor> shared_gate_up,
                             c10::optional<torch::Tensor> shared_down, double shared_limit) {
  const char* op = "decode_experts";
  check_f32(x, op, "x");
  check_f32(gate_up, op, "gate_up");
  check_f32(down, op, "down");
  // K-major [E, H, 2I] and [E, I, H], or blocked [E, H/16, 2I/16, 16, 16] and [E, I/16, H/16, 16, 16]
  const bool blocked = gate_up.dim() == 5;
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1), E = gate_up.size(0);
  const int64_t I = blocked ? gate_up.size(2) * 8 : gate_up.size(2) / 2;
  const auto want_gate_up =
      blocked ? std::vector<int64_t>{E, H / 16, I / 8, 16, 16} : std::vector<int64_t>{E, H, 2 * I};
  const auto want_down = blocked ? std::vector<int64_t>{E, I / 16, H / 16, 16, 16} : std::vector<int64_t>{E, I, H};
  TORCH_CHECK(gate_up.sizes() == want_gate_up && down.sizes() == want_down &&
                  (!blocked || (H % 16 == 0 && I % 16 == 0)) &&
                  ids.dim() == 2 && ids.size(0) == T && weights.sizes() == ids.sizes(),
              op, ": expert weights ", gate_up.sizes(), " and ", down.sizes(),
              ", ids or routing weights do not match x ",
              x.sizes());
  const bool has_shared = shared_gate_up.has_value();
  int64_t shared_I = 0;
  if (has_shared) {
    check_f32(*shared_gate_up, op, "shared gate_up");
    check_f32(*shared_down, op, "shared down");
    shared_I = shared_gate_up->size(1) / 2;
  }
  auto weights_f32 = weights.to(torch::kFloat32).contiguous();
  auto ids_i64 = ids.to(torch::kInt64).contiguous();
  // A long input (a static batch's prefill) in slices of 1024 tokens: a slice's pair outputs are 16 MiB at H 512
  // and top-8, where the whole input's could be hundreds, held by the buffer below. A token's sums do not
  // depend on the slicing.
  constexpr int64_t kSlice = 1024;
  if (T > kSlice) {
    auto out = torch::empty_like(x);
    for (int64_t b = 0; b < T; b += kSlice) {
      const int64_t len = std::min(kSlice, T - b);
      out.narrow(0, b, len)
          .copy_(decode_experts(x.narrow(0, b, len), gate_up, down, weights_f32.narrow(0, b, len),
                                ids_i64.narrow(0, b, len), limit, shared_gate_up, shared_down, shared_limit));
    }
    return out;
  }
  const int64_t n = T * k;
  const int64_t* expert_of = ids_i64.data_ptr<int64_t>();
  for (int64_t p = 0; p < n; ++p)
    TORCH_CHECK(expert_of[p] >= 0 && expert_of[p] < E, op, ": expert id ", expert_of[p], " out of range");
  std::vector<int64_t> count(E + 1, 0), rows(n);
  std::vector<float> pair_weight(n);
  for (int64_t p = 0; p < n; ++p) count[expert_of[p] + 1]++;
  for (int64_t i = 0; i < E; ++i) count[i + 1] += count[i];
  std::vector<int64_t> next_slot(count.begin(), count.end() - 1);
  for (int64_t p = 0; p < n; ++p) {
    const int64_t s = next_slot[expert_of[p]]++;
    rows[s] = p / k;
    pair_weight[s] = weights_f32.data_ptr<float>()[p];
  }
  // Tasks of at most 64 rows (an expert's tokens, or a range of all tokens for the shared expert), taken one at a
  // time from a shared counter: experts differ in tokens, and a long prefill's shared expert (every token) would
  // otherwise be one task as long as several threads' share. The shared expert's first: the most rows.
  constexpr int64_t kRows = 64;
  struct Task {
    int64_t expert, begin, end;  // expert -1: the shared one; rows [begin, end) of its sorted pairs (or tokens)
  };
  std::vector<Task> tasks;
  if (has_shared)
    for (int64_t b = 0; b < T; b += kRows) tasks.push_back({-1, b, std::min(T, b + kRows)});
  for (int64_t i = 0; i < E; ++i)
    for (int64_t b = count[i]; b < count[i + 1]; b += kRows) tasks.push_back({i, b, std::min(count[i + 1], b + kRows)});
  std::vector<int64_t> all_rows(T);
  std::vector<float> ones(T, 1.f);
  for (int64_t t = 0; t < T; ++t) all_rows[t] = t;
  // The pairs' outputs in a buffer kept by the calling thread: a long prefill's are megabytes, which a fresh
  // allocation would map (and fault in) anew at every layer.
  thread_local std::vector<float> pair_buf;
  pair_buf.resize(std::max<size_t>(pair_buf.size(), (size_t)((n + (has_shared ? T : 0)) * H)));
  float* pair_out_p = pair_buf.data();
  float* shared_y = pair_out_p + n * H;
  const float *xp = x.data_ptr<float>(), *gate_up_p = gate_up.data_ptr<float>(), *down_p = down.data_ptr<float>();
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = (int64_t)tasks.size();
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> inter;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_tasks;) {
      const Task& task = tasks[i];
      const int64_t b = task.begin, c = task.end - b;
      if (task.expert < 0) {
        inter.resize(c * 2 * shared_I);
        expert(xp, all_rows.data() + b, ones.data(), c, shared_gate_up->data_ptr<float>(),
               shared_down->data_ptr<float>(), false, (float)shared_limit, H, shared_I, inter.data(), shared_y + b * H);
        continue;
      }
      inter.resize(c * 2 * I);
      expert(xp, rows.data() + b, pair_weight.data() + b, c, gate_up_p + task.expert * H * 2 * I,
             down_p + task.expert * I * H, blocked, (float)limit, H, I, inter.data(), pair_out_p + b * H);
    }
  });
  // Each token's pairs summed in expert order (its slots in ascending order), then the shared expert: the same
  // sums whichever tokens share the call. Tokens split across threads.
  std::vector<int64_t> slot_of(n);
  {
    std::vector<int64_t> filled(T, 0);
    for (int64_t s = 0; s < n; ++s) slot_of[rows[s] * k + filled[rows[s]]++] = s;  // s ascending per token
  }
  auto out = torch::empty_like(x);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      float* out_row = o + t * H;
      std::fill(out_row, out_row + H, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float* y = pair_out_p + slot_of[t * k + j] * H;
        for (int64_t d = 0; d < H; ++d) out_row[d] += y[d];
      }
      if (has_shared)
        for (int64_t d = 0; d < H; ++d) out_row[d] += shared_y[t * H + d];
    }
  });
  return out;
}

// The Step router for a few tokens: sigmoid scores in fp32, top-k of (score + bias) chosen, the chosen
// scores renormalised and multiplied by `scale`. Returns (weights [T, k], ids [T, k]), ids in descending
// order of score + bias (ties: the lower expert id first). Tokens split across ATen's threads.
std::vector<torch::Tensor> route(torch::Tensor x, torch::Tensor w, torch::Tensor bias, int64_t k, double scale) {
  const char* op = "route";
  check_f32(x, op, "x");
  check_f32(w, op, "router weight");
  check_f32(bias, op, "router bias");
  const int64_t T = x.size(0), H = x.size(1), E = w.size(0);
  TORCH_CHECK(w.size(1) == H && bias.numel() == E && k <= E, op, ": shapes do not match");
  auto weights = torch::empty({T, k}, x.options());
  auto ids = torch::empty({T, k}, x.options().dtype(torch::kInt64));
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float* wo = weights.data_ptr<float>();
  int64_t* io = ids.data_ptr<int64_t>();
  at::parallel_for(0, T, 4, [&](int64_t lo, int64_t hi) {
    route_rows(xp, wp, bp, H, E, k, (float)scale, lo, hi, wo, io);
  });
  return {weights, ids};
}

// A MoE block for a few tokens in one call: `route`, then `decode_experts` (routed and shared experts).
torch::Tensor decode_moe(torch::Tensor x, torch::Tensor router, torch::Tensor bias, int64_t k, double scale,
                         torch::Tensor gate_up, torch::Tensor down, double limit, torch::Tensor shared_gate_up,
                         torch::Tensor shared_down, double shared_limit) {
  auto r = route(x, router, bias, k, scale);
  return decode_experts(x, gate_up, down, r[0], r[1], limit, shared_gate_up, shared_down, shared_limit);
}

// ---------------------------------------------------------------------------------------------- quantized
// One matrix (or expert e of many) of the engine's quantized layout, checked against its shapes.
QMat qmat(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& s2, int64_t fmt, int64_t group,
          int64_t N, int64_t e, const char* op) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2, op, ": unknown format id ", fmt);
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.device().is_cpu() &&
                  (codes.dim() == 3 || codes.dim() == 4),
              op, ": codes must be contiguous uint8 [(E,) P, K, B] on the CPU");
  const bool many = codes.dim() == 4;
  const int64_t P = codes.size(-3), K = codes.size(-2), B = codes.size(-1), Np = P * 16;
  TORCH_CHECK(B == (fmt == 0 ? 16 : 8) && (N + 15) / 16 == P && group % 16 == 0, op, ": codes ", codes.sizes(),
              " do not hold ", N, " outputs in format ", fmt, " with groups of ", group);
  TORCH_CHECK(scales.is_contiguous() && scales.dtype() == (fmt == 2 ? torch::kUInt8 : torch::kFloat32) &&
                  scales.size(-1) == Np && scales.size(-2) == (K + group - 1) / group,
              op, ": scales ", scales.sizes(), " do not match codes ", codes.sizes());
  const int64_t E = many ? codes.size(0) : 1;
  TORCH_CHECK(e >= 0 && e < E, op, ": expert ", e, " out of range");
  if (fmt == 2) check_f32(s2, op, "scale_2");
  QMat q;
  q.P = P;
  q.K = K;
  q.group = group;
  q.Np = Np;
  q.N = N;
  q.codes = codes.data_ptr<uint8_t>() + e * P * K * B;
  q.scales = static_cast<const char*>(scales.data_ptr()) + e * scales.size(-2) * Np * scales.element_size();
  q.s2 = fmt == 2 ? s2.data_ptr<float>() + e * Np : nullptr;
  return q;
}

// x [M, K] @ W -> [M, N] with W quantized (see QMat); panels split across ATen's threads.
torch::Tensor qlinear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor s2, int64_t fmt,
                      int64_t group, int64_t N) {
  check_f32(x, "qlinear", "x");
  const QMat q = qmat(codes, scales, s2, fmt, group, N, 0, "qlinear");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == q.K, "qlinear: x ", x.sizes(), " does not match ", q.K, " inputs");
  const int64_t M = x.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t B = fmt == 0 ? 16 : 8;
  at::parallel_for(0, q.P, std::max<int64_t>(1, (1 << 15) / (q.K * B)), [&](int64_t b, int64_t e) {
    qgemm((int)fmt, xp, nullptr, M, q.K, q, b, e, op);
  });
  return out;
}

// 0: the best kernels this CPU has (AVX2 + FMA where present); 1: the generic loops. Returns the kernels the 4-bit
// formats then run ("avx2" or "generic"; the fp32 experts and panel_linear follow the same switch). For the tests
// and benchmarks: both against one reference.
std::string set_qkernels(int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "set_qkernels: mode 0 (best) or 1 (generic), got ", mode);
  g_qkernel_mode.store((int)mode);
  QMat probe{};
  probe.K = 16;
  probe.group = 16;
  return use_avx2_q4(1, probe) ? "avx2" : "generic";
}

// Which kernel the fp32 experts run now: "avx2" (f32gemm_avx2, any number of tokens per expert) or "generic".
std::string experts_kernel() {
#if ADVISOR_X86_KERNELS
  if (use_avx2_f32()) return "avx2";
#endif
  return "generic";
}

// Expert e's (or the matrix's) weight dequantized K-major into out [K, N] (fp32, contiguous).
void qdequant(torch::Tensor codes, torch::Tensor scales, torch::Tensor s2, int64_t fmt, int64_t group, int64_t N,
              torch::Tensor out) {
  const QMat q = qmat(codes, scales, s2, fmt, group, N, 0, "qdequant");
  check_f32(out, "qdequant", "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == q.K && out.size(1) == N, "qdequant: out ", out.sizes(),
              " is not [", q.K, ", ", N, "]");
  float* op = out.data_ptr<float>();
  at::parallel_for(0, q.P, 4, [&](int64_t b, int64_t e) { qdequant_panels((int)fmt, q, b, e, op); });
}

// A MoE block's routed experts for a few tokens with quantized expert weights (gate_up [E, 2I, H] and
// down [E, H, I] in the engine layout): the router, then each selected expert's weights read once, in
// place, for all its tokens (experts taken one at a time by ATen's threads); the shared expert is the
// caller's (its own projections).
torch::Tensor decode_moe_q(torch::Tensor x, torch::Tensor router, torch::Tensor bias, int64_t k, double scale,
                           torch::Tensor gu_codes, torch::Tensor gu_scales, torch::Tensor gu_s2, torch::Tensor dn_codes,
                           torch::Tensor dn_scales, torch::Tensor dn_s2, int64_t fmt, int64_t gu_group,
                           int64_t dn_group, int64_t I, double limit) {
  const char* op = "decode_moe_q";
  check_f32(x, op, "x");
  auto r = route(x, router, bias, k, scale);
  const int64_t T = x.size(0), H = x.size(1), E = gu_codes.size(0), n = T * k;
  TORCH_CHECK(gu_codes.dim() == 4 && dn_codes.dim() == 4 && dn_codes.size(0) == E && gu_codes.size(2) == H &&
                  dn_codes.size(2) == I,
              op, ": expert codes ", gu_codes.sizes(), " and ", dn_codes.sizes(), " do not match x ", x.sizes(),
              " and ", I, " intermediate");
  qmat(gu_codes, gu_scales, gu_s2, fmt, gu_group, 2 * I, 0, op);  // shape checks once
  qmat(dn_codes, dn_scales, dn_s2, fmt, dn_group, H, 0, op);
  const float* wt = r[0].data_ptr<float>();
  const int64_t* e = r[1].data_ptr<int64_t>();
  std::vector<int64_t> count(E + 1, 0), rows(n);
  std::vector<float> pw(n);
  for (int64_t p = 0; p < n; ++p) count[e[p] + 1]++;
  for (int64_t i = 0; i < E; ++i) count[i + 1] += count[i];
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t p = 0; p < n; ++p) {
    const int64_t s = fill[e[p]]++;
    rows[s] = p / k;
    pw[s] = wt[p];
  }
  std::vector<int64_t> tasks;
  for (int64_t i = 0; i < E; ++i)
    if (count[i + 1] > count[i]) tasks.push_back(i);
  auto ys = torch::empty({n, H}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = ys.data_ptr<float>();
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = (int64_t)tasks.size();
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> h;
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n_tasks;) {
      const int64_t ex = tasks[t], s = count[ex], c = count[ex + 1] - s;
      const QMat gu = qmat(gu_codes, gu_scales, gu_s2, fmt, gu_group, 2 * I, ex, op);
      const QMat dn = qmat(dn_codes, dn_scales, dn_s2, fmt, dn_group, H, ex, op);
      h.resize(c * 2 * I);
      qexpert((int)fmt, xp, rows.data() + s, pw.data() + s, c, gu, dn, (float)limit, H, I, h.data(), yp + s * H);
    }
  });
  auto out = torch::zeros_like(x);
  float* o = out.data_ptr<float>();
  for (int64_t s = 0; s < n; ++s) {
    float* orow = o + rows[s] * H;
    const float* y = yp + s * H;
    for (int64_t j = 0; j < H; ++j) orow[j] += y[j];
  }
  return out;
}


namespace {

// x [M, K] @ panels into out [M, N] (rows of stride N), the same kernels as panel_linear, no allocation.
void panel_into(const float* x, int64_t M, int64_t K, const float* panels, int64_t N, float* out) {
#if ADVISOR_X86_KERNELS
  if (use_avx2_f32()) return panel_cols_into(x, M, K, panels, N, out);
#endif
  auto xt = torch::from_blob(const_cast<float*>(x), {M, K}, torch::kFloat32);
  auto w = torch::from_blob(const_cast<float*>(panels), {(N + 15) / 16, K, 16}, torch::kFloat32);
  const auto y = panel_linear(xt, w, N);
  std::copy(y.data_ptr<float>(), y.data_ptr<float>() + M * N, out);
}

// What one MTP layer needs besides its weights: the embedding, RoPE, the paged KV and its tables.
struct MtpCtx {
  const float* embed;
  int64_t V, H;
  torch::Tensor inv_freq, k_cache, v_cache, tables;
  int64_t block_size, window, Hq, inter;
  float eps, scale, limit;
};

void check_mtp_weights(const std::vector<torch::Tensor>& w, int64_t H, int64_t V, const char* op) {
  TORCH_CHECK(w.size() == 13, op, ": 13 weights expected, got ", w.size());
  for (const auto& t : w) check_f32(t, op, "an MTP weight");
  TORCH_CHECK(w[2].dim() == 3 && w[2].size(0) == (H + 15) / 16 && w[2].size(1) == 2 * H, op,
              ": eh_proj must be in column panels [H/16, 2H, 16]");
  TORCH_CHECK(w[12].dim() == 3 && w[12].size(0) == (V + 15) / 16 && w[12].size(1) == H, op,
              ": the head must be in column panels [V/16, H, 16]");
}

// One MTP layer over the flat tokens ids [T] with their hidden rows [T, H] (sequence i owning the flat tokens
// [cu[i], cu[i+1]) at positions start[i], start[i] + 1, ...): returns its stream [T, H] and, for the flat
// rows `last`, the head's logits [len(last), V] (written to `logits` when it is defined).
torch::Tensor mtp_forward(const MtpCtx& c, const std::vector<torch::Tensor>& w, const int64_t* ids, const float* hidden,
                          int64_t T, const std::vector<int64_t>& cu, const std::vector<int64_t>& start,
                          int64_t rope_offset, const std::vector<int64_t>& last, float* logits) {
  const int64_t H = c.H, V = c.V, Hkv = c.k_cache.size(1), D = c.k_cache.size(2);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  // cat[enorm(embed(ids)), hnorm(hidden)] in one buffer, then eh_proj
  std::vector<float> xin(T * 2 * H);
  for (int64_t t = 0; t < T; ++t) {
    norm_row(c.embed + ids[t] * H, w[0].data_ptr<float>(), c.eps, H, xin.data() + t * 2 * H);
    norm_row(hidden + t * H, w[1].data_ptr<float>(), c.eps, H, xin.data() + t * 2 * H + H);
  }
  auto x = torch::empty({T, H}, opts);
  panel_into(xin.data(), T, 2 * H, w[2].data_ptr<float>(), H, x.data_ptr<float>());
  // RoPE tables at the tokens' positions (advisor.engine.model.layers.rope_cos_sin: the angles in fp32, halves repeated)
  const int64_t F = c.inv_freq.numel();
  auto cos = torch::empty({T, 2 * F}, opts), sin = torch::empty({T, 2 * F}, opts);
  {
    const float* f = c.inv_freq.data_ptr<float>();
    float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    for (size_t i = 0; i + 1 < cu.size(); ++i) {
      for (int64_t t = cu[i]; t < cu[i + 1]; ++t) {
        const float pos = (float)std::max<int64_t>(0, start[i] + (t - cu[i]) + rope_offset);
        for (int64_t j = 0; j < F; ++j) {
          const float a = pos * f[j];
          cp[t * 2 * F + j] = cp[t * 2 * F + F + j] = std::cos(a);
          sp[t * 2 * F + j] = sp[t * 2 * F + F + j] = std::sin(a);
        }
      }
    }
  }
  const auto cu_t = torch::tensor(cu, torch::kInt64), start_t = torch::tensor(start, torch::kInt64);
  const auto qkvg = panel_linear(rms_norm(x, {}, w[3], c.eps)[1], w[4], c.Hq * D + 2 * Hkv * D + c.Hq);
  const auto att = paged_attention(qkvg, w[5], w[6], cos, sin, c.k_cache, c.v_cache, c.tables, cu_t, start_t,
                                   c.block_size, c.window, c.Hq, c.eps, c.scale);
  const auto mid = rms_norm(panel_linear(att, w[7], H), x, w[8], c.eps);  // {x + attention, its norm}
  const int64_t I = c.inter;
  std::vector<float> gu(T * 2 * I), act(T * I);
  panel_into(mid[1].data_ptr<float>(), T, H, w[9].data_ptr<float>(), 2 * I, gu.data());
  for (int64_t t = 0; t < T; ++t) {
    swiglu_row(gu.data() + t * 2 * I, I, c.limit, 1.f);
    std::copy(gu.data() + t * 2 * I, gu.data() + t * 2 * I + I, act.data() + t * I);
  }
  auto stream = torch::empty({T, H}, opts);
  float* sp = stream.data_ptr<float>();
  panel_into(act.data(), T, I, w[10].data_ptr<float>(), H, sp);
  const float* res = mid[0].data_ptr<float>();
  for (int64_t i = 0; i < T * H; ++i) sp[i] += res[i];
  if (logits != nullptr && !last.empty()) {
    const int64_t L = last.size();
    std::vector<float> hn(L * H);
    for (int64_t r = 0; r < L; ++r) norm_row(sp + last[r] * H, w[11].data_ptr<float>(), c.eps, H, hn.data() + r * H);
    panel_into(hn.data(), L, H, w[12].data_ptr<float>(), V, logits);
  }
  return stream;
}

int64_t argmax_row(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

MtpCtx mtp_ctx(const torch::Tensor& embed, const torch::Tensor& inv_freq, const torch::Tensor& k_cache,
               const torch::Tensor& v_cache, const torch::Tensor& tables, int64_t block_size, int64_t window,
               int64_t Hq, int64_t inter, double eps, double scale, double limit, const char* op) {
  check_f32(embed, op, "embed");
  check_f32(inv_freq, op, "inv_freq");
  TORCH_CHECK(embed.dim() == 2, op, ": embed [V, H] expected");
  TORCH_CHECK(k_cache.dim() == 3, op, ": caches [num_blocks * block_size, Hkv, D] expected");
  return MtpCtx{embed.data_ptr<float>(), embed.size(0), embed.size(1), inv_freq, k_cache, v_cache, tables,
                block_size, window, Hq, inter, (float)eps, (float)scale, (float)limit};
}

}  // namespace

// One MTP layer (engine/model/mtp.py) on a serving step's flat tokens over block tables, in one call:
// x = eh_proj(cat[enorm(embed[ids]), hnorm(hidden)]), its decoder block (dense clamped SwiGLU MLP; the
// attention is paged_attention's, sequence i owning the flat tokens [cu[i], cu[i+1]) at positions start[i],
// start[i] + 1, ...), and for the flat rows `last` the layer's head, head(head_norm(stream)). RoPE turns
// position p by p + rope_offset (the position of the token the layer embeds). A drafting round is a few
// tokens per sequence, so the Python glue between a dozen ops cost more than their maths; here it is one
// call. w: enorm, hnorm (norm scales, 1 + w), eh_proj panels [H/16, 2H, 16], input_norm, qkvg panels,
// q_norm, k_norm, o panels, post_attn_norm, gate_up panels (2 * inter outputs), down panels, head_norm,
// head panels [V/16, H, 16]. Returns {stream [T, H], logits [len(last), V], their argmax [len(last)]}.
std::vector<torch::Tensor> mtp_layer(torch::Tensor ids, torch::Tensor hidden, torch::Tensor embed,
                                     std::vector<torch::Tensor> w, torch::Tensor inv_freq, int64_t rope_offset,
                                     torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                                     std::vector<int64_t> cu, std::vector<int64_t> start, std::vector<int64_t> last,
                                     int64_t block_size, int64_t window, int64_t Hq, int64_t inter, double eps,
                                     double scale, double limit) {
  const char* op = "mtp_layer";
  const MtpCtx c = mtp_ctx(embed, inv_freq, k_cache, v_cache, tables, block_size, window, Hq, inter, eps, scale,
                           limit, op);
  check_mtp_weights(w, c.H, c.V, op);
  check_f32(hidden, op, "hidden");
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == c.H, op, ": hidden [T, H] and embed [V, H] expected");
  const int64_t T = hidden.size(0), V = c.V;
  TORCH_CHECK(ids.dtype() == torch::kInt64 && ids.dim() == 1 && ids.numel() == T, op, ": ids must be ", T,
              " int64 token ids");
  TORCH_CHECK(cu.size() == start.size() + 1 && cu.front() == 0 && cu.back() == T, op, ": cu must run from 0 to ",
              T, " with one more entry than start");
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ip[t] >= 0 && ip[t] < V, op, ": token id ", ip[t], " out of range [0, ", V, ")");
  for (int64_t r : last) TORCH_CHECK(r >= 0 && r < T, op, ": head row ", r, " not among the ", T, " tokens");
  auto logits = torch::empty({(int64_t)last.size(), V}, hidden.options());
  auto picks = torch::empty({(int64_t)last.size()}, torch::kInt64);
  const auto stream =
      mtp_forward(c, w, ip, hidden.data_ptr<float>(), T, cu, start, rope_offset, last, logits.data_ptr<float>());
  for (size_t r = 0; r < last.size(); ++r) picks.data_ptr<int64_t>()[r] = argmax_row(logits.data_ptr<float>() + r * V, V);
  return {stream, logits, picks};
}

// A greedy drafting round of the chained MTP layers for N sequences in one call (advisor.engine.serving.speculation,
// PagedDrafter.draft's rule, which this follows step for step). Sequence i is in decode with m[i] computed
// positions and drafts caps[i] tokens; firm[i][j-1] is layer j's firm end (j = 1..caps[i]), carry[i][j-1]
// layer j's carried input rows (positions [firm_j, firm_{j-1}), for layer 1 [firm_1, m)), tokens[i] its
// tokens from position tok_from[i] to m[i]. Layer j computes positions [firm_j, m) of every sequence with
// caps >= j, reading x_{p+j} (a draft past m) and layer j-1's input carried plus its stream of this round,
// and drafts the argmax of its head at the last one. All layers share one attention type: `tables` [N, width]
// and `window`. Returns, per sequence, (drafts, the new firm ends [m, firm_1, ..], the new carries).
std::tuple<std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>,
           std::vector<std::vector<torch::Tensor>>>
mtp_draft(torch::Tensor embed, std::vector<std::vector<torch::Tensor>> layers, std::vector<torch::Tensor> inv_freqs,
          std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches, torch::Tensor tables,
          std::vector<int64_t> m, std::vector<int64_t> caps, std::vector<std::vector<int64_t>> firm,
          std::vector<std::vector<int64_t>> tokens, std::vector<int64_t> tok_from,
          std::vector<std::vector<torch::Tensor>> carry, int64_t block_size, int64_t window, int64_t Hq,
          int64_t inter, double eps, double scale, double limit) {
  const char* op = "mtp_draft";
  const int64_t N = m.size(), K = layers.size();
  TORCH_CHECK(caps.size() == (size_t)N && firm.size() == (size_t)N && tokens.size() == (size_t)N &&
                  tok_from.size() == (size_t)N && carry.size() == (size_t)N && tables.dim() == 2 &&
                  tables.size(0) == N,
              op, ": one entry per sequence expected in every per-sequence argument");
  TORCH_CHECK(inv_freqs.size() == (size_t)K && k_caches.size() == (size_t)K && v_caches.size() == (size_t)K, op,
              ": one RoPE table and cache per layer expected");
  int64_t kmax = 0;
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(caps[i] >= 0 && caps[i] <= K && (int64_t)firm[i].size() >= caps[i] &&
                    (int64_t)carry[i].size() >= caps[i] && tok_from[i] >= 0 &&
                    (int64_t)tokens[i].size() == m[i] + 1 - tok_from[i],
                op, ": sequence ", i, "'s cap, firm ends, carries or tokens do not match");
    kmax = std::max(kmax, caps[i]);
  }
  std::vector<MtpCtx> ctx;
  for (int64_t j = 0; j < K; ++j) {
    ctx.push_back(mtp_ctx(embed, inv_freqs[j], k_caches[j], v_caches[j], tables, block_size, window, Hq, inter, eps,
                          scale, limit, op));
    check_mtp_weights(layers[j], ctx[j].H, ctx[j].V, op);
  }
  const int64_t H = embed.size(1), V = embed.size(0);
  std::vector<std::vector<int64_t>> drafts(N), new_firm(N);
  std::vector<std::vector<torch::Tensor>> new_carry(N);
  std::vector<torch::Tensor> prev(N);  // layer j-1's stream this round, positions [its old firm, m)
  for (int64_t i = 0; i < N; ++i) new_firm[i].push_back(m[i]);
  std::vector<float> logits;
  for (int64_t j = 1; j <= kmax; ++j) {
    std::vector<int64_t> ids, cu{0}, start, last, group;
    std::vector<float> hid;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t lo = caps[i] >= j ? firm[i][j - 1] : m[i];
      const int64_t n = m[i] - lo;
      start.push_back(lo);
      if (caps[i] < j) {
        cu.push_back(cu.back());
        continue;
      }
      TORCH_CHECK(n > 0, op, ": sequence ", i, "'s layer ", j, " has nothing to compute");
      const auto& c = carry[i][j - 1];
      const int64_t have = c.defined() ? c.size(0) : 0;
      const int64_t from_prev = j == 1 ? 0 : m[i] - firm[i][j - 2];
      TORCH_CHECK(have + from_prev == n, op, ": sequence ", i, "'s layer ", j, " has ", have, " carried and ",
                  from_prev, " new input rows for ", n, " positions");
      if (have) {
        check_f32(c, op, "a carried row block");
        TORCH_CHECK(c.dim() == 2 && c.size(1) == H, op, ": carried rows must be [r, H]");
        hid.insert(hid.end(), c.data_ptr<float>(), c.data_ptr<float>() + have * H);
      }
      if (from_prev) hid.insert(hid.end(), prev[i].data_ptr<float>(), prev[i].data_ptr<float>() + from_prev * H);
      for (int64_t p = lo; p < m[i]; ++p) {
        const int64_t at = p + j;  // the token this layer embeds at position p
        TORCH_CHECK(at > m[i] || at >= tok_from[i], op, ": sequence ", i, " lacks token ", at);
        const int64_t tok = at <= m[i] ? tokens[i][at - tok_from[i]] : drafts[i][at - m[i] - 1];
        TORCH_CHECK(tok >= 0 && tok < V, op, ": token id ", tok, " out of range [0, ", V, ")");
        ids.push_back(tok);
      }
      cu.push_back(cu.back() + n);
      last.push_back(cu.back() - 1);
      group.push_back(i);
    }
    const int64_t T = cu.back();
    logits.resize(last.size() * V);
    const auto stream =
        mtp_forward(ctx[j - 1], layers[j - 1], ids.data(), hid.data(), T, cu, start, j, last, logits.data());
    const float* in = hid.data();
    for (size_t g = 0; g < group.size(); ++g) {
      const int64_t i = group[g], lo = firm[i][j - 1], n = m[i] - lo, off = cu[i];
      drafts[i].push_back(argmax_row(logits.data() + g * V, V));
      // firm from here on: p <= m - j; the carry is this layer's input at positions layer j+1 still needs
      // (up to layer j-1's new firm end)
      const int64_t f = std::max(lo, m[i] - j + 1), upto = std::max(f, new_firm[i][j - 1]);
      new_firm[i].push_back(f);
      auto kept = torch::empty({upto - f, H}, torch::kFloat32);
      std::copy(in + (off + f - lo) * H, in + (off + upto - lo) * H, kept.data_ptr<float>());
      new_carry[i].push_back(kept);
      prev[i] = stream.narrow(0, off, n);
    }
  }
  return {drafts, new_firm, new_carry};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("panel_linear", &panel_linear, "x @ weight for a few rows, the weight in column panels");
  m.def("rms_norm", &rms_norm, "RMSNorm of the rows (after adding a residual, when given)");
  m.def("decode_attention", &decode_attention, "one decode step of Step attention");
  m.def("paged_attention", &paged_attention, "Step attention for a serving step over block tables");
  m.def("decode_experts", &decode_experts, "routed experts (and the shared one) for a few tokens");
  m.def("route", &route, "the Step router for a few tokens");
  m.def("decode_moe", &decode_moe, "router, routed and shared experts for a few tokens");
  m.def("qlinear", &qlinear, "x @ a quantized weight (FP8, int4, NVFP4), dequantized in registers");
  m.def("qdequant", &qdequant, "a quantized weight dequantized K-major into a buffer");
  m.def("decode_moe_q", &decode_moe_q, "router and routed experts with quantized expert weights");
  m.def("experts_kernel", &experts_kernel, "the fp32 experts' kernel now: avx2 or generic");
  m.def("mtp_layer", &mtp_layer, "one MTP layer (embedding, block, head) over block tables");
  m.def("mtp_draft", &mtp_draft, "a greedy drafting round of the chained MTP layers over block tables");
  m.def("set_qkernels", &set_qkernels, "0: the best 4-bit kernels this CPU has, 1: the generic loops");
}
