"""Train a shipped checkpoint's multi-token-prediction (MTP) layers, the main model frozen.

    python -m training.mtp models/step-nano --tasks 300 --seed 4 --max-minutes 12

The same task families and trace rendering as `training.train` (`build_data`, the checkpoint's own
tokenizer), a fresh seeded stream of tasks. The main model runs without gradients (`hidden_of`, its last
layer's stream before the final norm: what the engine drafts from); the k MTP layers
(`advisor.engine.model.mtp.mtp_logits`, the definition over whole sequences) learn to predict the token j + 1
ahead at every position whose target is an assistant token, loss summed over the depths. Each layer
starts with its head and head norm copied from the main model's, the rest at transformers' init scale.
The checkpoint is rewritten in place with the layers under the published names (`model.layers.{N+j}.*`:
`eh_proj`, `enorm`, `hnorm`, `transformer.shared_head.{norm,output}`, a dense block) and the config's
`num_nextn_predict_layers`, `mtp_layer_types`, `mtp_mlp_layer_types`; its main weights are untouched
(copied byte for byte), `mtp_log.json` and `mtp_loss.png` beside them, and the model card gets a section
with the command, the time and the curve.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from advisor.engine.model.backbone import MTPLayer
from advisor.engine.model.config import load_config
from advisor.engine.model.mtp import head_logits, mtp_streams
from safetensors.torch import load_file, save_file

from training.checkpoint import checkpoint_tensors, load_trainable, reset_norm_caches
from training.runlog import TrainConfig
from training.train import batches, build_data, collate, hidden_of

CARD_BEGIN, CARD_END = "<!-- mtp:begin -->", "<!-- mtp:end -->"
FAMILIES = ("arith", "lookup", "order", "evals.arithmetic", "evals.lookup", "evals.multistep", "evals.marks")


def with_mtp_config(ckpt: Path, k: int, dst: Path) -> Path:
    """ckpt's config.json with k MTP layers declared (sliding attention, dense MLP, as the release's)."""
    cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    text = cfg["text_config"]
    text["num_nextn_predict_layers"] = k
    text["mtp_layer_types"] = ["sliding_attention"] * k
    text["mtp_mlp_layer_types"] = ["dense"] * k
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return dst


def init_mtp(model, tc, seed: int) -> None:
    """Fresh MTP layers on the model: matrices N(0, 0.02) (transformers' init), zero-centred norms at 0,
    the head and its norm copied from the main model's."""
    g = torch.Generator().manual_seed(seed)
    layers = torch.nn.ModuleList(MTPLayer(tc, s) for s in tc.mtp_layers)
    for layer in layers:
        for p in layer.parameters():
            with torch.no_grad():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                else:
                    p.zero_()
            p.requires_grad_(True)
        with torch.no_grad():
            layer.head.copy_(model.lm_head.weight)
            layer.head_norm.weight.copy_(model.norm.weight)
    model.mtp = layers
    model.cfg = tc


def receptive_field(tc) -> int | None:
    """How far back the MTP layers can see, all sliding: k * (window - 1) positions (None: unbounded)."""
    if not tc.sliding_window or any(s.attention != "sliding_attention" for s in tc.mtp_layers):
        return None
    return len(tc.mtp_layers) * (tc.sliding_window - 1)


def mtp_loss(
    model, h: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, start: int
) -> tuple[torch.Tensor, list[float]]:
    """Sum over depths of the cross-entropy of layer j's prediction of token p + j + 1, on assistant
    targets (the head runs there only); with each depth's loss. h, ids, labels from position `start`."""
    reset_norm_caches(model)
    total, per = 0.0, []
    for j, stream in enumerate(mtp_streams(model, h, ids, start=start), start=1):
        n = stream.shape[1] - 1  # the last position's target lies past the sequence
        target = labels[:, j + 1 : j + 1 + n]
        keep = target != -100
        logits = head_logits(model.mtp[j - 1], stream[:, :n][keep])
        loss = F.cross_entropy(logits.float(), target[keep])
        total = total + loss
        per.append(loss.item())
    return total, per


def main_hidden(model, ids: torch.Tensor, labels: torch.Tensor, reach: int | None):
    """The frozen main model's hidden states, from the first position an assistant target can see through
    the MTP layers (sliding windows: the rest cannot change the loss); (h, ids, labels, start)."""
    with torch.no_grad():
        h = hidden_of(model, ids)
    start = 0
    if reach is not None:
        targets = (labels != -100).any(0).nonzero()
        if len(targets):
            start = max(0, int(targets[0]) - 2 - len(model.mtp) - reach)
    return h[:, start:].contiguous(), ids[:, start:], labels[:, start:], start


def save(model, ckpt: Path, config_dir: Path, dtype: torch.dtype) -> None:
    """The MTP tensors (and the config declaring them) into ckpt; its other tensors as they were."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    n = model.cfg.num_hidden_layers
    prefixes = tuple(f"model.layers.{n + j}." for j in range(len(model.mtp)))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    tensors.update({k: v for k, v in checkpoint_tensors(model, dtype).items() if k.startswith(prefixes)})
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(config_dir / "config.json", ckpt / "config.json")


def plot(log: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for j, losses in enumerate(zip(*log["depth_loss"], strict=True), start=1):
        ax.plot(log["steps"], losses, label=f"MTP layer {j} (token +{j + 1})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def card_section(log: dict) -> str:
    last = log["depth_loss"][-1] if log["depth_loss"] else []
    first = log["depth_loss"][0] if log["depth_loss"] else []
    rows = "\n".join(
        f"| {j} | token +{j + 1} | {a:.3f} | {b:.3f} |"
        for j, (a, b) in enumerate(zip(first, last, strict=True), start=1)
    )
    return f"""{CARD_BEGIN}
## MTP layers (speculative decoding)

{log["k"]} multi-token-prediction layers (`model.layers.{log["first_layer"]}` to
`model.layers.{log["first_layer"] + log["k"] - 1}`, {log["params"]:,} parameters, stored in {log["dtype"]}),
trained with the main model frozen (`training/mtp.py`), {log["steps_done"]} steps in
{log["train_s"] / 60:.1f} min on {log["threads"]} CPU thread(s) ({log["wall_s"] / 60:.1f} min with the data),
{log["data"]["tasks"]} fresh tasks of the training families (seed {log["seed"]}):

```
{log["command"]}
```

The same weights again (seeded; a step count instead of the time limit):
`{log.get("rerun", log["command"])}`

Loss per depth (cross-entropy on assistant tokens, mean of the first and last {log["log_every"]} steps;
`mtp_loss.png`, `mtp_log.json`):

| layer | predicts | first | last |
|---|---|---|---|
{rows}

Use: `LLM.from_pretrained(path, speculative="mtp", num_speculative_tokens=k)`; measured by
`python -m training.bench_mtp`.
{CARD_END}
"""


def write_card_section(ckpt: Path, log: dict) -> None:
    card = ckpt / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    section = card_section(log)
    if CARD_BEGIN in text and CARD_END in text:
        a, b = text.index(CARD_BEGIN), text.index(CARD_END) + len(CARD_END)
        text = text[:a] + section.strip() + text[b:]
    else:
        text = text.rstrip() + "\n\n" + section
    card.write_text(text, encoding="utf-8")


def train_mtp(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    ckpt = Path(args.checkpoint)
    work = Path(args.work) / f"mtp-{ckpt.name}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    cfg = TrainConfig(
        tasks=args.tasks,
        families=tuple(args.families.split(",")),
        seed=args.seed,
        init=str(ckpt),
        max_len=args.max_len,
    )
    _, examples, data = build_data(cfg, work)
    print(f"data: {data} ({time.monotonic() - t0:.0f} s)", flush=True)
    model = load_trainable(ckpt)
    for p in model.parameters():
        p.requires_grad_(False)
    tc = load_config(with_mtp_config(ckpt, args.k, work / "config")).text
    init_mtp(model, tc, args.seed)
    params = [p for p in model.mtp.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    rng = random.Random(args.seed)
    per_epoch = math.ceil(len(examples) / args.batch_size)
    total = max(1, int(per_epoch * args.epochs))
    pad_id = 0
    log: dict = {
        "k": args.k,
        "first_layer": tc.num_hidden_layers,
        "params": sum(p.numel() for p in params),
        "dtype": args.save_dtype,
        "seed": args.seed,
        "threads": args.threads,
        "log_every": args.log_every,
        "data": data,
        "command": "python -m training.mtp " + shlex.join(args.argv),
        "steps": [],
        "depth_loss": [],
        "lr": [],
    }
    plan: list = []
    running: list[list[float]] = []
    step = 0
    reach = receptive_field(tc)
    hidden: dict[tuple[int, ...], tuple] = {}  # the frozen model's states per batch, kept across epochs
    t_train = time.monotonic()
    while step < total:
        if not plan:
            plan = batches(examples, args.batch_size, rng)
        idx = plan.pop()
        key = tuple(sorted(idx))
        if key not in hidden:
            ids, labels = collate(examples, sorted(idx), pad_id)
            hidden[key] = main_hidden(model, ids, labels, reach)
        h, ids, labels, start = hidden[key]
        warm = min(1.0, (step + 1) / args.warmup_steps)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, per = mtp_loss(model, h, ids, labels, start)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(per)
        step += 1
        if step % args.log_every == 0 or step == total:
            mean = [round(sum(c) / len(c), 4) for c in zip(*running, strict=True)]
            log["steps"].append(step)
            log["depth_loss"].append(mean)
            log["lr"].append(lr)
            running = []
            print(
                f"step {step}/{total} loss {mean} lr {lr:.2e} ({time.monotonic() - t_train:.0f} s)",
                flush=True,
            )
        if args.max_steps and step >= args.max_steps:
            break
        if args.max_minutes and time.monotonic() - t_train > args.max_minutes * 60:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    log["steps_done"] = step
    # The same run again, whatever the machine's speed: the schedule is the epochs', the stop a step count.
    rerun = [a for a in args.argv]
    if "--max-minutes" in rerun:
        i = rerun.index("--max-minutes")
        del rerun[i : i + 2]
    if "--max-steps" not in rerun:
        rerun += ["--max-steps", str(step)]
    log["rerun"] = "python -m training.mtp " + shlex.join(rerun)
    log["train_s"] = round(time.monotonic() - t_train, 1)
    log["wall_s"] = round(time.monotonic() - t0, 1)
    model.eval()
    save(model, ckpt, work / "config", getattr(torch, args.save_dtype))
    (ckpt / "mtp_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    plot(log, ckpt / "mtp_loss.png", f"{ckpt.name}: MTP layers, main model frozen")
    write_card_section(ckpt, log)
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m training.mtp", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint directory; its MTP layers are (re)written in place")
    p.add_argument("--k", type=int, default=3, help="MTP layers (the release has 3)")
    p.add_argument("--tasks", type=int, default=300)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this long")
    p.add_argument("--max-steps", type=int, default=0, help="stop (and save) after this many steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--save-dtype", default=None, help="default: the checkpoint's own")
    p.add_argument("--work", default="build/training")
    args = p.parse_args(argv)
    if args.save_dtype is None:
        cfg = json.loads((Path(args.checkpoint) / "config.json").read_text(encoding="utf-8"))
        args.save_dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    train_mtp(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
