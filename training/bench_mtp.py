"""Decode speed with and without MTP speculation in the serving core, and how many drafts the model
accepts, on real prompts.

    python -m training.bench_mtp [--model models/step-nano] [--batches 1 16] [--ks 1 2 3]

Prompts are what the embedded endpoint sends on real task traces: every assistant turn of the Quickstart's
task (`training.quickstart`) and of held-out tasks of the training families (`training.evaluate`'s stream,
seeds from 100 003), greedy, stopping at the checkpoint's eos, up to `--decode` new tokens. Each run goes
through the serving core (`advisor.engine.serving.EngineCore`, what `LLM.generate` and `advisor serve` use), a
fresh one each time so the prefix cache never serves a repeated prompt: plain, then with k drafts per
verify step, alternating, best of `--repeats`; greedy output is checked to be identical. The prompts of a
batch are submitted at once and the core steps until each has its first token (the prefill, with the MTP
layers' own over the prompt when speculating: timed apart, printed); decode tokens/s counts the tokens
after the first over the steps after that. At batch 1 the prompts run one at a time (`--rows-at-1`).
"Tokens per step" is what each verify step of a sequence adds: its accepted drafts plus the model's own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
from pathlib import Path

import torch
from advisor.engine import LLM
from advisor.engine.serving import EngineCore, SamplingParams, ServingConfig


def task_prompts(llm: LLM, n_tasks: int, at_least: int = 0) -> tuple[list[list[int]], int]:
    """Prompt ids of every assistant turn: the Quickstart's task first, then `n_tasks` held-out tasks, and
    more held-out tasks after those while there are fewer than `at_least` prompts (a batch of B is B
    different prompts). Returns the prompts and the number of held-out tasks they came from."""
    from training.quickstart import SEED_BASE, candidate
    from training.runlog import HELD_OUT_SEED_OFFSET
    from training.tasks import FAMILIES, generate
    from training.traces import run_traces, samples

    qs_index = 5  # examples/quickstart: seed 500 005 (training/README.md)
    assert SEED_BASE + qs_index == 500_005
    held_out = generate(10_000, HELD_OUT_SEED_OFFSET, FAMILIES)  # the same first tasks for any count
    tok = llm.tokenizer
    prompts: list[list[int]] = []
    batch, used = [candidate(qs_index)] + list(itertools.islice(held_out, n_tasks)), n_tasks
    while True:
        traces = asyncio.run(run_traces(batch, "low"))
        prompts += [tok.encode(s.prompt) for tr in traces for s in samples(tr, tok)]
        if len(prompts) >= at_least:
            return prompts, used
        batch, used = [next(held_out)], used + 1


def run_batch(llm: LLM, prompts: list[list[int]], new: int, k: int, blocks: int):
    """One batch through a fresh core: (outputs, prefill seconds, decode seconds, tokens after the first,
    verify steps, drafts accepted)."""
    core = EngineCore(
        llm,
        ServingConfig(num_blocks=blocks, max_num_seqs=len(prompts), max_num_batched_tokens=1 << 16),
    )
    params = SamplingParams(new, stop_token_ids=tuple(llm.eos_token_ids), num_speculative_tokens=k)
    seqs = [core.submit(p, params) for p in prompts]
    t0 = time.perf_counter()
    core.drive(lambda: all(s.output or s.finished for s in seqs))
    t1 = time.perf_counter()
    core.drive(lambda: all(s.finished for s in seqs))
    t2 = time.perf_counter()
    steps = sum(s.spec.steps for s in seqs if s.spec)
    acc = sum(s.spec.accepted for s in seqs if s.spec)
    return [s.output for s in seqs], t1 - t0, t2 - t1, sum(len(s.output) - 1 for s in seqs), steps, acc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.bench_mtp")
    ap.add_argument("--model", default="models/step-nano")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="drafts per step (default 1..layers)")
    ap.add_argument("--tasks", type=int, default=6, help="held-out tasks besides the Quickstart's")
    ap.add_argument("--rows-at-1", type=int, default=4, help="prompts timed one at a time at batch 1")
    ap.add_argument("--decode", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    llm = LLM.from_pretrained(Path(a.model), dtype="float32")
    n_mtp = len(llm.model.mtp)
    if not n_mtp:
        raise SystemExit(f"{a.model}: no MTP layers to speculate with")
    ks = a.ks or list(range(1, n_mtp + 1))
    prompts, n_tasks = task_prompts(llm, a.tasks, max(a.batches))
    print(
        f"{a.model}: {len(prompts)} prompts from {n_tasks + 1} tasks (mean {sum(map(len, prompts)) / len(prompts):.0f}"
        f" tokens), greedy up to {a.decode} new tokens, serving core, {torch.get_num_threads()} threads, "
        f"best of {a.repeats}, load average {os.getloadavg()[0]:.1f}"
    )
    for B in a.batches:
        groups = [[p] for p in prompts[: a.rows_at_1]] if B == 1 else [prompts[:B]]
        longest = max(len(p) for g in groups for p in g) + a.decode + 2 * n_mtp + 2
        blocks = B * (-(-longest // 16)) + 8

        def run(k: int, groups=groups, blocks=blocks):
            outs, pre, dec, n, steps, acc = [], 0.0, 0.0, 0, 0, 0
            for g in groups:
                o, p, d, nn, s, ac = run_batch(llm, g, a.decode, k, blocks)
                outs.append(o)
                pre, dec, n, steps, acc = pre + p, dec + d, n + nn, steps + s, acc + ac
            return outs, pre, dec, n, steps, acc

        kinds = [0] + ks
        best: dict[int, tuple] = {}
        for _ in range(a.repeats):
            for k in kinds:
                r = run(k)
                if k not in best or r[2] / max(r[3], 1) < best[k][2] / max(best[k][3], 1):
                    best[k] = r
        plain_out = best[0][0]

        def rate(r) -> float:
            return r[3] / r[2] if r[2] > 0 else float("nan")

        print(f"\nbatch {B}: {len(groups)} x {len(groups[0])} prompts, {best[0][3]} decoded tokens")
        print(
            f"{'run':<22}{'decode tok/s':>14}{'x plain':>9}{'tokens/step':>13}{'drafts acc.':>13}{'same out':>10}"
            f"{'prefill s':>11}"
        )
        base = rate(best[0])
        print(f"{'plain':<22}{base:>14.1f}{1.0:>9.2f}{1.0:>13.2f}{'':>13}{'':>10}{best[0][1]:>11.3f}")
        for k in ks:
            r = best[k]
            tps = 1 + r[5] / r[4] if r[4] else float("nan")
            acc = r[5] / r[4] / k if r[4] else float("nan")
            print(
                f"{f'mtp k={k}':<22}{rate(r):>14.1f}{rate(r) / base:>9.2f}{tps:>13.2f}"
                f"{acc:>12.0%} {str(r[0] == plain_out):>9}{r[1]:>11.3f}"
            )


if __name__ == "__main__":
    main()
