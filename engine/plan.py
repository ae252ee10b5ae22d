"""Fit planner: will this checkpoint run on this device, in which format, with how many contexts?

`advisor engine plan CHECKPOINT_OR_CONFIG --device h200|h100|cpu:128GiB [--format ...] [--context 32768
--seqs 40]` (or `python -m advisor.engine.plan ...`). From config.json alone (no weights): the model is built on
PyTorch's meta device, so every checkpoint tensor's name and shape come from the same code that loads
checkpoints, and each format's bytes follow from what its export quantizes (`advisor.engine.quantize`):
- bf16: every tensor 2 bytes;
- fp8 (block scales, as the DeepSeek / Qwen / Step FP8 exports): the decoder layers' projections and the
  routed experts 1 byte, plus an fp32 scale per 128 x 128 block; the rest bf16;
- nvfp4 (ModelOpt, as the published Step NVFP4 export): the routed experts only, 0.5 byte per weight plus
  an e4m3 scale per 16 and two fp32 per matrix; the rest bf16;
- int4 (compressed-tensors W4A16, `--group`, default 128): the projections and experts, 0.5 byte plus a
  bf16 scale per group; the rest bf16.
The KV cache per token: every layer stores K and V for its KV heads (bf16); full-attention layers for the
whole context, sliding layers for at most `sliding_window` tokens per sequence (counted apart). The MTP
layers' weights are counted (they are in the checkpoint); their cache is not (plain decoding does not run
them). A device fits what its memory times `--utilization` (default 0.90, as vLLM's
gpu_memory_utilization) holds: the weights, then as many contexts as the rest takes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from advisor.engine.model.config import FULL, ModelConfig, parse_config
from advisor.engine.quant.scheme import EXPERT_WEIGHT, PROJECTION_WEIGHT

GiB = 2**30
# Memory as the driver reports it (nvidia-smi's total): the 141 GB H200 and the 80 GB H100 (SXM).
DEVICES = {"h200": 143771 * 2**20, "h100": 81559 * 2**20}
FORMATS = ("bf16", "fp8", "nvfp4", "int4")


class PlanError(ValueError):
    pass


def device_bytes(device: str) -> int:
    d = device.lower()
    if d in DEVICES:
        return DEVICES[d]
    m = re.fullmatch(r"cpu:(\d+(?:\.\d+)?)\s*(gib|gb|g)?", d)
    if m:
        unit = 10**9 if m.group(2) == "gb" else GiB
        return int(float(m.group(1)) * unit)
    raise PlanError(f"unknown device {device!r} (h200, h100, or cpu:<N>GiB)")


def checkpoint_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint the config describes (text model with its MTP layers, vision tower
    when the config has one), name -> shape, from the engine's own load specs on the meta device."""
    import torch
    from advisor.engine.model.backbone import StepTextModel

    with torch.device("meta"):
        model = StepTextModel(cfg.text, with_mtp=bool(cfg.text.mtp_layers))
    shapes: dict[str, tuple[int, ...]] = {}
    for parts, _ in model.checkpoint_spec().values():
        for key, shape in parts:
            shapes[key] = tuple(shape)
    if cfg.vision is not None:
        from advisor.engine.model.vision import build_vision, vision_keys

        vision = build_vision(cfg.vision, cfg.text.hidden_size, cfg.projector_bias, device="meta")
        shapes.update(vision_keys(vision))
    return shapes


def quantized(fmt: str, key: str) -> bool:
    """Whether a format's export quantizes this tensor (see the module docstring)."""
    if fmt == "bf16":
        return False
    if fmt == "nvfp4":
        return bool(EXPERT_WEIGHT.match(key))
    return bool(EXPERT_WEIGHT.match(key) or PROJECTION_WEIGHT.match(key))


def tensor_bytes(fmt: str, shape: tuple[int, ...], group: int = 128) -> int:
    """Bytes on disk (and resident) of one weight [..., N, K] in the format."""
    n = math.prod(shape)
    *lead, rows, cols = shape
    mats = math.prod(lead)
    if fmt == "fp8":
        return n + 4 * mats * -(-rows // 128) * -(-cols // 128)
    if fmt == "nvfp4":
        return n // 2 + n // 16 + 8 * mats
    if fmt == "int4":
        return n // 2 + 2 * n // group + 8 * len(shape)
    return 2 * n


@dataclass(frozen=True)
class Plan:
    format: str
    weight_bytes: int
    quantized_params: int
    params: int
    kv_full_per_token: int  # bytes per token over the full-attention layers
    kv_sliding_per_token: int  # bytes per token over the sliding layers (up to the window)
    window: int
    device: str
    device_bytes: int
    utilization: float
    context: int

    @property
    def usable(self) -> int:
        return int(self.device_bytes * self.utilization)

    @property
    def fits(self) -> bool:
        return self.weight_bytes <= self.usable

    @property
    def kv_per_seq(self) -> int:
        return self.kv_full_per_token * self.context + self.kv_sliding_per_token * min(
            self.context, self.window
        )

    @property
    def max_seqs(self) -> int:
        return max(0, (self.usable - self.weight_bytes) // self.kv_per_seq) if self.fits else 0


def plan(
    cfg: ModelConfig,
    fmt: str,
    device: str,
    context: int = 32768,
    group: int = 128,
    utilization: float = 0.90,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Plan:
    if fmt not in FORMATS:
        raise PlanError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})")
    shapes = shapes if shapes is not None else checkpoint_tensors(cfg)
    total, qparams, params = 0, 0, 0
    for key, shape in shapes.items():
        n = math.prod(shape)
        params += n
        if len(shape) >= 2 and quantized(fmt, key):
            total += tensor_bytes(fmt, shape, group)
            qparams += n
        else:
            total += 2 * n
    tc = cfg.text
    per_layer = 2 * tc.num_key_value_heads * tc.head_dim * 2  # K and V, bf16
    n_full = sum(1 for s in tc.layers if s.attention == FULL)
    n_sliding = len(tc.layers) - n_full
    window = tc.sliding_window or 0
    if not window:  # no window: the sliding layers keep everything
        n_full, n_sliding = len(tc.layers), 0
    return Plan(
        fmt,
        total,
        qparams,
        params,
        per_layer * n_full,
        per_layer * n_sliding,
        window,
        device,
        device_bytes(device),
        utilization,
        context,
    )


def load_any_config(path: str | Path) -> ModelConfig:
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.exists():
        raise PlanError(f"{p}: no config.json")
    try:
        return parse_config(json.loads(f.read_text()))
    except json.JSONDecodeError as e:
        raise PlanError(f"{f}: not JSON ({e})") from None


def render(plans: list[Plan], seqs: int | None) -> str:
    p0 = plans[0]
    lines = [
        f"{p0.params / 1e9:.1f}B parameters; KV cache per token (bf16): {p0.kv_full_per_token / 1024:.0f} KiB over the "
        f"full-attention layers + {p0.kv_sliding_per_token / 1024:.0f} KiB over the sliding ones (at most "
        f"{p0.window} tokens each); one {p0.context}-token context {p0.kv_per_seq / GiB:.2f} GiB",
        f"{p0.device}: {p0.device_bytes / GiB:.1f} GiB, {p0.usable / GiB:.1f} GiB usable at {p0.utilization:.2f}",
        f"{'format':<7} {'weights GiB':>11} {'quantized':>10} {'fits':>5} {'contexts':>9}",
    ]
    for p in plans:
        share = p.quantized_params / p.params
        lines.append(
            f"{p.format:<7} {p.weight_bytes / GiB:>11.1f} {share:>9.0%} {'yes' if p.fits else 'no':>5} "
            f"{p.max_seqs if p.fits else '-':>9}"
        )
    if seqs:
        for p in plans:
            need = p.weight_bytes + seqs * p.kv_per_seq
            ok = p.fits and p.max_seqs >= seqs
            lines.append(
                f"{p.format}: {seqs} x {p.context} tokens need {need / GiB:.1f} GiB: {'fits' if ok else 'does not fit'}"
            )
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("checkpoint", type=Path, help="a checkpoint directory or its config.json")
    ap.add_argument("--device", required=True, help="h200, h100 or cpu:<N>GiB")
    ap.add_argument("--format", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--group", type=int, default=128, help="int4 group size (default 128)")
    ap.add_argument("--context", type=int, default=32768, help="tokens per context (default 32768)")
    ap.add_argument("--seqs", type=int, default=None, help="also check this many concurrent contexts")
    ap.add_argument(
        "--utilization", type=float, default=0.90, help="share of the memory to use (default 0.90)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_any_config(args.checkpoint)
        shapes = checkpoint_tensors(cfg)
        plans = [
            plan(cfg, f.strip(), args.device, args.context, args.group, args.utilization, shapes)
            for f in args.format.split(",")
        ]
    except ValueError as e:  # PlanError, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(plans, args.seqs))
    return 0


def add_engine_parser(sub) -> None:
    """`advisor engine plan ...` for advisor.cli."""
    engine = sub.add_parser("engine", help="the embedded engine's tools")
    esub = engine.add_subparsers(dest="engine_command", required=True)
    p = esub.add_parser("plan", help="which formats of a checkpoint fit a device, and how many contexts")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m advisor.engine.plan", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
