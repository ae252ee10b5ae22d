"""The fp32 dense projections side by side on the CPU: `panel_linear`'s generic loop, its AVX2 + FMA kernel,
torch's own linear (MKL) on the plain [out, in] weight and oneDNN's on its packed one (`OneDNNPacked`, where
this torch has it), in G weights/s (weights read per second: at r
rows each weight serves r rows, so equal figures at 1 and r rows mean r rows cost what one does).

    python -m advisor.engine.bench_linear [--rows 1 2 4 8 16] [--repeats 7] [--threads N]

The shapes are the projections of `advisor.engine.bench`'s ~88M Step-shaped model (hidden 512; qkvg of its full and
sliding attention layers, their output projections, the dense MLP, the 16384-token head). Weights are cycled
through enough copies (>= 64 MiB) that each call reads them from memory, as a decode step does. The kernels
alternate call by call within each round (a noisy neighbour slows them alike); each figure is the best round.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from advisor.engine.bench import BENCH_TEXT
from advisor.engine.model import cpu_decode
from advisor.engine.model.layers import _onednn_linear, to_panels


def projection_shapes(cfg: dict = BENCH_TEXT) -> list[tuple[str, int, int]]:
    """(name, out, in) of the model's dense projections, once per distinct shape."""
    h, d, kv = cfg["hidden_size"], cfg["head_dim"], cfg["num_key_value_heads"]
    full_heads, sliding_heads = cfg["num_attention_heads"], cfg["attention_other_setting"]["num_attention_heads"]
    shapes = []
    for kind, heads in (("full", full_heads), ("sliding", sliding_heads)):
        shapes.append((f"qkvg {kind}", heads * d + 2 * kv * d + heads, h))
        shapes.append((f"o {kind}", h, heads * d))
    inter = cfg["intermediate_size"]
    shapes += [("mlp gate_up", 2 * inter, h), ("mlp down", h, inter), ("lm_head", cfg["vocab_size"], h)]
    return shapes


def _best_rounds(fns: dict, calls: int, repeats: int) -> dict[str, float]:
    """Seconds per call of each function: the best of `repeats` rounds, the functions taking turns."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn(0)  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for i in range(calls):
                fn(i)
            best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    return best


def _shape_rates(ops, n: int, k: int, row_counts: list[int], repeats: int, g: torch.Generator):
    """(rows, {kernel: G weights/s}) for an n x k projection at each row count."""
    copies = max(2, -(-(64 << 20) // (n * k * 4)))
    ws = [torch.randn(n, k, generator=g) for _ in range(copies)]
    panels = [to_panels(w) for w in ws]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in ws] if _onednn_linear() else []
    calls = max(copies, (1 << 26) // (n * k))  # ~0.25 GB of weights a round
    for rows in row_counts:
        x = torch.randn(rows, k, generator=g)

        def generic(i, x=x):
            ops.set_qkernels(1)
            return ops.panel_linear(x, panels[i % copies], n)

        def best(i, x=x):
            ops.set_qkernels(0)
            return ops.panel_linear(x, panels[i % copies], n)

        def mkl(i, x=x):
            return F.linear(x, ws[i % copies])

        def onednn(i, x=x):
            return torch.ops.mkldnn._linear_pointwise(x, packed[i % copies], None, "none", [], "")

        torch.testing.assert_close(best(0), mkl(0), rtol=1e-4, atol=1e-3)
        fns = {"generic": generic, "best": best, "torch": mkl} | ({"onednn": onednn} if packed else {})
        t = _best_rounds(fns, calls, repeats)
        yield rows, {key: n * k / s / 1e9 for key, s in t.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = cpu_decode.ops()
    if ops is None:
        raise SystemExit("advisor.engine.bench_linear: the compiled CPU ops are not available here (see the log above)")
    best_name = ops.set_qkernels(0)
    ops.set_qkernels(1)
    print(
        f"fp32 projections, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads, weights from memory, best of {args.repeats} alternating rounds; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    head = (
        f"{'projection':>12} {'out x in':>12} {'rows':>4} | {'generic':>8} {best_name:>8} {'torch':>8} {'onednn':>8} "
        f"G weights/s | {best_name}/generic {best_name}/torch"
    )
    print(head)
    print("-" * len(head))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, n, k in projection_shapes():
            for rows, rate in _shape_rates(ops, n, k, args.rows, args.repeats, g):
                print(
                    f"{name:>12} {f'{n} x {k}':>12} {rows:>4} | {rate['generic']:>8.2f} {rate['best']:>8.2f} "
                    f"{rate['torch']:>8.2f} {rate.get('onednn', float('nan')):>8.2f}             | "
                    f"{rate['best'] / rate['generic']:>{len(best_name) + 7}.2f}x "
                    f"{rate['best'] / rate['torch']:>{len(best_name) + 5}.2f}x",
                    flush=True,
                )
    ops.set_qkernels(0)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
