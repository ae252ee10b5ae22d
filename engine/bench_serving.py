"""A simulated agent workload on the serving core against the static batching it replaced.

    python -m advisor.engine.bench_serving [--model bench|step-nano|PATH] [--loops 40] [--steps 8] [--new 24]
                                           [--device cpu|cuda] [--dtype fp32|bf16|fp16]

`loops` agent loops run at once. Each starts from the same system prompt (an agent's instructions and
tool schemas, shared by every loop) plus its own task, and at each of `steps` steps sends its whole
conversation so far, gets `new` tokens back (greedy, no early stop) and appends them and a tool result
of 100-180 tokens: about 1.6k tokens of context by the last step with the defaults. Token ids are
random (seeded), so both engines get the same workload.

- static: what `provider: embedded` did before the serving core: one worker takes every pending request
  (up to `--batch` 16) into one left-padded `LLM.generate_static` batch with its own static KV cache;
  requests that arrive meanwhile wait for the next batch.
- core: `AsyncLLM` over `EngineCore`: continuous batching, chunked prefill, paged KV with prefix caching.

Printed side by side: wall time, generated tokens/s, prompt tokens computed against sent (static
counts the padding it computes) and against new (the tokens no earlier call of the loop sent or got
back: its first prompt, then each tool result), prefix hit rate, p50/p99 time to first token, peak KV memory.
The model: the ~95M Step-shaped config of `advisor.engine.bench` (random weights) or a checkpoint (`step-nano`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Result:
    wall_s: float = 0.0
    generated: int = 0
    prompt_sent: int = 0
    prompt_new: int = 0  # prompt tokens no earlier call of the same loop sent or got back
    prompt_computed: int = 0
    cached: int = 0
    ttft: list[float] = field(default_factory=list)
    peak_kv_bytes: int = 0
    preemptions: int = 0
    outputs: dict[tuple[int, int], list[int]] = field(default_factory=dict)


def workload(loops: int, vocab: int, seed: int, system_len: int = 256, task_len: int = 64):
    """The shared system prompt, each loop's first message, and a tool result generator per loop."""
    g = random.Random(seed)
    system = [g.randrange(3, vocab) for _ in range(system_len)]
    tasks = [[g.randrange(3, vocab) for _ in range(task_len)] for _ in range(loops)]

    def tool_result(loop: int, step: int) -> list[int]:
        r = random.Random(seed * 1_000_003 + loop * 101 + step)
        return [r.randrange(3, vocab) for _ in range(r.randrange(100, 181))]

    return system, tasks, tool_result


async def run_loops(generate, loops: int, steps: int, vocab: int, seed: int, result: Result) -> None:
    """Drive `loops` agent loops; `generate(prompt) -> (tokens, ttft_s, cached)` is awaited per step."""
    system, tasks, tool_result = workload(loops, vocab, seed)

    async def one(i: int) -> None:
        conv = system + tasks[i]
        seen = 0  # tokens of this loop's conversation already sent or generated
        for s in range(steps):
            out, ttft, cached = await generate(list(conv))
            result.prompt_sent += len(conv)
            result.prompt_new += len(conv) - seen
            seen = len(conv) + len(out)
            result.generated += len(out)
            result.cached += cached
            result.ttft.append(ttft)
            result.outputs[(i, s)] = out
            conv = conv + out + tool_result(i, s)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(loops)))
    result.wall_s = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------- static
class StaticBatcher:
    """Today's static batching, as the embedded endpoint did it: one worker thread, batches of whatever is
    pending when the model frees up, each a left-padded `generate_static`-style run with its own cache."""

    def __init__(self, llm, new: int, batch: int, result: Result):
        self.llm, self.new, self.batch, self.result = llm, new, batch, result
        self.pending: list[tuple[list[int], float, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self.cv = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    async def generate(self, prompt: list[int]):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self.cv:
            self.pending.append((prompt, time.perf_counter(), fut, loop))
            self.cv.notify()
        return await fut

    def _work(self) -> None:
        from advisor.engine.model.cache import KVCache

        llm = self.llm
        while True:
            with self.cv:
                while not self.pending and not self.stop:
                    self.cv.wait()
                if self.stop:
                    return
                jobs, self.pending = self.pending[: self.batch], self.pending[self.batch :]
            prompts = [j[0] for j in jobs]
            T = max(len(p) for p in prompts)
            self.result.prompt_computed += T * len(prompts)  # the padded batch computes every column
            cache_bytes = _static_cache_bytes(KVCache, llm, len(prompts), T + self.new)
            self.result.peak_kv_bytes = max(self.result.peak_kv_bytes, cache_bytes)
            outs: list[list[int]] = [[] for _ in jobs]
            first = None
            for step in llm._decode(prompts, [None] * len(prompts), self.new, 0.0, 1.0, None, set(), True):
                first = first or time.perf_counter()
                for b, t in enumerate(step):
                    outs[b].append(t)
            for (_, t0, fut, loop), out in zip(jobs, outs, strict=True):
                loop.call_soon_threadsafe(fut.set_result, (out, first - t0, 0))

    def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify()


def _static_cache_bytes(KVCache, llm, batch: int, length: int) -> int:
    """What the static cache for one batch allocates (full layers: every column; sliding: the window)."""
    cfg = llm.config.text
    per = 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(llm.dtype).bits // 8
    window = cfg.sliding_window or length
    cols = sum(length if t == "full_attention" else min(length, window) for t in cfg.layer_types)
    return batch * cols * per


async def bench_static(llm, loops, steps, new, batch, seed) -> Result:
    result = Result()
    batcher = StaticBatcher(llm, new, batch, result)
    try:
        await run_loops(batcher.generate, loops, steps, llm.config.text.vocab_size, seed, result)
    finally:
        batcher.close()
    return result


# ---------------------------------------------------------------------------------------- core
async def bench_core(llm, loops, steps, new, seed, num_blocks, chunk) -> Result:
    from advisor.engine.serving import AsyncLLM, EngineCore, SamplingParams, ServingConfig

    core = EngineCore(
        llm, ServingConfig(num_blocks=num_blocks, max_num_seqs=loops, max_num_batched_tokens=chunk)
    )
    engine = AsyncLLM(core)
    params = SamplingParams(max_tokens=new)
    result = Result()

    async def generate(prompt):
        t0 = time.perf_counter()
        stream = engine.generate(prompt, params)
        ttft = None
        async for ev in stream:
            if ev.token is not None and ttft is None:
                ttft = time.perf_counter() - t0
        return stream.seq.output, ttft, stream.seq.num_cached_prompt

    await run_loops(generate, loops, steps, llm.config.text.vocab_size, seed, result)
    result.prompt_computed = core.stats.computed_tokens - result.generated + loops * steps  # minus decodes
    cfg = llm.config.text
    per_row = 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(llm.dtype).bits // 8
    for t, pool in core.blocks.pools.items():
        layers = sum(1 for x in cfg.layer_types if x == t)
        result.peak_kv_bytes += pool.in_use_peak * core.config.block_size * per_row * layers
    result.preemptions = core.scheduler.num_preemptions
    return result


# ---------------------------------------------------------------------------------------- report
def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def report(static: Result, core: Result) -> str:
    rows = [
        ("wall time (s)", f"{static.wall_s:.1f}", f"{core.wall_s:.1f}", static.wall_s / core.wall_s),
        (
            "generated tokens/s",
            f"{static.generated / static.wall_s:.1f}",
            f"{core.generated / core.wall_s:.1f}",
            (core.generated / core.wall_s) / (static.generated / static.wall_s),
        ),
        ("prompt tokens sent", str(static.prompt_sent), str(core.prompt_sent), None),
        (
            "prompt tokens computed",
            str(static.prompt_computed),
            str(core.prompt_computed),
            static.prompt_computed / max(1, core.prompt_computed),
        ),
        (
            "prompt tokens new",
            str(static.prompt_new),
            str(core.prompt_new),
            None,
        ),
        (
            "computed / new",
            f"{static.prompt_computed / max(1, static.prompt_new):.2f}",
            f"{core.prompt_computed / max(1, core.prompt_new):.2f}",
            None,
        ),
        ("prefix hit rate", "0%", f"{100 * core.cached / max(1, core.prompt_sent):.1f}%", None),
        (
            "p50 time to first token (s)",
            f"{statistics.median(static.ttft):.2f}",
            f"{statistics.median(core.ttft):.2f}",
            statistics.median(static.ttft) / statistics.median(core.ttft),
        ),
        (
            "p99 time to first token (s)",
            f"{_pct(static.ttft, 0.99):.2f}",
            f"{_pct(core.ttft, 0.99):.2f}",
            _pct(static.ttft, 0.99) / _pct(core.ttft, 0.99),
        ),
        (
            "peak KV memory (MiB)",
            f"{static.peak_kv_bytes / 2**20:.1f}",
            f"{core.peak_kv_bytes / 2**20:.1f}",
            static.peak_kv_bytes / max(1, core.peak_kv_bytes),
        ),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':{w}}  {'static':>10}  {'core':>10}  {'static/core':>11}"]
    for name, a, b, ratio in rows:
        lines.append(f"{name:{w}}  {a:>10}  {b:>10}  {'' if ratio is None else f'{ratio:.2f}x':>11}")
    return "\n".join(lines)


def load(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from advisor.engine import LLM

    if model == "bench":
        from advisor.engine.bench import build_checkpoint

        path = Path(tempfile.mkdtemp(prefix="bench_serving_")) / "ckpt"
        n = build_checkpoint(path)
        print(f"model: advisor.engine.bench's Step-shaped config, {n / 1e6:.0f}M parameters (random weights)")
    else:
        from advisor.engine.model_paths import resolve_model

        path = resolve_model(model)
        print(f"model: {path}")
    return LLM.from_pretrained(path, device=device, dtype=dtype)


def pool_blocks(loops: int, steps: int, new: int) -> tuple[int, int]:
    """The longest conversation of the workload (tokens) and KV blocks of 16 that hold every loop's."""
    longest = 256 + 64 + steps * (new + 180)
    return longest, loops * (longest // 16 + 2)


def measure(
    llm,
    loops: int,
    steps: int,
    new: int,
    batch: int = 16,
    chunk: int = 512,
    blocks: int | None = None,
    seed: int = 0,
) -> tuple[Result, Result]:
    """The workload on the static batcher and on the core, same model and seed: (static, core)."""
    blocks = blocks or pool_blocks(loops, steps, new)[1]
    core = asyncio.run(bench_core(llm, loops, steps, new, seed, blocks, chunk))
    static = asyncio.run(bench_static(llm, loops, steps, new, batch, seed))
    return static, core


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench", help="bench (advisor.engine.bench's config), step-nano, or a path")
    p.add_argument("--loops", type=int, default=40)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--new", type=int, default=24, help="tokens generated per step")
    p.add_argument("--batch", type=int, default=16, help="static batch size (the old max_batch_size)")
    p.add_argument("--chunk", type=int, default=512, help="core: tokens per step (prefill chunk)")
    p.add_argument("--blocks", type=int, default=None, help="core: KV blocks (default: the whole workload)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    llm = load(args.model, args.device, dtype)
    longest, blocks = pool_blocks(args.loops, args.steps, args.new)
    blocks = args.blocks or blocks
    print(
        f"workload: {args.loops} loops x {args.steps} steps, {args.new} new tokens a step, "
        f"up to {longest} tokens of context; core pool {blocks} blocks of 16; {args.device} {args.dtype}"
    )
    static, core = measure(llm, args.loops, args.steps, args.new, args.batch, args.chunk, blocks, args.seed)
    print(report(static, core))
    same = sum(static.outputs[k] == core.outputs[k] for k in static.outputs)
    print(
        f"core preemptions: {core.preemptions}; greedy outputs identical in {same} of {len(static.outputs)} calls "
        "(the two paths round differently, and one flip changes the rest of a loop)"
    )


if __name__ == "__main__":
    main()
