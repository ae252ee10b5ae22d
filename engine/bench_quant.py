"""Quantized forms side by side on the CPU: load time, resident weight memory, decode tokens/s.

    python -m advisor.engine.bench_quant [--dtype fp32,bf16,fp8,int4,int4-lm,nvfp4] [--batches 1 16] [--decode 32]

The ~95M-parameter Step-shaped model of `advisor.engine.bench` (random weights), saved once in fp32 and quantized
with `advisor.engine.quantize` (fp8 block scales, int4 group 128, the same with the LM head in int4 too
(`int4-lm`, `--lm-head`: a 16384-token head is a third of this model's bytes), NVFP4); each form is loaded in a fresh process
(so its resident memory is its own): seconds to load, the bytes of its weights as held (every tensor
counted once) and the process's RSS growth over the load, then greedy decode at each batch (prompt of 32
tokens, best of `--repeats`). Ratios are against fp32. Targets (issue 19): 4-bit resident weights <= 0.3x
fp32's; 4-bit decode at batch 1 >= 1.5x fp32's (decode streams the weights: fewer bytes, faster steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMS = ("fp32", "bf16", "fp8", "int4", "int4-lm", "nvfp4")
# form -> (advisor.engine.quantize format, --lm-head)
_QUANTIZED = {
    "fp8": ("fp8", False),
    "int4": ("int4", False),
    "int4-lm": ("int4", True),
    "nvfp4": ("nvfp4", False),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(path: Path, dtype: str, batches: list[int], prompt: int, decode: int, repeats: int) -> dict:
    """In this process: load, then time decode (called in a child per form)."""
    import torch
    from advisor.engine import LLM
    from advisor.engine.bench import engine_runner
    from advisor.engine.quant.packed import weight_bytes

    torch.manual_seed(0)
    rss0 = _rss()
    t0 = time.perf_counter()
    llm = LLM.from_pretrained(path, dtype=dtype)
    load = time.perf_counter() - t0
    out = {"load_s": load, "weights": weight_bytes(llm.model, llm.vision), "rss": _rss() - rss0}
    for b in batches:
        ids = torch.randint(1, llm.config.text.vocab_size, (b, prompt))
        run = engine_runner(llm, ids, decode)
        run()  # warm-up
        best = min(run()[1] for _ in range(repeats))
        out[f"tok_s_{b}"] = b * decode / best
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        r = measure(Path(args.child[0]), args.child[1], args.batches, args.prompt, args.decode, args.repeats)
        print(json.dumps(r))
        return
    forms = [f.strip() for f in args.dtype.split(",")]
    bad = [f for f in forms if f not in FORMS]
    if bad:
        ap.error(f"unknown form {bad[0]!r} (use {', '.join(FORMS)})")
    from advisor.engine.bench import build_checkpoint
    from advisor.engine.quantize import quantize_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fp32"
        n = build_checkpoint(src)
        paths = {"fp32": (src, "float32"), "bf16": (src, "bfloat16")}
        for f in forms:
            if f in _QUANTIZED:
                fmt, head = _QUANTIZED[f]
                quantize_checkpoint(src, Path(tmp) / f, fmt, lm_head=head)
                paths[f] = (Path(tmp) / f, "float32")
        rows = {}
        for f in forms:
            path, dtype = paths[f]
            cmd = [
                sys.executable,
                "-m",
                "advisor.engine.bench_quant",
                "--child",
                str(path),
                dtype,
                "--batches",
                *map(str, args.batches),
                "--prompt",
                str(args.prompt),
                "--decode",
                str(args.decode),
                "--repeats",
                str(args.repeats),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[f] = json.loads(res.stdout.strip().splitlines()[-1])
            rows[f]["disk"] = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(f"Step-shaped model, {n / 1e6:.0f}M text parameters, {os.cpu_count()} CPUs, torch threads default")
    base = rows.get("fp32")
    head = f"{'form':<7} {'disk MiB':>9} {'load s':>7} {'weights MiB':>12} {'x fp32':>7} {'RSS+ MiB':>9}"
    for b in args.batches:
        head += f" {f'tok/s b={b}':>12} {'x fp32':>7}"
    print(head)
    for f, r in rows.items():
        line = (
            f"{f:<7} {r['disk'] / 2**20:>9.1f} {r['load_s']:>7.2f} {r['weights'] / 2**20:>12.1f} "
            f"{r['weights'] / base['weights'] if base else float('nan'):>7.2f} {r['rss'] / 2**20:>9.1f}"
        )
        for b in args.batches:
            t = r[f"tok_s_{b}"]
            line += f" {t:>12.1f} {t / base[f'tok_s_{b}'] if base else float('nan'):>7.2f}"
        print(line)


if __name__ == "__main__":
    main()
