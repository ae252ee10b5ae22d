"""Fused C++ ops for decode steps on the CPU (fp32, a few tokens per call), source in `csrc/cpu_decode.cpp`.

At decode a Step layer is dozens of tiny tensors: the PyTorch path spends most of a step dispatching
elementwise ops (a norm is five, RoPE eight, the router seven) and GEMVs too small for the thread pool.
These ops collapse each cluster into one call:
- `rms_norm(x, residual, scale, eps)`: the residual add and the norm, one pass;
- `decode_attention(...)`: q/k norm, RoPE (from the step's tables), the cache write, attention over the
  cache and the sigmoid gate for one new token per row, split over (row, KV head) pairs; each pass of
  query heads and its outputs held in registers, the next pair's keys prefetched;
- `route(x, weight, bias, k, scale)`: the sigmoid router's top-k and renormalised weights;
- `decode_experts(...)`: the selected experts and the shared expert, each expert's K-major weights (or
  the same in 16 x 16 tiles, `engine.model.moe.block16`, one sequential stream) read once, in place, for all
  of its tokens (experts split across ATen's threads; register tiles of four
  tokens when an expert has several). Measured on a 2-core AVX2 CPU (E=64, top-8, H=512, I=128, weights
  not in cache, one run), routed experts per layer against `engine.model.moe.experts_torch`: 0.34 ms for one
  token, 1.6 against 4.9 ms for four, 3.7 against 6.5 for sixteen, 7.4 against 8.8-9.7 for 64, 21 against
  28 for 256, 39 against 43 for 512 (64 pairs per expert), 88 against 56 for 1024. So it runs while there
  are at most 32 pairs per expert: decode, and prefills of a few hundred tokens;
- `decode_moe(...)`: `route` then `decode_experts`, the MoE block in one call;
- `panel_linear(x, panels, n)`: a projection of up to a hundred-odd rows on a weight in 16-column panels
  (`engine.model.layers.to_panels`), one sequential weight stream per thread, read ahead.
The hot loops are built three times (AVX-512, AVX2 + FMA, baseline x86-64) and the CPU's features pick one
at load time; exp is vectorised (softmax, SwiGLU).
The callers (`engine.model.attention`, `engine.model.moe`, `engine.model.layers.RMSNorm` and `Linear`) take them only where `usable`
holds; everything else runs the PyTorch path, which stays the definition of the maths.

Compiled once per machine with the C++ toolchain PyTorch uses (`torch.utils.cpp_extension`, with ninja;
cached under the torch extensions directory, ~40 s the first time). Where no compiler works, or
`ADVISOR_CPU_OPS=0` is set, `ops()` returns None and the PyTorch path runs.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_decode.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def ops():
    """The compiled module (`rms_norm`, `decode_attention`, `route`, `decode_experts`, `decode_moe`,
    `panel_linear`), or None."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _build()
    return _state["ops"]


def _build():
    if os.environ.get("ADVISOR_CPU_OPS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        log.info("engine: compiling the CPU decode ops (once per machine)")
        return load(
            "advisor_cpu_decode",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, or a toolchain problem: the PyTorch path is always there
        log.warning("engine: CPU decode ops unavailable (%s); using the PyTorch path", str(e).splitlines()[0])
        return None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the compiled ops: fp32 on the CPU, no autograd."""
    for t in tensors:
        if not t.is_cpu or t.dtype is not torch.float32:
            return False
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def experts_fit(n_pairs: int, gate_up_t: torch.Tensor, down_t: torch.Tensor) -> bool:
    """Whether the routed experts of a call go through `decode_experts`: at most 32 (token, expert) pairs
    per expert (beyond that MKL's GEMMs catch up), K-major or blocked weights laid out contiguously."""
    return n_pairs <= 32 * gate_up_t.shape[0] and gate_up_t.is_contiguous() and down_t.is_contiguous()
