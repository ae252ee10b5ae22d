"""Grow a trained checkpoint into a larger Step shape that computes the same function (Net2Net style).

The frontier stand-in gets several times the executor's parameters but, on this CPU, far fewer training
steps per hour, so trained from scratch it stays the weaker model. Grown from the executor it starts where
the executor is and every further step is on top of that.

How the function is kept, exactly:
- hidden size x k: the residual stream is the old one repeated k times. Embeddings, norm weights and
  every projection writing into the stream repeat their rows; RMSNorm of a repeated vector is the
  repeated norm, so the stream stays repeated through every layer.
- every projection reading the stream (q/k/v/g, MLP and expert gate/up, router, lm_head) repeats its
  columns divided by k; attention heads and MLP neurons grow the same way (a query head is repeated
  within its key/value group, and o_proj / down_proj read the copies divided by k).
- copies that are read get a zero-sum perturbation (+e on one copy, -e on the other): the output is
  unchanged while the copies are equal, and their gradients differ, so training can tell them apart.
- layers past the old depth are freshly initialised with zero output projections (attention o_proj,
  expert and shared-expert down_proj): identities until training moves them.
The sliding window is the source's (a wider window would let old layers see keys they never saw).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from advisor.engine.model.config import load_config
from advisor.engine.text.tokenizer import load_tokenizer
from safetensors.torch import load_file, save_file

from training.checkpoint import PRESETS, copy_tokenizer, init_checkpoint, text_config
from training.runlog import earlier_runs, write_log

NOISE = 0.05  # perturbation of read copies, relative to the tensor's standard deviation


def _map(old: int, new: int, what: str) -> torch.Tensor:
    if new % old:
        raise ValueError(f"grow: {what} {new} is not a multiple of the source's {old}")
    return torch.arange(new) % old


def _head_map(old_heads: int, new_heads: int, kv: int) -> torch.Tensor:
    """New query head -> the old head it copies, staying in the same key/value group."""
    if new_heads % old_heads:
        raise ValueError(f"grow: {new_heads} attention heads is not a multiple of the source's {old_heads}")
    old_rep, new_rep = old_heads // kv, new_heads // kv
    f = new_rep // old_rep
    h = torch.arange(new_heads)
    return (h // new_rep) * old_rep + (h % new_rep) // f


def _rows(head_map: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (head_map[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _expand(t: torch.Tensor, dim: int, index: torch.Tensor, read: bool, gen: torch.Generator) -> torch.Tensor:
    """`t` with `dim` grown by `index`; a read dimension's copies are divided by their count and
    perturbed by zero-sum noise."""
    out = t.index_select(dim, index)
    if not read:
        return out
    count = torch.bincount(index, minlength=t.shape[dim])
    k = int(count.max())
    if k == 1:
        return out
    shape = [1] * t.dim()
    shape[dim] = -1
    out = out / count[index].to(t.dtype).reshape(shape)
    # the j-th copy of a column gets +e, the next -e (pairs cancel; an odd last copy gets none)
    seen = torch.zeros_like(count)
    sign = torch.empty(len(index))
    for p, i in enumerate(index.tolist()):
        c = int(seen[i])
        seen[i] += 1
        sign[p] = 0.0 if (c == k - 1 and k % 2) else (1.0 if c % 2 == 0 else -1.0)
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * NOISE * t.float().std()
    return out + noise.index_select(dim, index) * sign.to(t.dtype).reshape(shape)


def _check(src, dst) -> None:
    def need(ok: bool, what: str, a: Any, b: Any) -> None:
        if not ok:
            raise ValueError(f"grow: {what} differs (source {a}, target {b})")

    for key in ("vocab_size", "head_dim", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok"):
        need(getattr(src, key) == getattr(dst, key), key, getattr(src, key), getattr(dst, key))
    need(src.moe_intermediate_size == dst.moe_intermediate_size, "moe_intermediate_size",
         src.moe_intermediate_size, dst.moe_intermediate_size)  # fmt: skip
    need(len(dst.layers) >= len(src.layers), "depth", len(src.layers), len(dst.layers))
    for i, (a, b) in enumerate(zip(src.layers, dst.layers, strict=False)):
        need((a.attention, a.mlp) == (b.attention, b.mlp), f"layer {i} type", (a.attention, a.mlp),
             (b.attention, b.mlp))  # fmt: skip
    for kind in src.rope:
        need(src.rope[kind] == dst.rope.get(kind), f"{kind} RoPE", src.rope[kind], dst.rope.get(kind))
    need(src.query_pre_attn_scalar == dst.query_pre_attn_scalar, "query_pre_attn_scalar",
         src.query_pre_attn_scalar, dst.query_pre_attn_scalar)  # fmt: skip


def grown_tensors(src_dir: Path, fresh_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The fresh larger checkpoint's tensors with every tensor the source has replaced by its grown copy."""
    s, d = load_config(src_dir).text, load_config(fresh_dir).text
    _check(s, d)
    gen = torch.Generator().manual_seed(seed)
    H = _map(s.hidden_size, d.hidden_size, "hidden_size")
    I_dense = _map(s.intermediate_size, d.intermediate_size, "intermediate_size")
    I_shared = _map(s.share_expert_dim, d.share_expert_dim, "share_expert_dim")
    src, out = load_file(str(src_dir / "model.safetensors")), load_file(str(fresh_dir / "model.safetensors"))

    def grow(name: str, *dims: tuple[int, torch.Tensor, bool]) -> None:
        t = src[name].float()
        for dim, index, read in dims:
            t = _expand(t, dim, index, read, gen)
        want = out[name]
        if t.shape != want.shape:
            raise ValueError(f"grow: {name} grew to {list(t.shape)}, the target needs {list(want.shape)}")
        out[name] = t.to(want.dtype).contiguous()

    grow("model.embed_tokens.weight", (1, H, False))
    grow("lm_head.weight", (1, H, True))
    grow("model.norm.weight", (0, H, False))
    if "vit_large_projector.weight" in src:
        grow("vit_large_projector.weight", (0, H, False))
    for i, (a, b) in enumerate(zip(s.layers, d.layers, strict=False)):
        p = f"model.layers.{i}."
        heads = _head_map(a.num_heads, b.num_heads, s.num_key_value_heads)
        q_rows = _rows(heads, s.head_dim)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            grow(p + norm + ".weight", (0, H, False))
        grow(p + "self_attn.q_proj.weight", (0, q_rows, False), (1, H, True))
        grow(p + "self_attn.g_proj.weight", (0, heads, False), (1, H, True))
        for kv in ("k_proj", "v_proj"):
            grow(p + f"self_attn.{kv}.weight", (1, H, True))
        grow(p + "self_attn.o_proj.weight", (0, H, False), (1, q_rows, True))
        for name in ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "moe.router_bias"):
            if p + name in src:  # head_dim and expert count are the same in both
                out[p + name] = src[p + name].to(out[p + name].dtype)
        if a.mlp == "dense":
            prefix, neurons = "mlp.", I_dense
        else:  # the routed experts keep their width; the shared expert grows like the dense MLP
            prefix, neurons = "share_expert.", I_shared
            grow(p + "moe.gate.weight", (1, H, True))
            for w in ("gate_proj", "up_proj"):
                grow(p + f"moe.{w}.weight", (2, H, True))
            grow(p + "moe.down_proj.weight", (1, H, False))
        for w in ("gate_proj", "up_proj"):
            grow(p + prefix + w + ".weight", (0, neurons, False), (1, H, True))
        grow(p + prefix + "down_proj.weight", (0, H, False), (1, neurons, True))
    for i in range(len(s.layers), len(d.layers)):  # new layers start as identities
        for name in list(out):
            if name.startswith(f"model.layers.{i}.") and name.endswith(
                (
                    "o_proj.weight",
                    "moe.down_proj.weight",
                    "share_expert.down_proj.weight",
                    "mlp.down_proj.weight",
                )
            ):
                out[name] = torch.zeros_like(out[name])
    for name, t in src.items():  # the vision tower: same shape in both, kept from the source
        if name.startswith("vision_model.") and name in out and out[name].shape == t.shape:
            out[name] = t.to(out[name].dtype)
    return out


def grow_checkpoint(src: Path, dst: Path, target: str | dict[str, Any], seed: int = 0) -> Path:
    """`dst`: `src` grown to the `target` preset (sliding window kept), with a train_log.json that keeps
    the source's runs and records this step, so the grown model's card lists how it came to be."""
    t0 = time.monotonic()
    tok = load_tokenizer(src)
    text = text_config(target, tok)
    text["sliding_window"] = load_config(src).text.sliding_window
    with tempfile.TemporaryDirectory() as tmp:
        fresh = init_checkpoint(Path(tmp) / "fresh", text, src, seed)
        tensors = grown_tensors(src, fresh, seed)
        dst.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json"):
            if (fresh / name).is_file():
                shutil.copy2(fresh / name, dst / name)
    copy_tokenizer(src, dst)
    name = target if isinstance(target, str) else "a custom shape"
    log = {
        "config": {"grow": True, "model": name, "seed": seed, "init": str(src)},
        "earlier": earlier_runs(src),
        "wall_s": time.monotonic() - t0,
    }
    write_log(dst, log)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.grow", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="trained checkpoint directory")
    p.add_argument("out", type=Path, help="where the grown checkpoint goes (must not exist)")
    p.add_argument("--model", choices=sorted(PRESETS), default="step-nano-large", help="target shape")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.out.exists():
        p.error(f"{a.out} exists")
    grow_checkpoint(a.source, a.out, a.model, a.seed)
    print(f"grew {a.source} into {a.out} ({a.model})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
