"""CPU throughput of the engine against the transformers reference, same weights, same run.

    python -m engine.bench [--batches 1 16] [--prompt 128] [--decode 32] [--repeats 2]

Builds a Step-shaped random model (~95M parameters: dense first layer, then MoE layers; full attention
every 4th layer, sliding elsewhere, with more query heads on sliding layers, partial RoPE and llama3
scaling on full layers), saves it once with `save_pretrained`, loads it into both implementations and
times greedy prefill and decode. transformers is a dev dependency; the engine itself does not use it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

# Step 3.7 Flash proportions, scaled down: many small routed experts with top-8 routing (the release has
# 288, top-8, expert width 0.31 x hidden), a shared expert, one dense layer first, full attention every
# 4th layer with fewer query heads than the sliding layers, partial RoPE + llama3 scaling on full layers.
_L = 6
BENCH_TEXT = dict(
    vocab_size=16384,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=_L,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    moe_intermediate_size=128,
    n_routed_experts=64,
    num_experts_per_tok=8,
    share_expert_dim=128,
    sliding_window=128,
    layer_types=["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(_L)],
    moe_layers_enum=",".join(str(i) for i in range(1, _L)),
    attention_other_setting={"num_attention_heads": 12, "num_attention_groups": 2},
    rope_theta=[5e6 if i % 4 == 0 else 1e4 for i in range(_L)],
    partial_rotary_factors=[0.5 if i % 4 == 0 else 1.0 for i in range(_L)],
    rope_scaling={
        "rope_type": "llama3",
        "factor": 2.0,
        "original_max_position_embeddings": 4096,
        "low_freq_factor": 1.0,
        "high_freq_factor": 32.0,
    },
    swiglu_limits=[0.0] * (_L - 2) + [7.0, 7.0],
    swiglu_limits_shared=[0.0] * (_L - 1) + [16.0],
    moe_router_scaling_factor=3.0,
)
BENCH_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14)


def build_checkpoint(path: Path) -> int:
    """Save a random Step-shaped checkpoint; returns the text backbone's parameter count."""
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Step3p7Config(text_config=dict(BENCH_TEXT), vision_config=dict(BENCH_VISION))
    model = Step3p7ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif "norm" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def time_reference(model, ids: torch.Tensor, n_decode: int, repeats: int) -> tuple[float, float]:
    from transformers import DynamicCache

    def prefill():
        return model(
            input_ids=ids, past_key_values=DynamicCache(config=model.config.text_config), use_cache=True
        )

    def decode():
        out = prefill()
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n_decode):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)

    prefill()  # warm-up
    t_pre = _best(prefill, repeats)
    t_all = _best(decode, repeats)
    return t_pre, max(t_all - t_pre, 1e-9)


@torch.inference_mode()
def time_engine(llm, ids: torch.Tensor, n_decode: int, repeats: int) -> tuple[float, float]:
    from engine.cache import KVCache

    B, T = ids.shape
    positions = torch.arange(T).expand(B, -1)
    model = llm.model

    def prefill():
        cache = KVCache(llm.config.text, B, T + n_decode + 1, llm.dtype, llm.device)
        return cache, model(model.embed_tokens(ids), cache.plan(positions), cache, last_only=True)

    def decode():
        cache, logits = prefill()
        for step in range(n_decode):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            pos = torch.full((B, 1), T + step)
            logits = model(model.embed_tokens(nxt), cache.plan(pos), cache, last_only=True)

    prefill()
    t_pre = _best(prefill, repeats)
    t_all = _best(decode, repeats)
    return t_pre, max(t_all - t_pre, 1e-9)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    from transformers import Step3p7ForConditionalGeneration

    from engine import LLM

    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_checkpoint(Path(tmp))
        ref = Step3p7ForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
        llm = LLM.from_pretrained(tmp, dtype="float32")
    print(
        f"Step-shaped model: {n_params / 1e6:.1f}M text parameters, fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, prompt {args.prompt}, decode {args.decode} tokens"
    )
    rows = []
    for B in args.batches:
        ids = torch.randint(
            1, BENCH_TEXT["vocab_size"], (B, args.prompt), generator=torch.Generator().manual_seed(B)
        )
        r_pre, r_dec = time_reference(ref, ids, args.decode, args.repeats)
        e_pre, e_dec = time_engine(llm, ids, args.decode, args.repeats)
        n_pre, n_dec = B * args.prompt, B * args.decode
        rows.append((B, n_pre / r_pre, n_pre / e_pre, n_dec / r_dec, n_dec / e_dec))

    head = f"{'batch':>5} | {'prefill tok/s ref':>17} {'engine':>10} {'ratio':>6} | {'decode tok/s ref':>16} {'engine':>10} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for B, rp, ep, rd, ed in rows:
        print(f"{B:>5} | {rp:>17.1f} {ep:>10.1f} {ep / rp:>5.2f}x | {rd:>16.1f} {ed:>10.1f} {ed / rd:>5.2f}x")


if __name__ == "__main__":
    main()
