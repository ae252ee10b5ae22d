"""Train a small Step-architecture executor on generated agent traces, on the engine's own PyTorch model.

    python -m training.train --model step-nano --out models/step-nano --tasks 3000 --epochs 1 --seed 0

Pipeline (all seeded): task generators (`training.tasks`) -> traces with real tool results
(`training.traces`) -> one sample per assistant turn, rendered exactly as the embedded endpoint renders
it -> project BPE tokenizer (`training.tokenizer`) -> a freshly initialised Step3p7 checkpoint
(`training.checkpoint.init_checkpoint`) -> copy drills first, their context growing (`training.drills`), then
the traces with a drill batch after every few trace batches -> AdamW with linear warm-up and cosine decay, cross-entropy on
the assistant's tokens only -> checkpoint in the Step layout (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template), `train_log.json`, `loss.png`, and a model
card `README.md`, with held-out metrics from `training.evaluate`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from advisor.engine.model.cache import KVCache, uncached_meta
from advisor.engine.model.layers import rope_tables
from advisor.engine.text.tokenizer import build_step_tokenizer

from training.card import write_card
from training.checkpoint import (
    PRESETS,
    init_checkpoint,
    load_trainable,
    reset_norm_caches,
    save_checkpoint,
    text_config,
    trainable,
)
from training.drills import drill_batch, filler_cap, kinds_at
from training.evaluate import evaluate
from training.runlog import HELD_OUT_SEED_OFFSET, TrainConfig, TrainLog, earlier_runs, write_log
from training.tasks import generate
from training.tokenizer import build_project_tokenizer
from training.traces import packed, run_traces, samples


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def continue_from(checkpoint: Path, tok_dir: Path, dst: Path) -> Path:
    """A copy of `checkpoint` to start from; its tokenizer must be the one this data was encoded with."""
    theirs, ours = checkpoint / "tokenizer.json", tok_dir / "tokenizer.json"
    if not theirs.is_file():
        raise FileNotFoundError(f"--init {checkpoint}: no tokenizer.json there")
    if theirs.read_bytes() != ours.read_bytes():
        raise ValueError(
            f"--init {checkpoint}: its tokenizer differs from the one built for this data "
            "(same --tasks, --families, --seed and --vocab-size needed)"
        )
    shutil.copytree(checkpoint, dst)
    return dst


def total_steps(trace_steps: int, cfg: TrainConfig) -> int:
    """The drill warm-up, the trace batches, and one drill batch after every `drill_every` of them."""
    mixed = trace_steps // cfg.drill_every if cfg.drill_every > 0 else 0
    return cfg.drill_warmup + trace_steps + mixed


def is_drill_step(step: int, cfg: TrainConfig) -> bool:
    if step < cfg.drill_warmup:
        return True
    return cfg.drill_every > 0 and (step - cfg.drill_warmup) % (cfg.drill_every + 1) == cfg.drill_every


def build_data(cfg: TrainConfig, work: Path) -> tuple[Path, list[tuple[list[int], list[int]]], dict]:
    """Traces -> samples -> project tokenizer (in work/tokenizer) -> encoded examples."""
    tasks = list(generate(cfg.tasks, cfg.seed, tuple(cfg.families), cfg.recovery_every, cfg.redo_every))
    traces = asyncio.run(run_traces(tasks, cfg.effort))
    boot = build_step_tokenizer(work / "bootstrap_tokenizer")  # the default Step template; renders only
    per_trace = [samples(tr, boot) for tr in traces]
    all_samples = [s for group in per_trace for s in group]
    tok_dir = work / "tokenizer"
    if cfg.init:  # a continued run keeps its model's tokenizer, whatever the data now is
        tok_dir.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (Path(cfg.init) / name).is_file():
                raise FileNotFoundError(f"--init {cfg.init}: no {name} there")
            shutil.copy2(Path(cfg.init) / name, tok_dir / name)
        tok = _tok(tok_dir)
    else:
        tok = build_project_tokenizer(tok_dir, all_samples, cfg.vocab_size, cfg.digit_group)
    if tok.chat_template != boot.chat_template:
        raise RuntimeError(
            "the project tokenizer's chat template differs from the one the samples were rendered with"
        )
    examples = []
    for group in per_trace:
        for ids, labels in packed(tok, group):
            if len(ids) <= cfg.max_len:
                examples.append((ids, labels))
    n_tok = sum(len(i) for i, _ in examples)
    n_target = sum(sum(1 for x in lab if x != -100) for _, lab in examples)
    stats = {
        "tasks": len(tasks),
        "families": list(cfg.families),
        "samples": len(all_samples),
        "sequences": len(examples),  # samples of one trace packed together where they line up
        "tokens": n_tok,
        "target_tokens": n_target,
        "mean_len": round(n_tok / max(1, len(examples)), 1),
        "vocab_size": tok.vocab_size,
    }
    return tok_dir, examples, stats


def batches(examples, batch_size: int, rng: random.Random, key_tokens: int = 128):
    """Length-bucketed batches (little padding), in a seeded random order. Sequences are first grouped by
    their opening tokens (the system prompt names the tools), so a batch's rows share that prefix and
    `hidden_of` runs it once."""
    order = sorted(
        range(len(examples)),
        key=lambda i: (examples[i][0][:key_tokens], len(examples[i][0]), rng.random()),
    )
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return groups


def collate(examples, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), T), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        x, y = examples[i]
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    return ids, labels


def shared_prefix_len(ids: torch.Tensor) -> int:
    """How many leading tokens every row of `ids` [B, T] has in common (at most T - 1)."""
    same = (ids == ids[:1]).all(0)
    differ = (~same).nonzero()
    n = int(differ[0]) if len(differ) else ids.shape[1]
    return min(n, ids.shape[1] - 1)


def _run_layers(model, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    meta = cache.plan(positions) if cache is not None else uncached_meta(model.cfg, positions)
    x = model.embed_tokens(ids)
    ropes = rope_tables(model.inv_freq, positions, x.dtype)
    for i, layer in enumerate(model.layers):
        t = layer.attention_type
        x = layer(x, ropes[t], meta.types[t], cache, i)
    return x


def hidden_of(model, ids: torch.Tensor, min_shared: int = 64) -> torch.Tensor:
    """[B, T] -> final hidden states [B, T, H]: `StepTextModel.forward` up to (not including) the final norm
    and head, so the loss can run the head on the assistant positions only (about 5% of the positions; the
    head is [vocab, hidden], as wide as a layer's MoE at step-nano's size).

    Rows that open with the same tokens (the system prompt and tool schemas: about two thirds of a trace)
    run that prefix once: one row through the engine's KV cache, the cache repeated to every row, then the
    rest of each row as a chunked prefill against it. Same values and gradients as the plain forward (the
    prefix's keys and values collect every row's gradient), about 3x faster on the traces.
    `tests/training/test_train.py` checks both paths against the engine's forward."""
    B, T = ids.shape
    reset_norm_caches(model)
    shared = shared_prefix_len(ids) if B > 1 else 0
    if shared < min_shared:
        return _run_layers(model, ids, torch.arange(T, device=ids.device).expand(B, T), None)
    dtype = model.embed.dtype
    cache = KVCache(model.cfg, 1, T, dtype, ids.device)
    head = _run_layers(model, ids[:1, :shared], torch.arange(shared, device=ids.device)[None], cache)
    cache.repeat_rows(B)
    rest = torch.arange(shared, T, device=ids.device).expand(B, T - shared)
    tail = _run_layers(model, ids[:, shared:], rest, cache)
    return torch.cat([head.expand(B, -1, -1), tail], dim=1)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T, vocab] with the current weights."""
    return model.lm_head(model.norm(hidden_of(model, ids)))


def loss_of(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (assistant) positions; right padding never reaches them."""
    h = hidden_of(model, ids)[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(model.norm(h[keep]))
    return F.cross_entropy(logits.float(), target[keep])


def train(cfg: TrainConfig) -> TrainLog:
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # seeds CUDA too
    work = Path(cfg.work) / cfg.model
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out = Path(cfg.out)
    log = TrainLog(config=asdict(cfg))
    t0 = time.monotonic()

    tok_dir, examples, log.data = build_data(cfg, work)
    _say(f"data: {log.data} ({time.monotonic() - t0:.0f} s)")
    if cfg.init:
        init_dir = continue_from(Path(cfg.init), tok_dir, work / "init")
        log.earlier = earlier_runs(Path(cfg.init))  # the card gives every run's command and loss
    else:
        init_dir = init_checkpoint(work / "init", text_config(cfg.model, _tok(tok_dir)), tok_dir, cfg.seed)
    model = load_trainable(init_dir, cfg.device)
    model.train()
    log.params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    rng = random.Random(cfg.seed)
    drill_rng = random.Random(cfg.seed + 1)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    trace_steps = max(1, int(per_epoch * cfg.epochs))
    total = total_steps(trace_steps, cfg)
    tok = _tok(tok_dir)
    pad_id = tok.pad_token_id or 0
    fillers = [ids for ids, _ in examples]
    step, running, drill_running, plan = 0, [], [], []
    t_train = time.monotonic()
    with trainable(model):
        while step < total:
            is_drill = is_drill_step(step, cfg)
            if is_drill:
                cap = filler_cap(step, cfg.drill_warmup, 16, cfg.drill_max_filler)
                kinds = kinds_at(step, cfg.drill_warmup)
                group = drill_batch(drill_rng, tok, fillers, cap, cfg.drill_batch_tokens, kinds)
                ids, labels = collate(group, list(range(len(group))), pad_id)
            else:
                if not plan:
                    plan = batches(examples, cfg.batch_size, rng)
                ids, labels = collate(examples, plan.pop(), pad_id)
            ids, labels = ids.to(cfg.device), labels.to(cfg.device)
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = loss_of(model, ids, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            (drill_running if is_drill else running).append(loss.item())
            step += 1
            if step % cfg.log_every == 0 or step == total:
                if running:
                    log.steps.append(step)
                    log.loss.append(sum(running) / len(running))
                    log.lr.append(lr)
                if drill_running:
                    log.drill_steps.append(step)
                    log.drill_loss.append(sum(drill_running) / len(drill_running))
                shown = ([f"traces {log.loss[-1]:.4f}"] if running else []) + (
                    [f"drills {log.drill_loss[-1]:.4f}"] if drill_running else []
                )
                running, drill_running = [], []
                _say(
                    f"step {step}/{total} loss {' '.join(shown)} lr {lr:.2e} "
                    f"({time.monotonic() - t_train:.0f} s)"
                )
            if cfg.max_minutes and time.monotonic() - t_train > cfg.max_minutes * 60:
                _say(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
                break
    log.wall_s = round(time.monotonic() - t0, 1)
    model.eval()
    dtype = getattr(torch, cfg.save_dtype)
    if out.exists():
        shutil.rmtree(out)
    save_checkpoint(model, init_dir, out, dtype)
    write_log(out, log)
    return log


def _tok(path: Path):
    from advisor.engine.text.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    d = TrainConfig()
    p.add_argument("--model", choices=sorted(PRESETS), default=d.model)
    p.add_argument("--out", default=None, help="checkpoint directory (default models/<model>)")
    p.add_argument("--work", default=d.work, help="scratch directory for data, tokenizer, init weights")
    p.add_argument("--families", default=",".join(d.families))
    for name in (
        "tasks",
        "held_out",
        "vocab_size",
        "digit_group",
        "batch_size",
        "warmup_steps",
        "max_len",
        "seed",
        "threads",
        "log_every",
        "recovery_every",
        "redo_every",
        "drill_warmup",
        "drill_every",
        "drill_batch_tokens",
        "drill_max_filler",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("epochs", "lr", "min_lr_ratio", "weight_decay", "grad_clip", "max_minutes"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--init", default=d.init, help="continue from this checkpoint directory (same tokenizer)")
    p.add_argument("--device", default=d.device, help="torch device to train on (cpu, cuda)")
    p.add_argument("--effort", choices=("low", "medium", "high"), default=d.effort)
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default=d.save_dtype)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation and the model card")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        **{k: v for k, v in vars(a).items() if k in TrainConfig.__dataclass_fields__ and k != "families"}
    )
    cfg.families = tuple(f for f in a.families.split(",") if f)
    cfg.out = a.out or f"models/{a.model}"
    cfg._no_eval = a.no_eval  # type: ignore[attr-defined]
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    log = train(cfg)
    if not getattr(cfg, "_no_eval", False):
        log.metrics = evaluate(
            Path(cfg.out),
            n=cfg.held_out,
            seed=cfg.seed + HELD_OUT_SEED_OFFSET,
            families=cfg.families,
            effort=cfg.effort,
        )
        _say(f"held-out: {log.metrics}")
        write_log(Path(cfg.out), log)
        write_card(Path(cfg.out), log, argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
