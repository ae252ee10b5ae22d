"""Decode speed with and without MTP speculation, and how many drafts the model accepts, on real prompts.

    python -m training.bench_mtp [--model models/step-nano] [--batches 1 16] [--ks 1 2 3]

Prompts are what the embedded endpoint sends on real task traces: every assistant turn of the Quickstart's
task (`training.quickstart`) and of held-out tasks of the training families (`training.evaluate`'s stream,
seeds from 100 003), greedy, stopping at the checkpoint's eos, up to `--decode` new tokens. For each batch
size the same prompts run plain (`LLM.generate_static`, the same static batches the speculative path uses)
and with k drafts per verify step, alternating, best of `--repeats`; greedy output is checked to be
identical. (The serving core is not compared: its prefix cache serves the repeated prompts.) Decode tokens/s counts the new tokens after the
first (the prefill's) over the time after the prefill (a `max_new_tokens=1` run of the same batch; with
speculation that prefill includes the MTP layers' own over the prompt, printed beside it).
"Tokens per step" is what each verify step of a row adds: its accepted drafts plus the model's own token.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from engine import LLM


def task_prompts(llm: LLM, n_tasks: int) -> list[list[int]]:
    """Prompt ids of every assistant turn: the Quickstart's task first, then `n_tasks` held-out tasks."""
    from training.quickstart import SEED_BASE, candidate
    from training.runlog import HELD_OUT_SEED_OFFSET
    from training.tasks import FAMILIES, generate
    from training.traces import run_traces, samples

    qs_index = 5  # examples/quickstart: seed 500 005 (training/README.md)
    assert SEED_BASE + qs_index == 500_005
    tasks = [candidate(qs_index)] + list(generate(n_tasks, HELD_OUT_SEED_OFFSET, FAMILIES))
    traces = asyncio.run(run_traces(tasks, "low"))
    tok = llm.tokenizer
    return [tok.encode(s.prompt) for tr in traces for s in samples(tr, tok)]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
    prompts = task_prompts(llm, a.tasks)
    stops = llm.eos_token_ids
    print(
        f"{a.model}: {len(prompts)} prompts from {a.tasks + 1} tasks (mean {sum(map(len, prompts)) / len(prompts):.0f}"
        f" tokens), greedy up to {a.decode} new tokens, {torch.get_num_threads()} threads, best of {a.repeats}"
    )
    for B in a.batches:
        groups = [[p] for p in prompts[: a.rows_at_1]] if B == 1 else [prompts[:B]]
        plain_out = [llm.generate_static(g, a.decode, stop_token_ids=stops) for g in groups]
        n_new = sum(len(r) - 1 for out in plain_out for r in out)  # after the prefill's token

        def run(kind, k=None, gs=groups):
            for g in gs:
                if kind == "prefill":
                    llm.generate_static(g, 1, stop_token_ids=stops)
                elif kind == "mtp-prefill":
                    llm.generate(g, 1, stop_token_ids=stops, speculative="mtp", num_speculative_tokens=k)
                elif kind == "plain":
                    llm.generate_static(g, a.decode, stop_token_ids=stops)
                else:
                    llm.generate(
                        g, a.decode, stop_token_ids=stops, speculative="mtp", num_speculative_tokens=k
                    )

        kinds = [("prefill", None), ("plain", None)]
        kinds += [kk for k in ks for kk in (("mtp-prefill", k), ("mtp", k))]
        best = {kk: float("inf") for kk in kinds}
        for _ in range(a.repeats):
            for kk in kinds:
                best[kk] = min(best[kk], _time(lambda kk=kk: run(*kk)))
        pre = best[("prefill", None)]

        def per_s(total: float, prefill: float, n_new: int = n_new) -> float:
            # nan when the machine's load made the prefill alone slower than the whole run: rerun
            return n_new / (total - prefill) if total > prefill else float("nan")

        rate = {("plain", None): per_s(best[("plain", None)], pre)}
        for k in ks:
            rate[("mtp", k)] = per_s(best[("mtp", k)], best[("mtp-prefill", k)])
        print(
            f"\nbatch {B}: {len(groups)} x {len(groups[0])} prompts, {n_new} decoded tokens, prefill {pre:.3f} s"
        )
        print(
            f"{'run':<26}{'decode tok/s':>14}{'x plain':>9}{'tokens/step':>13}{'drafts acc.':>13}{'same out':>10}"
            f"{'prefill s':>11}"
        )
        print(
            f"{'plain (static batches)':<26}{rate[('plain', None)]:>14.1f}{1.0:>9.2f}{1.0:>13.2f}{'':>13}{'':>10}"
        )
        for k in ks:
            acc = steps = 0
            same = True
            for g, want in zip(groups, plain_out, strict=True):
                got = llm.generate(
                    g, a.decode, stop_token_ids=stops, speculative="mtp", num_speculative_tokens=k
                )
                same &= got == want
                s = llm.last_speculation
                acc, steps = acc + s.accepted, steps + s.row_steps
            r = rate[("mtp", k)]
            print(
                f"{f'mtp k={k}':<26}{r:>14.1f}{r / rate[('plain', None)]:>9.2f}{1 + acc / steps:>13.2f}"
                f"{acc / steps / k:>12.0%} {str(same):>9}{best[('mtp-prefill', k)]:>11.3f}"
            )


if __name__ == "__main__":
    main()
