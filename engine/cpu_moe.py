"""Routed experts for a few tokens on the CPU, in one compiled call (decode at batch 1 or 2).

At decode the PyTorch path runs, per MoE layer, a loop of small GEMVs (two per selected expert) with
slicing, SwiGLU and combine ops around them: about a hundred dispatches of a few microseconds each,
and GEMVs too small for the thread pool to help. This op reads the selected experts' K-major weights in
place, applies the clamped SwiGLU and the routing weight, and accumulates into the output, with no
intermediate tensors. Measured on the 2-core CPU here (E=64, top-8, H=512, I=128, fp32): 0.21 ms
against 0.78 ms per layer for one token (0.88 against 2.1 ms for two); from about four tokens on, the
batched PyTorch schedules win, so it is used only for `n_pairs <= MAX_PAIRS`.

It is compiled once per machine with the C++ toolchain PyTorch uses (`torch.utils.cpp_extension`, cached
under the torch extensions directory, ~30 s the first time). Where no compiler works, or
`ADVISOR_CPU_MOE=0` is set, `kernel()` returns None and the PyTorch path runs. Same maths as
`engine.moe.experts_torch`; sums in another order (fp32 rounding differences only).
"""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

MAX_PAIRS = 16  # (token, expert) pairs; top-8 routing: batch 1 and 2

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADVISOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define ADVISOR_CLONES
#endif

// One (token, expert) pair: o += w * down(swiglu(x @ gate_up)), weights K-major ([H, 2I] and [I, H]).
ADVISOR_CLONES
static void pair(const float* x, const float* gu, const float* dn, float w, float limit, int64_t H,
                 int64_t I, float* h, float* o) {
  const int64_t I2 = 2 * I;
  std::fill(h, h + I2, 0.f);
  for (int64_t i = 0; i < H; ++i) {
    const float xi = x[i];
    const float* row = gu + i * I2;
#pragma omp simd
    for (int64_t c = 0; c < I2; ++c) h[c] += xi * row[c];
  }
  for (int64_t c = 0; c < I; ++c) {
    float g = h[c], u = h[I + c];
    g = g / (1.f + std::exp(-g));
    if (limit > 0) {
      g = std::min(g, limit);
      u = std::max(-limit, std::min(u, limit));
    }
    h[c] = g * u * w;
  }
  for (int64_t i = 0; i < I; ++i) {
    const float ai = h[i];
    const float* row = dn + i * H;
#pragma omp simd
    for (int64_t c = 0; c < H; ++c) o[c] += ai * row[c];
  }
}

torch::Tensor decode_experts(torch::Tensor x, torch::Tensor gu, torch::Tensor dn, torch::Tensor weights,
                             torch::Tensor ids, double limit) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && gu.dtype() == torch::kFloat32 && dn.dtype() == torch::kFloat32,
              "decode_experts: fp32 only");
  TORCH_CHECK(x.is_contiguous() && gu.is_contiguous() && dn.is_contiguous(), "decode_experts: contiguous only");
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1), I = gu.size(2) / 2;
  auto w = weights.to(torch::kFloat32).contiguous();
  auto e = ids.to(torch::kInt64).contiguous();
  auto out = torch::zeros_like(x);
  std::vector<float> h(2 * I);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t ex = e.data_ptr<int64_t>()[t * k + j];
      pair(x.data_ptr<float>() + t * H, gu.data_ptr<float>() + ex * H * 2 * I, dn.data_ptr<float>() + ex * I * H,
           w.data_ptr<float>()[t * k + j], (float)limit, H, I, h.data(), out.data_ptr<float>() + t * H);
    }
  }
  return out;
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {}


def kernel():
    """The compiled op (`decode_experts(x, gate_up_t, down_t, weights, ids, limit)`), or None."""
    if "op" in _state:
        return _state["op"]
    with _lock:
        if "op" not in _state:
            _state["op"] = _build()
    return _state["op"]


def _build():
    if os.environ.get("ADVISOR_CPU_MOE", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        log.info("engine: compiling the CPU decode MoE op (once per machine)")
        mod = load_inline(
            "advisor_cpu_moe_v1",
            cpp_sources=_SOURCE,
            functions=["decode_experts"],
            extra_cflags=["-O3", "-fopenmp-simd"],
            verbose=False,
        )
        return mod.decode_experts
    except Exception as e:  # no compiler, or a toolchain problem: the PyTorch path is always there
        log.warning(
            "engine: CPU decode MoE op unavailable (%s); using the PyTorch path", str(e).splitlines()[0]
        )
        return None


def usable(x: torch.Tensor, gate_up_t: torch.Tensor, n_pairs: int) -> bool:
    """Whether this call can take the compiled op: a few pairs, fp32 on the CPU, no autograd."""
    return (
        n_pairs <= MAX_PAIRS
        and x.device.type == "cpu"
        and x.dtype == gate_up_t.dtype == torch.float32
        and gate_up_t.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or gate_up_t.requires_grad))
    )
