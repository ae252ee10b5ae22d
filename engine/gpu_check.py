"""Every CUDA check of the engine in one command, one table: `python -m advisor.engine.gpu_check`.

    python -m advisor.engine.gpu_check [--only moe,quant,attention,step-nano,bench_moe,bench_serving]
                                       [--iters 20] [--serving-model step-nano-large] [--json out.json]

Rows, in order (each a pass/fail against its bar, or a figure with none):
- moe: the Triton fused MoE (`kernels.fused_moe`) against `kernels.reference.fused_moe_torch` in bf16,
  at decode and prefill token counts (both tile tables), one case with the SwiGLU clamp biting;
- quant: the quantized fused MoE (`kernels.fused_moe_quant`) in fp8 (block 128), nvfp4 and int4 (group
  32) on bf16 activations against `model.moe.experts_quantized` on the same codes in fp32;
- attention: the paged-attention decode kernel (`kernels.paged_attention`) against `paged_decode_torch`
  at Step 3.7 Flash's heads (64 query, 8 KV, head_dim 128), ragged lengths up to 4k, sliding windows;
- step-nano: the shipped model loaded on CUDA and on the CPU (fp32 both), greedy continuations of a
  few chat prompts through the serving core (the fused MoE and, at decode, the paged kernel): equal
  token for token;
- bench_moe: `kernels.bench_moe` at the release shapes (E=288, top-8, H=4096, I=1280, bf16), per batch
  tokens/s and the fraction of the card's HBM bandwidth (its error against the PyTorch path is the bar);
- bench_serving: `engine.bench_serving` on CUDA in bf16 at a short setting (16 loops x 4 steps x 16
  tokens, the shipped step-nano-large): the core's generated tokens/s against the static batcher's (a
  figure), and prompt tokens computed per new one (<= 1.3).

The CPU side of the step-nano row uses the compiled CPU ops where they are built (`python -m
advisor.engine.build`, the README's set-up); otherwise its first load builds them (a minute or two).

Error bars are the relative max error, max |got - want| / max |want|: 2e-2 for bf16 (a few bf16 ulps
of the largest output), 4e-3 for fp16, 2e-5 for fp32 (what the interpreter tests hold the kernels to).
A check that raises is a failed row with its one-line error; the others still run. Exit status: 0 when
every row passes (or on a machine without CUDA, which prints one line saying so and runs nothing), 1
when a row fails. Sized to stay under 8 minutes on one H100 (most of it Triton compiling and the two
benchmarks); `--only` reruns a group.

Each check is a function of a device and shapes, so the tests run the correctness checks' pieces on the
CPU under TRITON_INTERPRET=1 at tiny shapes in fp32 / fp16 (tests/engine/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

# relative max error bars (see the module doc)
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NO_CUDA = "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing was run."
GROUPS = ("moe", "quant", "attention", "step-nano", "bench_moe", "bench_serving")


@dataclass
class Row:
    check: str
    figure: str
    bar: str  # what passes ("" for a figure without one)
    ok: bool | None  # None: a measurement, no bar
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class MoECase:
    experts: int
    top_k: int
    hidden: int
    inter: int
    tokens: int
    limit: float = 0.0  # SwiGLU clamp (0: none)


@dataclass(frozen=True)
class AttnCase:
    seqs: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    max_len: int
    window: int  # every other sequence attends over its last `window` positions only


@dataclass
class Plan:
    """What the checks run at: the defaults are the GPU run's; the tests pass tiny ones."""

    dtype: torch.dtype = torch.bfloat16
    moe: tuple[MoECase, ...] = (
        MoECase(64, 8, 2048, 768, 1),
        MoECase(64, 8, 2048, 768, 7),
        MoECase(64, 8, 2048, 768, 333, limit=0.6),
        MoECase(64, 8, 2048, 768, 2048),
    )
    quant_formats: tuple[tuple[str, int], ...] = (("fp8", 128), ("nvfp4", 16), ("int4", 32))
    quant: tuple[MoECase, ...] = (MoECase(32, 8, 1024, 512, 5), MoECase(32, 8, 1024, 512, 300, limit=0.6))
    quant_tiles: object = None  # fused_moe_quant's `tiles` override (None: its per-format table)
    attention: tuple[AttnCase, ...] = (
        AttnCase(32, 64, 8, 128, 16, 4096, 512),
        AttnCase(16, 96, 8, 128, 16, 1000, 512),
    )
    step_nano_prompts: int = 4
    step_nano_tokens: int = 48
    bench_shape: tuple[int, int, int, int] = (288, 8, 4096, 1280)  # E, top-k, H, I
    bench_batches: tuple[int, ...] = (1, 8, 64, 4096)
    bench_iters: int = 20
    bench_warmup: int = 3
    serving_model: str = "step-nano-large"  # shipped: no transformers needed to build "bench"
    serving_dtype: torch.dtype = torch.bfloat16
    serving: tuple[int, int, int] = (16, 4, 16)  # loops, steps, new tokens a step
    only: tuple[str, ...] = field(default=GROUPS)


# ---------------------------------------------------------------------------------------------- errors
def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error, that over the reference's max abs value)."""
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} against the reference's {tuple(want.shape)}")
    diff = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    scale = want.float().abs().max().item() if want.numel() else 0.0
    if not math.isfinite(diff):
        return math.inf, math.inf
    return diff, diff / max(scale, 1e-30)


def error_row(check: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> Row:
    abs_err, rel_err = errors(got, want)
    return Row(check, f"max abs {abs_err:.2e}, rel {rel_err:.2e}", f"rel <= {tol:g}", rel_err <= tol)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _routing(case: MoECase, dtype: torch.dtype, device: str, seed: int):
    from advisor.engine.kernels import bench_moe

    shape = bench_moe.Shape(case.experts, case.top_k, case.hidden, case.inter)
    return bench_moe.make_batch(shape, case.tokens, dtype, device, seed)


# ---------------------------------------------------------------------------------------------- checks
def check_fused_moe(device: str, case: MoECase, dtype: torch.dtype, seed: int = 0) -> Row:
    """The Triton fused MoE against `fused_moe_torch` (the same call and rounding points) in `dtype`."""
    from advisor.engine.kernels import bench_moe
    from advisor.engine.kernels.fused_moe import fused_moe
    from advisor.engine.kernels.reference import fused_moe_torch

    shape = bench_moe.Shape(case.experts, case.top_k, case.hidden, case.inter)
    wt = bench_moe.make_weights(shape, dtype, device, seed)
    x, w, ids = _routing(case, dtype, device, seed + 1)
    got = fused_moe(x, wt.w_gate, wt.w_up, wt.w_down, w, ids, swiglu_limit=case.limit)
    want = fused_moe_torch(x, wt.w_gate, wt.w_up, wt.w_down, w, ids, swiglu_limit=case.limit)
    _sync(device)
    clamp = f", clamp {case.limit:g}" if case.limit else ""
    name = (
        f"fused MoE {_NAMES[dtype]} T={case.tokens} E={case.experts} top-{case.top_k} "
        f"H={case.hidden} I={case.inter}{clamp}"
    )
    return error_row(name, got, want, TOL[dtype])


@functools.lru_cache(maxsize=1)  # the token counts of one format share its weights (quantizing takes seconds)
def quantized_experts(
    fmt: str, group: int, experts: int, hidden: int, inter: int, device: str, seed: int = 0
):
    """Random experts quantized on the CPU in `fmt` (the published layouts, `quant.formats`) and read
    into the engine's layout on `device`: (gate_up, down) QWeights."""
    from advisor.engine.quant import formats as F
    from advisor.engine.quant.packed import concat_outputs, from_checkpoint

    def q(w: torch.Tensor):
        if fmt == "fp8":
            codes, s = F.fp8_quantize(w, group)
            t = {"weight": codes, "weight_scale_inv": s}
        elif fmt == "nvfp4":
            p, s, s2 = F.nvfp4_quantize(w)
            t = {"weight": p, "weight_scale": s, "weight_scale_2": s2}
        elif fmt == "int4":
            p, s, shape = F.int4_quantize(w, group)
            t = {"weight_packed": p, "weight_scale": s, "weight_shape": shape}
        else:
            raise ValueError(f"quantized_experts: unknown format {fmt!r} (fp8, nvfp4, int4)")
        return from_checkpoint(fmt, group, t, tuple(w.shape))

    g = torch.Generator().manual_seed(seed)
    E, H = experts, hidden
    gate = torch.randn(E, inter, H, generator=g) / H**0.5
    up = torch.randn(E, inter, H, generator=g) / H**0.5
    down = torch.randn(E, H, inter, generator=g) / inter**0.5
    return concat_outputs([q(gate), q(up)]).to(device), q(down).to(device)


def check_fused_moe_quant(
    device: str, fmt: str, group: int, case: MoECase, dtype: torch.dtype, tiles=None, seed: int = 0
) -> Row:
    """The quantized fused MoE on `dtype` activations against the PyTorch path on the same codes in fp32
    (`experts_quantized`), from the same (rounded) activations."""
    from advisor.engine.kernels.fused_moe_quant import fused_moe_quantized
    from advisor.engine.model.moe import experts_quantized

    gate_up, down = quantized_experts(fmt, group, case.experts, case.hidden, case.inter, device, seed)
    x, w, ids = _routing(case, dtype, device, seed + 1)
    got = fused_moe_quantized(x, gate_up, down, w, ids, swiglu_limit=case.limit, tiles=tiles)
    want = experts_quantized(x.float(), gate_up, down, w, ids, case.limit)
    _sync(device)
    clamp = f", clamp {case.limit:g}" if case.limit else ""
    name = (
        f"fused MoE {fmt} (group {group}) on {_NAMES[dtype]} T={case.tokens} E={case.experts} "
        f"top-{case.top_k} H={case.hidden} I={case.inter}{clamp}"
    )
    return error_row(name, got, want, TOL[dtype])


def attention_case(case: AttnCase, dtype: torch.dtype, device: str, seed: int = 0):
    """Random paged caches and one decode query per sequence: ragged lengths (one of exactly one token,
    one ending on a block boundary), shuffled block ids, every other sequence behind a sliding window.
    Returns the `paged_decode` arguments (q, k_cache, v_cache, tables, starts, lengths, scale, block_size)."""
    g = torch.Generator().manual_seed(seed)
    bs, N = case.block_size, case.seqs
    lengths = torch.randint(1, case.max_len + 1, (N,), generator=g)
    lengths[0] = 1
    if N > 1:
        lengths[1] = bs * max(1, case.max_len // (2 * bs))
    windowed = torch.arange(N) % 2 == 1
    starts = torch.where(windowed, (lengths - case.window).clamp(min=0), torch.zeros_like(lengths))
    max_blocks = int((lengths.max() + bs - 1) // bs)
    num_blocks = N * max_blocks + 3  # spare blocks nobody reads
    tables = torch.randperm(num_blocks, generator=g)[: N * max_blocks].view(N, max_blocks)
    rows = num_blocks * bs
    k = torch.randn(rows, case.kv_heads, case.head_dim, generator=g)
    v = torch.randn(rows, case.kv_heads, case.head_dim, generator=g)
    q = torch.randn(N, case.heads, case.head_dim, generator=g)
    on = dict(device=device)
    return (
        q.to(dtype=dtype, **on),
        k.to(dtype=dtype, **on),
        v.to(dtype=dtype, **on),
        tables.to(dtype=torch.int32, **on),
        starts.to(dtype=torch.int32, **on),
        lengths.to(dtype=torch.int32, **on),
        case.head_dim**-0.5,
        bs,
    )


def check_paged_attention(device: str, case: AttnCase, dtype: torch.dtype, seed: int = 0) -> Row:
    """The paged-attention decode kernel against `paged_decode_torch` (fp32 maths on the same inputs)."""
    from advisor.engine.kernels.paged_attention import paged_decode, paged_decode_torch

    args = attention_case(case, dtype, device, seed)
    got = paged_decode(*args)
    want = paged_decode_torch(args[0].float(), *args[1:])
    _sync(device)
    name = (
        f"paged attention {_NAMES[dtype]} {case.seqs} seqs, {case.heads}/{case.kv_heads} heads, "
        f"D={case.head_dim}, block {case.block_size}, len <= {case.max_len}, window {case.window}"
    )
    return error_row(name, got, want, TOL[dtype])


_PROMPTS = (
    "What is 17 + 25? Answer with the number only.",
    "Sort these words: pear, apple, fig.",
    "Read notes.txt and tell me the value of key7.",
    "Compute the total of the marks in marks.csv.",
    "Which is larger, 0.7 or 0.65?",
    "Write the word ADVISOR backwards.",
)


def step_nano_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` chat prompts (the checkpoint's template), the last one past the sliding window (128)."""
    prompts = []
    for i in range(count):
        text = _PROMPTS[i % len(_PROMPTS)]
        if i == count - 1:
            text = "Context: " + " ".join(f"key{j}={j * 7 % 13}" for j in range(60)) + "\n" + text
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    return prompts


def greedy(llm, prompts: Sequence[Sequence[int]], tokens: int) -> list[list[int]]:
    """Greedy continuations of every prompt in one batch on the serving core, no early stop."""
    return llm.generate(prompts, tokens, temperature=0.0, stop_token_ids=[])


def compare_greedy(check: str, want: list[list[int]], got: list[list[int]]) -> Row:
    """Equal token for token; the figure says where the first prompt that differs leaves the reference."""
    same = sum(a == b for a, b in zip(want, got, strict=True))
    total = sum(len(a) for a in want)
    figure = f"{same}/{len(want)} prompts equal ({total} tokens)"
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if a != b:
            at = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            figure += f"; prompt {i} differs from token {at}"
            break
    return Row(check, figure, "all equal", same == len(want))


def check_step_nano(device: str, prompts: int, tokens: int, model: str = "step-nano") -> Row:
    """The shipped model served on `device` against the same on the CPU, fp32 both: greedy equal."""
    from advisor.engine import LLM
    from advisor.engine.model_paths import resolve_model

    path = resolve_model(model)
    cpu = LLM.from_pretrained(path, device="cpu", dtype=torch.float32)
    ids = step_nano_prompts(cpu.tokenizer, prompts)
    want = greedy(cpu, ids, tokens)
    on_device = LLM.from_pretrained(path, device=device, dtype=torch.float32)
    got = greedy(on_device, ids, tokens)
    _sync(device)
    return compare_greedy(f"{model} greedy on {device} = cpu, fp32, {tokens} tokens", want, got)


def check_bench_moe(
    device: str,
    shape: tuple[int, int, int, int],
    batches: Sequence[int],
    dtype: torch.dtype,
    iters: int,
    warmup: int = 3,
) -> list[Row]:
    """`kernels.bench_moe.bench` at `shape` (E, top-k, H, I): a row per batch with the Triton kernel's
    tokens/s, its fraction of the card's HBM peak and its speedup over the PyTorch path; the bar is the
    kernel's error against that path."""
    from advisor.engine.kernels import bench_moe

    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    peak = bench_moe.peak_bandwidth(name)
    s = bench_moe.Shape(*shape)
    out = []
    for r in bench_moe.bench(s, list(batches), dtype, device, iters, peak, warmup=warmup):
        bw = "HBM n/a" if r.triton_bw is None else f"{100 * r.triton_bw:.1f}% of HBM peak"
        out.append(
            Row(
                f"bench_moe {_NAMES[dtype]} E={s.experts} top-{s.top_k} H={s.hidden} I={s.inter} "
                f"batch {r.batch}",
                f"{r.triton_tok_s:,.0f} tok/s, {bw}, {r.torch_ms / r.triton_ms:.2f}x PyTorch; "
                f"rel err {r.max_rel_err:.1e}",
                f"rel <= {TOL[dtype]:g}",
                r.max_rel_err <= TOL[dtype],
            )
        )
    return out


def check_bench_serving(
    device: str, model: str, dtype: torch.dtype, loops: int, steps: int, new: int
) -> list[Row]:
    """`engine.bench_serving` on `device`: the core's and the static batcher's generated tokens/s (a
    figure), and the core's prompt tokens computed per new one (<= 1.3, as on the CPU)."""
    from advisor.engine import bench_serving

    llm = bench_serving.load(model, device, dtype)
    static, core = bench_serving.measure(llm, loops, steps, new)
    where = f"bench_serving {model} {_NAMES[dtype]} {loops} loops x {steps} steps x {new} tokens"
    core_tps, static_tps = core.generated / core.wall_s, static.generated / static.wall_s
    per_new = core.prompt_computed / max(1, core.prompt_new)
    return [
        Row(
            f"{where}: throughput",
            f"core {core_tps:,.0f} tok/s, static {static_tps:,.0f} tok/s: {core_tps / static_tps:.2f}x",
            "",
            None,
        ),
        Row(
            f"{where}: prompt tokens computed / new",
            f"{per_new:.2f} (static {static.prompt_computed / max(1, static.prompt_new):.2f}); "
            f"prefix hits {100 * core.cached / max(1, core.prompt_sent):.0f}%",
            "<= 1.3",
            per_new <= 1.3,
        ),
    ]


# ---------------------------------------------------------------------------------------------- running
def _timed(group: str, fn: Callable[[], Row | list[Row]], device: str) -> list[Row]:
    """Run one check; an exception becomes a failed row naming it (the other checks still run)."""
    t0 = time.perf_counter()
    try:
        rows = fn()
        rows = rows if isinstance(rows, list) else [rows]
    except Exception as e:  # any failure of a check is its row's result
        line = (str(e).strip().splitlines() or [""])[0][:200]
        rows = [Row(f"{group}: raised", f"{type(e).__name__}: {line}", "no error", False)]
    dt = time.perf_counter() - t0
    for r in rows:
        r.seconds = dt / len(rows)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_checks(device: str, plan: Plan, report: Callable[[Row], None] | None = None) -> list[Row]:
    """Every check of `plan.only` on `device`, in the module doc's order; `report` sees each row as it
    comes (a long run shows progress)."""
    jobs: list[tuple[str, Callable[[], Row | list[Row]]]] = []
    if "moe" in plan.only:
        jobs += [("moe", lambda c=c: check_fused_moe(device, c, plan.dtype)) for c in plan.moe]
    if "quant" in plan.only:
        jobs += [
            (
                "quant",
                lambda f=f, g=g, c=c: check_fused_moe_quant(device, f, g, c, plan.dtype, plan.quant_tiles),
            )
            for f, g in plan.quant_formats
            for c in plan.quant
        ]
    if "attention" in plan.only:
        jobs += [
            ("attention", lambda c=c: check_paged_attention(device, c, plan.dtype)) for c in plan.attention
        ]
    if "step-nano" in plan.only:
        jobs.append(
            ("step-nano", lambda: check_step_nano(device, plan.step_nano_prompts, plan.step_nano_tokens))
        )
    if "bench_moe" in plan.only:
        jobs.append(
            (
                "bench_moe",
                lambda: check_bench_moe(
                    device,
                    plan.bench_shape,
                    plan.bench_batches,
                    plan.dtype,
                    plan.bench_iters,
                    plan.bench_warmup,
                ),
            )
        )
    if "bench_serving" in plan.only:
        jobs.append(
            (
                "bench_serving",
                lambda: check_bench_serving(device, plan.serving_model, plan.serving_dtype, *plan.serving),
            )
        )
    rows: list[Row] = []
    for group, fn in jobs:
        for r in _timed(group, fn, device):
            rows.append(r)
            if report is not None:
                report(r)
    return rows


def table(rows: Sequence[Row], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col, kw in (("check", {}), ("figure", {}), ("bar", {}), ("result", {}), ("s", {"justify": "right"})):
        t.add_column(col, **kw)
    for r in rows:
        result = "[green]PASS[/]" if r.ok else "[red]FAIL[/]" if r.ok is False else "figure"
        t.add_row(r.check, r.figure, r.bar, result, f"{r.seconds:.1f}")
    return t


def _device_title() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "missing"
    return (
        f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {tv}, CUDA {torch.version.cuda}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advisor.engine.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument(
        "--only", default=",".join(GROUPS), help=f"comma-separated groups of checks ({', '.join(GROUPS)})"
    )
    p.add_argument("--iters", type=int, default=Plan.bench_iters, help="bench_moe's timed calls per batch")
    p.add_argument(
        "--serving-model",
        default=Plan.serving_model,
        help="bench_serving's model: a shipped name, a path, or bench (its random ~95M config; needs transformers)",
    )
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args(argv)
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    unknown = [x for x in only if x not in GROUPS]
    if unknown:
        p.error(f"--only: unknown group {unknown[0]!r} (known: {', '.join(GROUPS)})")
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    from rich.console import Console

    console = Console()
    title = _device_title()
    console.print(f"gpu_check on {title}")
    t0 = time.perf_counter()

    def progress(r: Row) -> None:
        mark = "ok" if r.ok else "FAIL" if r.ok is False else "--"
        console.print(f"  {mark:4} {r.check}: {r.figure} ({r.seconds:.1f}s)", highlight=False)

    with torch.no_grad():  # scoped: a caller's (a test's) grad mode is left as it was
        rows = run_checks("cuda", Plan(bench_iters=a.iters, serving_model=a.serving_model, only=only), progress)
    failed = sum(r.ok is False for r in rows)
    console.print(table(rows, f"{title}; {time.perf_counter() - t0:.0f} s"))
    console.print(f"{len(rows) - failed} of {len(rows)} rows pass" + (f", {failed} FAIL" if failed else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": title, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
