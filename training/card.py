"""The model card (README.md) and loss curve (loss.png) written beside a trained checkpoint."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import matplotlib

from training.evaluate import evaluate
from training.heldout import BEGIN, END
from training.runlog import HELD_OUT_SEED_OFFSET, TrainLog, earlier_runs, read_log, run_command, write_log

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _last_step(run: dict) -> int:
    """The run's last logged step, trace or drill (0 when it kept no step log)."""
    return max((run.get("steps") or [0])[-1:] + (run.get("drill_steps") or [0])[-1:])


def plot_loss(runs: list[dict], path: Path, title: str) -> None:
    """One curve over all the runs (each continuing the one before), steps counted from the first."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    offset, labelled = 0, False
    for i, run in enumerate(runs):
        steps, drill_steps = run.get("steps") or [], run.get("drill_steps") or []
        if not steps and not drill_steps:
            continue
        if i and offset:
            ax.axvline(offset, color="grey", lw=0.8, ls=":")
        ax.plot(
            [offset + s for s in steps],
            run.get("loss") or [],
            color="C0",
            label=None if labelled else "agent traces",
        )
        if drill_steps:
            ax.plot(
                [offset + s for s in drill_steps],
                run.get("drill_loss") or [],
                color="C1",
                alpha=0.7,
                label=None if labelled else "copy drills",
            )
        labelled = True
        offset += _last_step(run)
    ax.legend()
    ax.set_xlabel("step (dotted: a continued run starts)" if len(runs) > 1 else "step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_lines(runs: list[dict]) -> list[str]:
    """Every run's command (a continued run's --init is the checkpoint of the run before), steps and time."""
    lines = []
    for i, run in enumerate(runs):
        if run["config"].get("grow"):
            done = f"grown into the {run['config']['model']} shape, same function (training/grow.py)"
        elif run.get("wall_s"):
            done = f"{_last_step(run)} steps, {run['wall_s']:.0f} s wall"
        else:
            done = "step log not kept"
        lines += [f"{i + 1}. {done}:", "", f"   ```\n   {run_command(run['config'], i)}\n   ```", ""]
    return lines


def write_card(out: Path, log: Any, argv: list[str] | None = None) -> None:
    cfg = log.config
    this = {
        "config": cfg,
        **{k: getattr(log, k) for k in ("steps", "loss", "drill_steps", "drill_loss", "wall_s")},
    }
    runs = [*log.earlier, this]
    plot_loss(runs, out / "loss.png", f"{cfg['model']} training loss")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    text = config["text_config"]
    d, m = log.data, log.metrics
    cmd = (
        "python -m training.train " + " ".join(shlex.quote(a) for a in argv)
        if argv is not None
        else run_command(cfg, len(log.earlier))
    )
    large = cfg["model"].endswith("-large")
    role = "frontier" if large else "executor"
    pair = (
        "the executor is models/step-nano; priced as a frontier model in examples/quickstart/advisor.yaml"
        if large
        else "the frontier is models/step-nano-large; priced as Step 3.7 Flash in examples/quickstart/advisor.yaml"
    )
    price = (
        "{input: 5.0, cached_input: 0.5, cache_write: 6.25, output: 25.0}"
        if large
        else ("{input: 0.20, cached_input: 0.04, output: 1.15}")
    )
    lines = [
        f"# {cfg['model']}",
        "",
        f"A small Step 3.7 Flash-architecture model trained in this repository as the embedded {role} stand-in "
        f"({pair}). It is tiny and narrow: it has only seen the generated task families below, and is no "
        "substitute for the real Step 3.7 Flash weights, a frontier model, or an OpenAI-compatible endpoint.",
        "",
        "## Architecture",
        "",
        f"- {log.params:,} text parameters; hidden {text['hidden_size']}, {text['num_hidden_layers']} layers "
        f"({', '.join(text['layer_types'])}), sliding window {text['sliding_window']}",
        f"- MoE with shared expert: {text['n_routed_experts']} routed experts, top-{text['num_experts_per_tok']}, "
        "sigmoid router with selection bias; head-wise attention gate; partial RoPE on full-attention layers",
        "- a tiny untrained vision tower (the checkpoint layout only: these models cannot read pixels; their"
        " endpoints say `vision: false`, so images reach them as the lines naming them, and they work with"
        " images through the `find_regions` tool's text)",
        f"- weights stored in {config.get('dtype', 'float32')}",
        f"- vocabulary {d.get('vocab_size')}: byte-level BPE trained on the traces, with all Step chat markers; "
        + (
            f"runs of digits cut into groups of up to {cfg['digit_group']} (every group one token); "
            "every newline its own token"
            if cfg.get("digit_group", 1) > 1
            else "every digit and every newline is its own token"
        ),
        "",
        "## Data",
        "",
        f"- {d.get('tasks')} generated tasks ({', '.join(d.get('families', []))}), seed {cfg['seed']}, effort "
        f"{cfg['effort']}; traces played with the real tools",
        f"- every {cfg.get('recovery_every') or 'no'}th task played as a recovery: a wrong answer (history only), the "
        "check's rejection, on every other one a frontier takeover, then the right answer"
        if cfg.get("recovery_every")
        else "- no recovery traces",
        *(
            [
                f"- every {cfg['redo_every']}th pair of recoveries from a miscopied program (one digit of a number "
                "copied from the goal or a file changed): after the rejection the calls run again, then the answer"
            ]
            if cfg.get("recovery_every") and cfg.get("redo_every")
            else []
        ),
        f"- {d.get('samples')} assistant-turn samples in {d.get('sequences', d.get('samples'))} sequences (a task's "
        f"turns packed into one where they line up), {d.get('tokens'):,} tokens, {d.get('target_tokens'):,} of "
        f"them trained on (assistant tokens only), mean length {d.get('mean_len')}",
        (
            f"- copy drills (`training.drills`): {cfg['drill_warmup']} drill-only steps first, the filler before "
            f"the copy growing to {cfg['drill_max_filler']} tokens, then "
            + (
                f"one drill batch after every {cfg['drill_every']} trace batches"
                if cfg.get("drill_every")
                else "none between the trace batches"
            )
            if cfg.get("drill_warmup") or cfg.get("drill_every")
            else "- no copy drills"
        ),
        "",
        "## Training",
        "",
        *(
            [f"```\n{cmd}\n```", ""]
            if len(runs) == 1
            else [
                f"In {len(runs)} runs, each continuing the checkpoint of the one before (same tokenizer and task "
                "generators; the seed is in each command"
                + (
                    "; the runs before the grow step trained the smaller model it was grown from"
                    if any(r["config"].get("grow") for r in runs)
                    else ""
                )
                + "), the last one:",
                "",
                f"```\n{cmd}\n```",
                "",
                "All the runs:",
                "",
                *run_lines(runs),
            ]
        ),
        ("The last run: " if len(runs) > 1 else "")
        + f"AdamW (lr {cfg['lr']}, betas 0.9/0.95, weight decay {cfg['weight_decay']}), {cfg['warmup_steps']} warm-up "
        f"steps then cosine to {cfg['min_lr_ratio']} x lr, batch {cfg['batch_size']}, {log.steps[-1] if log.steps else 0} "
        f"steps, {cfg['threads']} CPU thread(s), {log.wall_s:.0f} s wall. Loss over the last tenth of the logged "
        f"windows: {sum(log.loss[-max(1, len(log.loss) // 10) :]) / max(1, len(log.loss) // 10):.4f}."
        if log.loss
        else "No steps logged.",
        "",
        "![loss](loss.png)",
        "",
        "## Held-out metrics (turn level, greedy)",
        "",
        "`python -m training.evaluate`: every assistant turn of held-out tasks (another seed stream), prompted "
        "exactly as the embedded endpoint prompts; tool turns are scored on tool names and arguments, final "
        "turns on the answer.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in m.items():
        lines.append(f"| {k} | {v} |")
    lines += [
        "",
        "## Use",
        "",
        "In advisor.yaml (or a task's `endpoints:`), an endpoint on this checkpoint directory:",
        "",
        "```yaml",
        "endpoints:",
        f"  {'frontier' if large else 'flash'}:",
        "    provider: embedded",
        f"    model: {out.name}      # a shipped name, or a path to a checkpoint directory",
        f"    price: {price}",
        "```",
    ]
    card = out / "README.md"
    if card.is_file():  # keep the held-out agent table training.heldout wrote into the old card
        old = card.read_text(encoding="utf-8")
        if BEGIN in old and END in old:
            block = old[old.index(BEGIN) : old.index(END) + len(END)]
            lines += ["", "## Held-out agent results (`advisor eval`)", "", block]
    card.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """(Re)write a checkpoint's card from its train_log.json, evaluating it first when asked (for runs
    trained with --no-eval)."""
    p = argparse.ArgumentParser(prog="python -m training.card", description=main.__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--evaluate", action="store_true", help="run training.evaluate and keep its metrics")
    a = p.parse_args(argv)
    d = read_log(a.checkpoint)
    if d is None:
        raise SystemExit(f"python -m training.card: no train_log.json in {a.checkpoint}")
    log = TrainLog(**{k: v for k, v in d.items() if k in TrainLog.__dataclass_fields__})
    log.earlier = earlier_runs(a.checkpoint)[:-1]  # the last entry is this run itself
    log.config.pop("init_config", None)
    if a.evaluate:
        cfg = log.config
        log.metrics = evaluate(
            a.checkpoint,
            n=cfg["held_out"],
            seed=cfg["seed"] + HELD_OUT_SEED_OFFSET,
            families=tuple(cfg["families"]),
            effort=cfg["effort"],
        )
    write_log(a.checkpoint, log)
    write_card(a.checkpoint, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
