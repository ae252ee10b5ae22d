"""`python -m advisor.engine.quantize SRC DST --format fp8|nvfp4|int4 [--group 128]`: write a quantized copy of a
Step checkpoint in the published layout of that format, so fine-tunes can be quantized the way the
release was and the engine (or vLLM / SGLang) loads them.

What is quantized: the routed experts (one [E, out, in] tensor per projection) and, unless
`--experts-only`, every projection of the decoder layers (attention q/k/v/o/g, the dense MLPs, the shared
experts); with `--lm-head`, the LM head too (as llm-compressor does when a recipe leaves `lm_head` out of
its `ignore` list, and ModelOpt when it is out of `exclude_modules`; vLLM loads both: at 4 bits it is then
a quarter of the resident bytes it was, and the largest single read of a decode step shrinks with it). The
embeddings, the LM head otherwise, the router and its bias, the norms, the MTP layers' eh_proj and head
and the vision tower stay as they are (in the source dtype), and are listed in the config's exclusions.
A projection whose inputs are not a multiple of the format's group stays unquantized (and excluded) too.

- fp8: `weight` e4m3 + `weight_scale_inv` per 128 x 128 block; config.json `quantization_config`
  {quant_method: fp8, weight_block_size, modules_to_not_convert} (the DeepSeek-V3 / Qwen3 FP8 layout).
- nvfp4: ModelOpt's layout: `weight` packed e2m1, `weight_scale` e4m3 per 16, `weight_scale_2`, `input_scale`;
  `hf_quant_config.json` plus config.json `quantization_config` {quant_method: modelopt, quant_algo: NVFP4};
  tensor names under `model.language_model.` / `model.vision_model.` as the Step NVFP4 export has them.
  `input_scale` (the activation scale of W4A4 kernels) needs calibration data this tool does not take: it
  is written as 1.0; W4A16 engines (this one, vLLM's Marlin path) do not read it.
- int4: compressed-tensors `pack-quantized` (`weight_packed`, `weight_scale`, `weight_shape`), symmetric,
  `--group` 32 or 128 (default 128), the quantized modules named in the config group's targets.

Everything else in SRC (tokenizer, chat template, generation config) is copied over. `--dequantize` writes
the inverse: a plain checkpoint (`--dtype`, default float32) of a quantized one's dequantized weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from advisor.engine.quant import formats as F
from advisor.engine.quant.scheme import (
    DEFAULT_GROUP,
    EXPERT_WEIGHT,
    FORMATS,
    PROJECTION_WEIGHT,
    read_scheme,
    scheme_config,
)
from safetensors import safe_open
from safetensors.torch import save_file

_SHARD_BYTES = 4 << 30
LM_HEAD_WEIGHT = "lm_head.weight"


class QuantizeError(ValueError):
    pass


def _tensors(src: Path):
    """(name, tensor) for every tensor of the checkpoint, shard by shard (memory-mapped)."""
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise QuantizeError(f"{src}: no *.safetensors files")
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for key in h.keys():
                yield key, h.get_tensor(key)


def quantize_tensor(fmt: str, w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """One weight [..., out, in] -> its tensors in the format's layout (suffix -> tensor)."""
    if fmt == "fp8":
        q, s = F.fp8_quantize(w, group)
        return {"weight": q, "weight_scale_inv": s}
    if fmt == "nvfp4":
        p, s, s2 = F.nvfp4_quantize(w)
        return {"weight": p, "weight_scale": s, "weight_scale_2": s2, "input_scale": torch.ones(s2.shape)}
    p, s, shape = F.int4_quantize(w, group)
    return {"weight_packed": p, "weight_scale": s, "weight_shape": shape}


def _fits(fmt: str, w: torch.Tensor, group: int, experts: bool) -> bool:
    """Whether the format can hold the weight: inputs a multiple of the group. For the routed experts both
    dims are asked, so a layer's gate, up and down (down's inputs are gate's outputs) are all quantized or
    none is (the engine runs a layer's experts in one format)."""
    if fmt == "fp8":
        return True
    return w.shape[-1] % group == 0 and (not experts or w.shape[-2] % group == 0)


def _nvfp4_name(key: str) -> str:
    """The Step NVFP4 export's tensor names: text model under model.language_model., vision under
    model.vision_model. (the LM head stays `lm_head.weight`)."""
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    if key.startswith(("vision_model.", "vit_downsampler", "vit_large_projector.")):
        return "model." + key
    return key


class _Writer:
    """Tensors to safetensors shards of at most `_SHARD_BYTES`, with an index when there is more than one."""

    def __init__(self, dst: Path):
        self.dst, self.shards, self.cur, self.size, self.map = dst, [], {}, 0, {}

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.cur and self.size + n > _SHARD_BYTES:
            self._flush()
        self.cur[name] = t.contiguous()
        self.size += n

    def _flush(self) -> None:
        if self.cur:
            self.shards.append(self.cur)
            i = len(self.shards)
            save_file(self.cur, str(self.dst / f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
            for k in self.cur:
                self.map[k] = f"model-{i:05d}.safetensors"
            self.shards[-1] = None  # written: let the tensors go
            self.cur, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self.shards)
        if n == 1:
            (self.dst / "model-00001.safetensors").rename(self.dst / "model.safetensors")
            return
        for i in range(1, n + 1):
            old = self.dst / f"model-{i:05d}.safetensors"
            old.rename(self.dst / f"model-{i:05d}-of-{n:05d}.safetensors")
        weight_map = {k: v.replace(".safetensors", f"-of-{n:05d}.safetensors") for k, v in self.map.items()}
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _copy_side_files(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.suffix == ".safetensors" or p.name in (
            "model.safetensors.index.json",
            "config.json",
            "hf_quant_config.json",
        ):
            continue
        if p.is_file():
            shutil.copy2(p, dst / p.name)
        elif p.is_dir():
            shutil.copytree(p, dst / p.name, dirs_exist_ok=True)


def _prepare(src: Path, dst: Path) -> dict:
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise QuantizeError(f"{src}: no config.json (not a checkpoint directory)")
    if dst.exists() and any(dst.iterdir()):
        raise QuantizeError(f"{dst}: exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    return json.loads((src / "config.json").read_text())


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    fmt: str,
    group: int | None = None,
    experts_only: bool = False,
    lm_head: bool = False,
) -> dict:
    """Write DST, SRC quantized to `fmt` (the LM head too with `lm_head`); returns a summary (counts and
    bytes)."""
    if fmt not in FORMATS:
        raise QuantizeError(f"unknown format {fmt!r} (use one of {', '.join(FORMATS)})")
    group = group or DEFAULT_GROUP[fmt]
    if fmt == "int4" and group not in (32, 64, 128):
        raise QuantizeError(f"int4 group {group}: use 32, 64 or 128")
    if fmt == "fp8" and group % 16:
        raise QuantizeError(f"fp8 block {group}: use a multiple of 16 (128 as published)")
    src, dst = Path(src), Path(dst)
    config = _prepare(src, dst)
    if config.get("quantization_config") or (src / "hf_quant_config.json").exists():
        raise QuantizeError(f"{src}: already quantized (dequantize it first: --dequantize)")
    writer = _Writer(dst)
    quantized, ignore = [], []
    rename = _nvfp4_name if fmt == "nvfp4" else (lambda k: k)
    for key, t in _tensors(src):
        expert = bool(EXPERT_WEIGHT.match(key))
        wanted = (
            expert
            or (not experts_only and bool(PROJECTION_WEIGHT.match(key)))
            or (lm_head and key == LM_HEAD_WEIGHT)
        )
        module = rename(key).removesuffix(".weight")
        if wanted and t.is_floating_point() and _fits(fmt, t, group, expert):
            for suffix, q in quantize_tensor(fmt, t, group).items():
                writer.add(f"{module}.{suffix}", q)
            quantized.append(module)
        else:
            if key.endswith(".weight") and t.dim() >= 2:
                ignore.append(module)
            writer.add(rename(key), t)
    writer.close()
    qc, hf_quant = scheme_config(fmt, group, sorted(ignore), sorted(quantized))
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if hf_quant is not None:
        (dst / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2))
    _copy_side_files(src, dst)
    return {
        "quantized": len(quantized),
        "kept": len(ignore),
        "bytes": _disk_bytes(dst),
        "source_bytes": _disk_bytes(src),
    }


def dequantize_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write DST: SRC's quantized weights dequantized (from the format's definition, `advisor.engine.quant.formats`,
    not the engine's kernels) in `dtype`, everything else as it is, under the hub names."""
    from advisor.engine.model.loader import canonical_key

    src, dst = Path(src), Path(dst)
    config = _prepare(src, dst)
    scheme = read_scheme(src, config)
    if scheme is None:
        raise QuantizeError(f"{src}: not a quantized checkpoint")
    tensors = dict(_tensors(src))
    writer = _Writer(dst)
    suffixes = {"weight_scale_inv", "weight_scale", "weight_scale_2", "input_scale", "weight_shape"}
    for key, t in tensors.items():
        base, _, suffix = key.rpartition(".")
        if suffix in suffixes:
            continue
        if scheme.format == "int4" and suffix == "weight_packed":
            w = F.int4_dequantize(t, tensors[f"{base}.weight_scale"])
        elif scheme.format == "fp8" and t.dtype is torch.float8_e4m3fn:
            w = F.fp8_dequantize(t, tensors[f"{base}.weight_scale_inv"], scheme.group)
        elif scheme.format == "nvfp4" and t.dtype is torch.uint8:
            w = F.nvfp4_dequantize(t, tensors[f"{base}.weight_scale"], tensors[f"{base}.weight_scale_2"])
        else:
            writer.add(canonical_key(key), t)
            continue
        writer.add(canonical_key(f"{base}.weight"), w.to(dtype))
    writer.close()
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _copy_side_files(src, dst)


def _disk_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m advisor.engine.quantize", description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--format", choices=FORMATS)
    ap.add_argument(
        "--group", type=int, default=None, help="int4 group (32 or 128; default 128), fp8 block side"
    )
    ap.add_argument("--experts-only", action="store_true", help="quantize the routed experts only")
    ap.add_argument("--lm-head", action="store_true", help="quantize the LM head too")
    ap.add_argument("--dequantize", action="store_true", help="write SRC's weights dequantized instead")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    try:
        if args.dequantize:
            dequantize_checkpoint(args.src, args.dst, getattr(torch, args.dtype))
            print(f"{args.dst}: dequantized ({args.dtype})")
            return 0
        if args.format is None:
            ap.error("--format is required (or --dequantize)")
        if args.lm_head and args.experts_only:
            ap.error("--lm-head and --experts-only exclude each other")
        s = quantize_checkpoint(args.src, args.dst, args.format, args.group, args.experts_only, args.lm_head)
    except (QuantizeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.dst}: {args.format}, {s['quantized']} weights quantized, {s['kept']} kept; "
        f"{s['bytes'] / 2**20:.1f} MiB on disk ({s['bytes'] / s['source_bytes']:.3f}x the source)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
