"""Fused MoE on a GPU: the Triton kernel against the engine's PyTorch expert path, same weights, same run.

    python -m advisor.engine.kernels.bench_moe [--batches 1 8 64 4096] [--iters 50]
    python -m advisor.engine.kernels.bench_moe --tune     # sweep tile configs, write configs/E.._N.._K.._dtype.json

Defaults are the release shapes (E=288 routed experts, top-8, hidden 4096, expert width 1280, bf16) at
decode batch sizes and one prefill chunk (4096 tokens). Per batch: tokens/s of each path (routed experts
only: router and shared expert excluded) and the fraction of peak HBM bandwidth, counting the bytes of
the distinct experts' weights the batch touches (3 * I * H each) over the measured time. Peak by device
name (H100 SXM 3.35 TB/s, H200 4.8 TB/s; --peak-tbps overrides). Without CUDA it prints why and exits 0;
`--device cpu` runs the same logic under TRITON_INTERPRET=1 at tiny shapes (for tests: its timings mean
nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Datasheet HBM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(); first match wins.
_PEAK = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))


@dataclass(frozen=True)
class Shape:
    experts: int = 288
    top_k: int = 8
    hidden: int = 4096
    inter: int = 1280


@dataclass
class Row:
    batch: int
    experts_hit: int
    weight_bytes: int
    triton_ms: float
    torch_ms: float
    triton_tok_s: float
    torch_tok_s: float
    triton_bw: float | None  # fraction of peak HBM bandwidth
    torch_bw: float | None
    max_rel_err: float


def peak_bandwidth(device_name: str) -> float | None:
    for key, peak in _PEAK:
        if key in device_name:
            return peak
    return None


@dataclass
class Weights:
    w_gate: torch.Tensor  # [E, I, H]: the kernel's layout
    w_up: torch.Tensor
    w_down: torch.Tensor  # [E, H, I]
    gate_up_t: torch.Tensor  # [E, H, 2I]: the PyTorch path's K-major layout
    down_t: torch.Tensor  # [E, I, H]


def make_weights(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Weights:
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, inter = shape.experts, shape.hidden, shape.inter

    def rnd(*size: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) / fan_in**0.5).to(dtype)

    w_gate, w_up, w_down = (
        rnd(E, inter, H, fan_in=H),
        rnd(E, inter, H, fan_in=H),
        rnd(E, H, inter, fan_in=inter),
    )
    gate_up_t = torch.cat([w_gate, w_up], dim=1).transpose(1, 2).contiguous()
    return Weights(w_gate, w_up, w_down, gate_up_t, w_down.transpose(1, 2).contiguous())


def make_batch(
    shape: Shape, batch: int, dtype: torch.dtype, device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations and a uniform random top-k routing (k distinct experts per token, weights summing to 3)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, shape.hidden, generator=g, device=device).to(dtype)
    scores = torch.rand(batch, shape.experts, generator=g, device=device)
    w, ids = scores.topk(shape.top_k, dim=-1)
    return x, 3.0 * w / w.sum(-1, keepdim=True), ids


def time_fn(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(
    shape: Shape,
    batches: Sequence[int],
    dtype: torch.dtype,
    device: str,
    iters: int,
    peak: float | None,
    limit: float = 0.0,
    warmup: int = 3,
) -> list[Row]:
    from advisor.engine.kernels.fused_moe import fused_moe
    from advisor.engine.model.moe import experts_torch

    wt = make_weights(shape, dtype, device)
    per_expert = 3 * shape.inter * shape.hidden * torch.finfo(dtype).bits // 8
    rows = []
    for i, batch in enumerate(batches):
        x, w, ids = make_batch(shape, batch, dtype, device, seed=1 + i)

        def run_triton(x=x, w=w, ids=ids) -> torch.Tensor:
            return fused_moe(x, wt.w_gate, wt.w_up, wt.w_down, w, ids, swiglu_limit=limit)

        def run_torch(x=x, w=w, ids=ids) -> torch.Tensor:
            return experts_torch(x, wt.gate_up_t, wt.down_t, w, ids, limit)

        got, want = run_triton().float(), run_torch().float()
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
        t_tri = time_fn(run_triton, iters, warmup)
        t_ref = time_fn(run_torch, iters, warmup)
        hit = int(torch.unique(ids).numel())
        nbytes = hit * per_expert
        rows.append(
            Row(
                batch=batch,
                experts_hit=hit,
                weight_bytes=nbytes,
                triton_ms=t_tri * 1e3,
                torch_ms=t_ref * 1e3,
                triton_tok_s=batch / t_tri,
                torch_tok_s=batch / t_ref,
                triton_bw=None if peak is None else nbytes / t_tri / peak,
                torch_bw=None if peak is None else nbytes / t_ref / peak,
                max_rel_err=err,
            )
        )
    return rows


def format_table(rows: Sequence[Row]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [
        "batch  experts  weights MB  triton ms  torch ms  triton tok/s  torch tok/s  speedup  "
        "triton HBM  torch HBM  max rel err"
    ]
    for r in rows:
        lines.append(
            f"{r.batch:5d}  {r.experts_hit:7d}  {r.weight_bytes / 1e6:10.1f}  {r.triton_ms:9.3f}  "
            f"{r.torch_ms:8.3f}  {r.triton_tok_s:12.0f}  {r.torch_tok_s:11.0f}  "
            f"{r.torch_ms / r.triton_ms:6.2f}x  {pct(r.triton_bw):>10}  {pct(r.torch_bw):>9}  {r.max_rel_err:.1e}"
        )
    return "\n".join(lines)


def tune(
    shape: Shape,
    batches: Sequence[int],
    dtype: torch.dtype,
    device: str,
    iters: int,
    candidates: dict[str, Sequence[int]] | None = None,
    warmup: int = 3,
) -> dict[str, dict]:
    """Per batch: sweep BLOCK_M with the gate/up tiles (down at the heuristic's), then the down tiles with
    the best gate/up; returns the JSON table (configs.load_table's format)."""
    from advisor.engine.kernels.configs import GemmConfig, MoEConfig, default_config
    from advisor.engine.kernels.fused_moe import fused_moe

    c = candidates or {
        "BLOCK_M": (16, 32, 64),
        "BLOCK_N": (32, 64, 128),
        "BLOCK_K": (64, 128, 256),
        "num_warps": (4, 8),
        "num_stages": (3, 4, 5),
    }
    gemms = [
        GemmConfig(bn, bk, 8, nw, ns)
        for bn, bk, nw, ns in product(c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])
    ]
    wt = make_weights(shape, dtype, device)
    table: dict[str, dict] = {"_source": f"bench_moe --tune on {_device_name(device)}"}
    for i, batch in enumerate(batches):
        x, w, ids = make_batch(shape, batch, dtype, device, seed=1 + i)
        base = default_config(batch, shape.experts, shape.top_k, shape.inter, shape.hidden)

        def timed(cfg: MoEConfig, x=x, w=w, ids=ids) -> float:
            def run() -> torch.Tensor:
                return fused_moe(x, wt.w_gate, wt.w_up, wt.w_down, w, ids, config=cfg)

            try:
                return time_fn(run, iters, warmup)
            except Exception:  # a tile that does not fit (shared memory, registers) is just not a candidate
                return float("inf")

        best = min(
            (MoEConfig(bm, g, base.down) for bm in c["BLOCK_M"] for g in gemms), key=lambda m: timed(m)
        )
        best = min((MoEConfig(best.BLOCK_M, best.gate_up, d) for d in gemms), key=lambda m: timed(m))
        table[str(batch)] = {
            "BLOCK_M": best.BLOCK_M,
            "gate_up": asdict(best.gate_up),
            "down": asdict(best.down),
        }
        print(f"batch {batch}: {table[str(batch)]}", flush=True)
    return table


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET)"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advisor.engine.kernels.bench_moe", description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=288)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=1280)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 4096])  # decode, and a prefill
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--limit", type=float, default=0.0, help="SwiGLU clamp (7.0 on the release's last layers)")
    p.add_argument("--peak-tbps", type=float, default=None, help="HBM peak, TB/s (default: by device name)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tune", action="store_true", help="sweep tiles and write the config table")
    p.add_argument("--out", default=None, help="where --tune writes (default: the package's configs/ table)")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines too")
    a = p.parse_args(argv)

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_moe: no CUDA device here; the fused-MoE benchmark needs a GPU (nothing was measured).")
        return 0
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_moe: --device cpu needs TRITON_INTERPRET=1 (Triton runs on the CPU only interpreted).")
        return 2
    dtype = _DTYPES[a.dtype]
    shape = Shape(a.experts, a.top_k, a.hidden, a.inter)
    name = _device_name(a.device)
    torch.set_grad_enabled(False)
    if a.tune:
        from advisor.engine.kernels.configs import config_path

        table = tune(shape, a.batches, dtype, a.device, a.iters, warmup=a.warmup)
        path = Path(a.out) if a.out else config_path(shape.experts, shape.inter, shape.hidden, dtype)
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}")
        return 0
    peak = a.peak_tbps * 1e12 if a.peak_tbps else peak_bandwidth(name) if a.device == "cuda" else None
    peak_txt = "unknown" if peak is None else f"{peak / 1e12:.2f} TB/s"
    print(
        f"{name}: E={shape.experts} top-{shape.top_k} H={shape.hidden} I={shape.inter} {a.dtype}, peak {peak_txt}"
    )
    rows = bench(shape, a.batches, dtype, a.device, a.iters, peak, a.limit, a.warmup)
    print(format_table(rows))
    if a.json:
        for r in rows:
            print(json.dumps(asdict(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
