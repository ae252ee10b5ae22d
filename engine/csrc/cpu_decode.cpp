// Fused CPU ops for decode steps (a few tokens per call), fp32, built by engine/cpu_decode.py.
//
// At decode a step is dozens of tiny tensors: the PyTorch path spends most of its time dispatching
// elementwise ops and GEMVs too small for the thread pool. Each op here replaces one such cluster with a
// single call that reads its weights once, in place. Same maths as the PyTorch path (engine/layers.py,
// engine/attention.py, engine/moe.py), summed in other orders: fp32 rounding differences only.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// An AVX2 + FMA build of the hot loops beside the baseline one, picked at load time. "arch=x86-64-v3" and
// not "arch=haswell": GCC dispatches the latter on the CPU model (Intel Haswell only), so every AMD CPU
// would get the baseline SSE2 code.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define ADVISOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ADVISOR_CLONES
#endif

namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4)));  // 8 floats, any alignment

inline v8 load8(const float* p) {
  v8 v;
  __builtin_memcpy(&v, p, 32);
  return v;
}

inline float hsum(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

void check_f32(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.device().is_cpu() && t.is_contiguous(), op, ": ", name,
              " must be a contiguous fp32 CPU tensor");
}

// Gemma-style RMSNorm of one row: y = x / rms(x) * scale, where scale already holds (1 + w).
ADVISOR_CLONES
void norm_row(const float* x, const float* scale, float eps, int64_t D, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < D; ++j) ss += x[j] * x[j];
  const float r = 1.f / std::sqrt(ss / D + eps);
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) y[j] = x[j] * r * scale[j];
}

// NeoX rotate-halves on the first rd dims of one head, in place (cos/sin hold the halves repeated).
void rope_head(float* x, const float* cos, const float* sin, int64_t rd) {
  const int64_t half = rd / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = x[j], x2 = x[j + half];
    x[j] = x1 * cos[j] - x2 * sin[j];
    x[j + half] = x2 * cos[j + half] + x1 * sin[j + half];
  }
}

// out[r] (+)= a[rows[r]] @ W for c rows, W K-major [K, N] row-major, a rows of stride lda, out rows of
// stride N. Register tiles of up to 4 rows x 16 columns, accumulated over blocks of 16 weight rows (16 KiB
// of W at N = 256, in L1): each weight is loaded once per 4 rows instead of once per row, and the
// accumulators stay in registers instead of going through memory at every step.
template <int R>
ADVISOR_CLONES void tile(const float* const* a, const float* W, int64_t k0, int64_t k1, int64_t N, int64_t n0,
                         float* const* out) {
  v8 acc[R][2];
  for (int r = 0; r < R; ++r) {
    __builtin_memcpy(&acc[r][0], out[r] + n0, 32);
    __builtin_memcpy(&acc[r][1], out[r] + n0 + 8, 32);
  }
  for (int64_t k = k0; k < k1; ++k) {
    v8 w0, w1;
    __builtin_memcpy(&w0, W + k * N + n0, 32);
    __builtin_memcpy(&w1, W + k * N + n0 + 8, 32);
    for (int r = 0; r < R; ++r) {
      const float ar = a[r][k];
      acc[r][0] += ar * w0;
      acc[r][1] += ar * w1;
    }
  }
  for (int r = 0; r < R; ++r) {
    __builtin_memcpy(out[r] + n0, &acc[r][0], 32);
    __builtin_memcpy(out[r] + n0 + 8, &acc[r][1], 32);
  }
}

void small_gemm(const float* a, const int64_t* rows, int64_t c, int64_t lda, const float* W, int64_t K, int64_t N,
                float* out) {
  std::fill(out, out + c * N, 0.f);
  for (int64_t r0 = 0; r0 < c; r0 += 4) {
    const int R = (int)std::min<int64_t>(4, c - r0);
    const float* ar[4];
    float* orow[4];
    for (int r = 0; r < R; ++r) {
      ar[r] = a + (rows ? rows[r0 + r] : r0 + r) * lda;
      orow[r] = out + (r0 + r) * N;
    }
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t k1 = std::min<int64_t>(K, k0 + 16);
      for (int64_t n0 = 0; n0 < N; n0 += 16) {
        switch (R) {
          case 4: tile<4>(ar, W, k0, k1, N, n0, orow); break;
          case 3: tile<3>(ar, W, k0, k1, N, n0, orow); break;
          case 2: tile<2>(ar, W, k0, k1, N, n0, orow); break;
          default: tile<1>(ar, W, k0, k1, N, n0, orow); break;
        }
      }
    }
  }
}

// One expert (or the shared expert) on its c tokens: y[r] = w[r] * down(swiglu(x[rows[r]] @ gate_up)),
// with K-major weights (gate_up [H, 2I], down [I, H]) so each weight row is read once for all c tokens.
ADVISOR_CLONES
void expert(const float* x, const int64_t* rows, const float* w, int64_t c, const float* gu, const float* dn,
            float limit, int64_t H, int64_t I, float* h, float* y) {
  const int64_t I2 = 2 * I;
  const bool tiled = c > 1 && I2 % 16 == 0 && H % 16 == 0;
  if (tiled) small_gemm(x, rows, c, H, gu, H, I2, h);
  else std::fill(h, h + c * I2, 0.f);
  for (int64_t i = 0; i < H && !tiled; ++i) {
    const float* row = gu + i * I2;
    for (int64_t r = 0; r < c; ++r) {
      const float xi = x[rows[r] * H + i];
      float* hr = h + r * I2;
#pragma omp simd
      for (int64_t j = 0; j < I2; ++j) hr[j] += xi * row[j];
    }
  }
  for (int64_t r = 0; r < c; ++r) {
    float* hr = h + r * I2;
    for (int64_t j = 0; j < I; ++j) {
      float g = hr[j], u = hr[I + j];
      g = g / (1.f + std::exp(-g));
      if (limit > 0) {
        g = std::min(g, limit);
        u = std::max(-limit, std::min(u, limit));
      }
      hr[j] = g * u * w[r];
    }
  }
  if (tiled) {
    // the SwiGLU output sits in the first I columns of each h row (stride 2I)
    small_gemm(h, nullptr, c, I2, dn, I, H, y);
    return;
  }
  std::fill(y, y + c * H, 0.f);
  for (int64_t i = 0; i < I; ++i) {
    const float* row = dn + i * H;
    for (int64_t r = 0; r < c; ++r) {
      const float ai = h[r * I2 + i];
      float* yr = y + r * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) yr[j] += ai * row[j];
    }
  }
}

// dot(a, b) over n floats, four independent accumulators (one chain would wait on each FMA's latency).
ADVISOR_CLONES
float dot(const float* a, const float* b, int64_t n) {
  v8 acc[4] = {};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32)
    for (int u = 0; u < 4; ++u) acc[u] += load8(a + j + 8 * u) * load8(b + j + 8 * u);
  for (; j + 8 <= n; j += 8) acc[0] += load8(a + j) * load8(b + j);
  float tail = 0.f;
  for (; j < n; ++j) tail += a[j] * b[j];
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail;
}

// The G query heads that share one KV head, for one row: each key and value row is read once for all G.
// q [G, D], K/V [S, D] (cache rows), visible [S], gate logits [G] -> out [G, D]; p is [G, S] scratch.
ADVISOR_CLONES
void attend_group(const float* q, const float* K, const float* V, const char* visible, const float* gate_logit,
                  int64_t G, int64_t S, int64_t D, float scale, float* p, float* out) {
  // q . k for four keys at a time: four independent FMA chains per query head.
  int64_t s0 = 0;
  if (D % 8 == 0) {
    for (; s0 + 4 <= S; s0 += 4) {
      const float* k0 = K + s0 * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * D;
        v8 acc[4] = {};
        for (int64_t j = 0; j < D; j += 8) {
          const v8 qv = load8(qg + j);
          for (int u = 0; u < 4; ++u) acc[u] += qv * load8(k0 + u * D + j);
        }
        for (int u = 0; u < 4; ++u) p[g * S + s0 + u] = hsum(acc[u]) * scale;
      }
    }
  }
  for (int64_t s = s0; s < S; ++s)
    for (int64_t g = 0; g < G; ++g) p[g * S + s] = dot(q + g * D, K + s * D, D) * scale;
  std::vector<float> den(G);
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * S;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < S; ++s)
      if (visible[s]) mx = std::max(mx, pg[s]);
    float sum = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      pg[s] = visible[s] ? std::exp(pg[s] - mx) : 0.f;
      sum += pg[s];
    }
    den[g] = sum;
  }
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
  for (int64_t g = 0; g < G; ++g) {
    const float f = 1.f / (1.f + std::exp(-gate_logit[g])) / den[g];
    float* o = out + g * D;
    for (int64_t j = 0; j < D; ++j) o[j] *= f;
  }
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
  at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) norm_row(sp + t * D, wp, (float)eps, D, yp + t * D);
  });
  return {sum, y};
}

// One decode step of Step attention for B rows, one new token each, from the fused projection
// qkvg [B, Hq*D + 2*Hkv*D + Hq] (q, k, v, gate): q/k RMSNorm, partial NeoX RoPE at the query positions
// qpos [B] (inv_freq [rotary dims / 2]), the new k/v written to cache slot `slot`, attention over cache
// slots [0, S) whose key positions kpos [B, S] are visible from the query (causal, within `window` when
// > 0; a padding row with nothing visible sees everything, its output unused), the head-wise sigmoid
// gate. Returns [B, Hq*D]. Query head h reads KV head h / (Hq / Hkv).
torch::Tensor decode_attention(torch::Tensor qkvg, torch::Tensor q_scale, torch::Tensor k_scale,
                               torch::Tensor inv_freq, torch::Tensor qpos, torch::Tensor k_cache,
                               torch::Tensor v_cache, int64_t slot, torch::Tensor kpos, int64_t window, int64_t Hq,
                               double eps, double scale) {
  const char* op = "decode_attention";
  check_f32(qkvg, op, "qkvg");
  check_f32(q_scale, op, "q_scale");
  check_f32(k_scale, op, "k_scale");
  check_f32(inv_freq, op, "inv_freq");
  check_f32(k_cache, op, "k_cache");
  check_f32(v_cache, op, "v_cache");
  TORCH_CHECK(kpos.dtype() == torch::kInt64 && kpos.dim() == 2 && kpos.stride(1) == 1 && qpos.dtype() == torch::kInt64 &&
                  qpos.is_contiguous(),
              op, ": kpos [B, S] and qpos [B] must be int64 with unit stride");
  const int64_t B = qkvg.size(0), Hkv = k_cache.size(1), cap = k_cache.size(2), D = k_cache.size(3);
  const int64_t S = kpos.size(1), rd = 2 * inv_freq.numel(), G = Hq / Hkv;
  TORCH_CHECK(qkvg.size(1) == Hq * D + 2 * Hkv * D + Hq, op, ": qkvg width ", qkvg.size(1), " does not match ",
              Hq, " query heads, ", Hkv, " KV heads of ", D);
  TORCH_CHECK(kpos.size(0) == B && qpos.numel() == B && S <= cap && slot >= 0 && slot < cap && k_cache.size(0) == B &&
                  rd <= D,
              op, ": cache, positions, slot or rotary dims out of range");
  // cos/sin of each row's position, NeoX layout (the same angle for dims j and j + rd/2).
  std::vector<float> cosv(B * rd), sinv(B * rd);
  const int64_t* qp_ = qpos.data_ptr<int64_t>();
  const float* inv = inv_freq.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float p = (float)std::max<int64_t>(qp_[b], 0);
    for (int64_t j = 0; j < rd / 2; ++j) {
      const float f = p * inv[j];
      cosv[b * rd + j] = cosv[b * rd + j + rd / 2] = std::cos(f);
      sinv[b * rd + j] = sinv[b * rd + j + rd / 2] = std::sin(f);
    }
  }
  // Which slots each row's query sees.
  std::vector<char> visible(B * S);
  const int64_t* kp = kpos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t q = qp_[b];
    bool any = false;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t k = kp[b * kpos.stride(0) + s];
      const bool v = k >= 0 && k <= q && (window <= 0 || k > q - window);
      visible[b * S + s] = v;
      any |= v;
    }
    if (!any) std::fill(visible.begin() + b * S, visible.begin() + (b + 1) * S, 1);
  }
  const int64_t W = qkvg.size(1);
  // q with its norm and RoPE applied; k and v go straight into the cache.
  auto q = torch::empty({B, Hq, D}, qkvg.options());
  float *qp = q.data_ptr<float>(), *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const float *in = qkvg.data_ptr<float>(), *cp = cosv.data(), *sp = sinv.data();
  const float *qs = q_scale.data_ptr<float>(), *ks = k_scale.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* row = in + b * W;
    for (int64_t h = 0; h < Hq; ++h) {
      float* qh = qp + (b * Hq + h) * D;
      norm_row(row + h * D, qs, (float)eps, D, qh);
      rope_head(qh, cp + b * rd, sp + b * rd, rd);
    }
    for (int64_t h = 0; h < Hkv; ++h) {
      float* kh = kc + ((b * Hkv + h) * cap + slot) * D;
      norm_row(row + Hq * D + h * D, ks, (float)eps, D, kh);
      rope_head(kh, cp + b * rd, sp + b * rd, rd);
      const float* v = row + Hq * D + Hkv * D + h * D;
      std::copy(v, v + D, vc + ((b * Hkv + h) * cap + slot) * D);
    }
  }
  auto out = torch::empty({B, Hq * D}, qkvg.options());
  float* op_ = out.data_ptr<float>();
  const char* mp = visible.data();
  const int64_t gate_at = Hq * D + 2 * Hkv * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(G * S);
    for (int64_t bk = lo; bk < hi; ++bk) {
      const int64_t b = bk / Hkv, kvh = bk % Hkv;
      attend_group(qp + (b * Hq + kvh * G) * D, kc + bk * cap * D, vc + bk * cap * D, mp + b * S,
                   in + b * W + gate_at + kvh * G, G, S, D, (float)scale, p.data(), op_ + (b * Hq + kvh * G) * D);
    }
  });
  return out;
}

// Routed experts for the (token, slot) pairs in ids [T, k] with routing weights [T, k], plus, when given,
// the shared expert (weight 1) on every token: out = sum over slots + shared. Experts and the shared one
// split across ATen's threads; each token's pairs are summed in expert order.
torch::Tensor decode_experts(torch::Tensor x, torch::Tensor gu, torch::Tensor dn, torch::Tensor weights,
                             torch::Tensor ids, double limit, c10::optional<torch::Tensor> shared_gu,
                             c10::optional<torch::Tensor> shared_dn, double shared_limit) {
  const char* op = "decode_experts";
  check_f32(x, op, "x");
  check_f32(gu, op, "gate_up");
  check_f32(dn, op, "down");
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1), E = gu.size(0), I = gu.size(2) / 2;
  const bool has_shared = shared_gu.has_value();
  int64_t Is = 0;
  if (has_shared) {
    check_f32(*shared_gu, op, "shared gate_up");
    check_f32(*shared_dn, op, "shared down");
    Is = shared_gu->size(1) / 2;
  }
  auto wt = weights.to(torch::kFloat32).contiguous();
  auto et = ids.to(torch::kInt64).contiguous();
  const int64_t n = T * k;
  const int64_t* e = et.data_ptr<int64_t>();
  std::vector<int64_t> count(E + 1, 0), rows(n);
  std::vector<float> pw(n);
  for (int64_t p = 0; p < n; ++p) count[e[p] + 1]++;
  for (int64_t i = 0; i < E; ++i) count[i + 1] += count[i];
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t p = 0; p < n; ++p) {
    const int64_t s = fill[e[p]]++;
    rows[s] = p / k;
    pw[s] = wt.data_ptr<float>()[p];
  }
  std::vector<int64_t> tasks;  // experts with tokens, then -1 for the shared expert
  for (int64_t i = 0; i < E; ++i)
    if (count[i + 1] > count[i]) tasks.push_back(i);
  if (has_shared) tasks.push_back(-1);
  std::vector<int64_t> all_rows(T);
  std::vector<float> ones(T, 1.f);
  for (int64_t t = 0; t < T; ++t) all_rows[t] = t;
  auto ys = torch::empty({n, H}, x.options());
  auto shared_y = torch::empty({has_shared ? T : 0, H}, x.options());
  const float *xp = x.data_ptr<float>(), *gup = gu.data_ptr<float>(), *dnp = dn.data_ptr<float>();
  float* yp = ys.data_ptr<float>();
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t b, int64_t f) {
    std::vector<float> h;
    for (int64_t q = b; q < f; ++q) {
      const int64_t ex = tasks[q];
      if (ex < 0) {
        h.resize(T * 2 * Is);
        expert(xp, all_rows.data(), ones.data(), T, shared_gu->data_ptr<float>(), shared_dn->data_ptr<float>(),
               (float)shared_limit, H, Is, h.data(), shared_y.data_ptr<float>());
        continue;
      }
      const int64_t s = count[ex], c = count[ex + 1] - s;
      h.resize(c * 2 * I);
      expert(xp, rows.data() + s, pw.data() + s, c, gup + ex * H * 2 * I, dnp + ex * I * H, (float)limit, H, I,
             h.data(), yp + s * H);
    }
  });
  auto out = torch::zeros_like(x);
  float* o = out.data_ptr<float>();
  for (int64_t s = 0; s < n; ++s) {
    float* orow = o + rows[s] * H;
    const float* y = yp + s * H;
    for (int64_t j = 0; j < H; ++j) orow[j] += y[j];
  }
  if (has_shared) {
    const float* sy = shared_y.data_ptr<float>();
    for (int64_t i = 0; i < T * H; ++i) o[i] += sy[i];
  }
  return out;
}

// The Step router for a few tokens: sigmoid scores in fp32, top-k of (score + bias) chosen, the chosen
// scores renormalised and multiplied by `scale`. Returns (weights [T, k], ids [T, k]), ids in descending
// order of score + bias (ties: the lower expert id first).
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
  std::vector<float> score(E);
  std::vector<int64_t> order(E);
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = xp + t * H;
    for (int64_t i = 0; i < E; ++i) {
      score[i] = 1.f / (1.f + std::exp(-dot(xt, wp + i * H, H)));
      order[i] = i;
    }
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      const float sa = score[a] + bp[a], sb = score[b] + bp[b];
      return sa > sb || (sa == sb && a < b);
    });
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) sum += score[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      weights.data_ptr<float>()[t * k + j] = score[order[j]] * ((float)scale / sum);
      ids.data_ptr<int64_t>()[t * k + j] = order[j];
    }
  }
  return {weights, ids};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of the rows (after adding a residual, when given)");
  m.def("decode_attention", &decode_attention, "one decode step of Step attention");
  m.def("decode_experts", &decode_experts, "routed experts (and the shared one) for a few tokens");
  m.def("route", &route, "the Step router for a few tokens");
}
