"""Copy probe: can a Step-architecture preset learn to copy a number past N filler tokens, from scratch?

Each sequence: `filler` random tokens, `<tool_response>` + 3 to 7 digits + the end of the turn, the start of
an assistant turn and `Answer: `, then the same digits (the only target). Prints the held-out per-digit
accuracy (10% is chance) every `--every` steps. Variants change the preset's layer types and sliding window,
so the finding behind `training.drills` can be checked and taken further:

    python -m training.copy_probe --filler 0 --steps 300                       # learnt: ~88% at 300 steps
    python -m training.copy_probe --filler 400 --steps 300                     # not learnt: ~25%
    python -m training.copy_probe --filler 400 --steps 300 --window 32 \\
        --layer-types sliding,sliding,sliding,sliding                         # see training/README.md
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from advisor.engine.text.tokenizer import load_tokenizer

from training.checkpoint import PRESETS, init_checkpoint, load_trainable, text_config, trainable
from training.train import collate, logits_of, loss_of

ROOT = Path(__file__).resolve().parents[1]
_HEAD = "<|im_start|>tool_response\n<tool_response>"
_MID = "\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\nAnswer: "


def sample(rng: random.Random, tok, filler: int, pool: list[int]) -> tuple[list[int], list[int]]:
    digits = [tok.encode(str(rng.randint(0, 9)))[0] for _ in range(rng.randint(3, 7))]
    answer = digits + tok.encode("<|im_end|>")
    ids = [rng.choice(pool) for _ in range(filler)] + tok.encode(_HEAD) + digits + tok.encode(_MID) + answer
    return ids, [-100] * (len(ids) - len(answer)) + answer


def preset(name: str, layer_types: str | None, window: int | None) -> dict:
    p = copy.deepcopy(PRESETS[name])
    if layer_types:
        types = [t.strip() + "_attention" for t in layer_types.split(",")]
        if len(types) != p["num_hidden_layers"]:
            raise SystemExit(f"--layer-types: {len(types)} types for {p['num_hidden_layers']} layers")
        p["layer_types"] = types
        p["rope_theta"] = [1e5 if t == "full_attention" else 1e4 for t in types]
        p["partial_rotary_factors"] = [0.5 if t == "full_attention" else 1.0 for t in types]
    if window:
        p["sliding_window"] = window
    return p


def run(a: argparse.Namespace) -> float:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = load_tokenizer(a.tokenizer)
    digits = torch.tensor([tok.encode(str(d))[0] for d in range(10)])
    # ordinary tokens other than digits: the copied number is the only one in the context
    not_pool = set(digits.tolist())
    pool = [i for i in range(max(tok.special_ids.values()) + 1, tok.vocab_size) if i not in not_pool]
    with tempfile.TemporaryDirectory() as tmp:
        init = init_checkpoint(
            Path(tmp), text_config(preset(a.model, a.layer_types, a.window), tok), Path(a.tokenizer), a.seed
        )
        model = load_trainable(init)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, betas=(0.9, 0.95))
    rng, test_rng = random.Random(a.seed), random.Random(a.seed + 99)
    test = [sample(test_rng, tok, a.filler, pool) for _ in range(64)]
    t0, acc = time.monotonic(), 0.0
    with trainable(model):
        for step in range(1, a.steps + 1):
            group = [sample(rng, tok, a.filler, pool) for _ in range(a.batch)]
            ids, labels = collate(group, list(range(len(group))), tok.pad_token_id or 0)
            loss = loss_of(model, ids, labels)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % a.every == 0 or step == a.steps:
                acc = accuracy(model, tok, test, digits)
                print(
                    f"filler {a.filler} step {step} loss {loss.item():.3f} digit accuracy {acc:.3f} "
                    f"({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
    return acc


def accuracy(model, tok, test, digits: torch.Tensor) -> float:
    """Greedy next-token accuracy on the copied digits (`digits`: their token ids), teacher-forced."""
    ids, labels = collate(test, list(range(len(test))), tok.pad_token_id or 0)
    with torch.no_grad():
        pred = logits_of(model, ids)[:, :-1].argmax(-1)
    target = labels[:, 1:]
    keep = torch.isin(target, digits)
    return (pred[keep] == target[keep]).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.copy_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="step-nano")
    p.add_argument(
        "--tokenizer", default=str(ROOT / "models" / "step-nano"), help="a directory with tokenizer.json"
    )
    p.add_argument("--filler", type=int, default=400)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--layer-types", default=None, help="e.g. full,sliding,sliding,full")
    p.add_argument("--window", type=int, default=None, help="sliding window (default: the preset's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
