"""Which quantized format a checkpoint is in, from its config's `quantization_config` or ModelOpt's
`hf_quant_config.json`, and the tensors each format stores per quantized weight.

A weight is quantized when the checkpoint stores it that way (its own tensors say so: an e4m3 `weight`,
a uint8 packed `weight`, a `weight_packed`); the scheme says which format to read them as. Anything the
engine cannot read as declared is a one-line `SchemeError` naming the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("fp8", "nvfp4", "int4")
FP8_BLOCK = 128  # the published FP8 block side
NVFP4_GROUP = 16  # inputs per NVFP4 e4m3 scale
# What the exports quantize, by checkpoint name: the routed experts (one [E, out, in] tensor per
# projection), and the decoder layers' projections (attention, dense MLPs, shared experts).
EXPERT_WEIGHT = re.compile(r"^model\.layers\.\d+\.moe\.(gate|up|down)_proj\.weight$")
PROJECTION_WEIGHT = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvog]_proj|mlp\.(gate|up|down)_proj|share_expert\.(gate|up|down)_proj)\.weight$"
)


class SchemeError(ValueError):
    """A quantization config the engine cannot load (unknown method, unsupported variant)."""


@dataclass(frozen=True)
class QuantScheme:
    format: str  # "fp8" | "nvfp4" | "int4"
    group: int  # inputs per scale: the FP8 block side, NVFP4's 16, the int4 group
    source: str  # the file that declared it (for errors)
    ignore: tuple[str, ...] = field(default=())  # module names / patterns the export left unquantized

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The tensors stored beside (or instead of) `weight` for a quantized module."""
        return {
            "fp8": ("weight_scale_inv",),
            "nvfp4": ("weight_scale", "weight_scale_2", "input_scale"),
            "int4": ("weight_packed", "weight_scale", "weight_shape"),
        }[self.format]


def read_scheme(ckpt_dir: str | Path, config: dict[str, Any]) -> QuantScheme | None:
    """The checkpoint's scheme, or None for an unquantized checkpoint."""
    d = Path(ckpt_dir)
    modelopt = d / "hf_quant_config.json"
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    where = str(d / "config.json")
    if qc is None and modelopt.exists():
        try:
            qc = {"quant_method": "modelopt", **json.loads(modelopt.read_text())["quantization"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SchemeError(f"{modelopt}: not a ModelOpt quantization config (no 'quantization')") from None
        where = str(modelopt)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise SchemeError(f"{where}: quantization_config must be an object")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and block[0] % 16 == 0):
            raise SchemeError(
                f"{where}: FP8 quantization_config needs square weight_block_size (e.g. [128, 128]), got {block!r}"
                " (per-tensor FP8 is not supported)"
            )
        if str(qc.get("fmt", "e4m3")).lower() != "e4m3":
            raise SchemeError(f"{where}: FP8 fmt {qc.get('fmt')!r} is not supported (e4m3 only)")
        ignore = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ()
        return QuantScheme("fp8", int(block[0]), where, tuple(ignore))
    if method == "modelopt":
        algo = str(qc.get("quant_algo", "")).upper()
        if algo != "NVFP4":
            raise SchemeError(
                f"{where}: ModelOpt quant_algo {qc.get('quant_algo')!r} is not supported (NVFP4 only)"
            )
        group = int(qc.get("group_size", NVFP4_GROUP))
        if group != NVFP4_GROUP:
            raise SchemeError(f"{where}: NVFP4 group_size {group} is not supported ({NVFP4_GROUP} only)")
        return QuantScheme("nvfp4", group, where, tuple(qc.get("exclude_modules") or qc.get("ignore") or ()))
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    raise SchemeError(
        f"{where}: unknown quant_method {qc.get('quant_method')!r} (the engine loads fp8 with block scales, "
        "modelopt NVFP4 and compressed-tensors pack-quantized int4)"
    )


def _compressed_tensors(qc: dict[str, Any], where: str) -> QuantScheme:
    groups = qc.get("config_groups") or {}
    if not groups:
        raise SchemeError(f"{where}: compressed-tensors quantization_config has no config_groups")
    group_sizes = set()
    for name, g in groups.items():
        fmt = g.get("format") or qc.get("format")
        w = g.get("weights") or {}
        if fmt != "pack-quantized":
            raise SchemeError(
                f"{where}: compressed-tensors group {name}: format {fmt!r} is not supported (pack-quantized)"
            )
        if w.get("num_bits") != 4 or w.get("type", "int") != "int" or not w.get("symmetric", False):
            raise SchemeError(
                f"{where}: compressed-tensors group {name}: only symmetric 4-bit int weights are supported, got "
                f"num_bits={w.get('num_bits')}, type={w.get('type')}, symmetric={w.get('symmetric')}"
            )
        if w.get("strategy") != "group" or not w.get("group_size"):
            raise SchemeError(
                f"{where}: compressed-tensors group {name}: strategy {w.get('strategy')!r} (group only)"
            )
        if g.get("input_activations"):
            raise SchemeError(
                f"{where}: compressed-tensors group {name}: quantized activations are not supported (W4A16)"
            )
        group_sizes.add(int(w["group_size"]))
    if len(group_sizes) != 1:
        raise SchemeError(
            f"{where}: compressed-tensors groups with different group sizes {sorted(group_sizes)}"
        )
    return QuantScheme("int4", group_sizes.pop(), where, tuple(qc.get("ignore") or ()))


def scheme_config(fmt: str, group: int, ignore: list[str], quantized: list[str]) -> tuple[dict, dict | None]:
    """(config.json's quantization_config, hf_quant_config.json or None) as each format's exporter writes
    them. `quantized`: the module names written quantized (compressed-tensors targets them by name: the
    packed 3-D experts are not Linear modules)."""
    if fmt == "fp8":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [group, group],
            "modules_to_not_convert": ignore,
        }, None
    if fmt == "nvfp4":
        q = {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": NVFP4_GROUP,
            "exclude_modules": ignore,
        }
        return {"quant_method": "modelopt", **q}, {
            "producer": {"name": "modelopt", "version": "0.29.0"},
            "quantization": q,
        }
    if fmt == "int4":
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": [f"re:^{m.replace('.', '[.]')}$" for m in quantized],
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "group",
                        "group_size": group,
                        "dynamic": False,
                        "observer": "minmax",
                    },
                    "input_activations": None,
                    "output_activations": None,
                    "format": "pack-quantized",
                }
            },
            "ignore": ignore,
        }, None
    raise SchemeError(f"unknown format {fmt!r} (use one of {', '.join(FORMATS)})")


DEFAULT_GROUP = {"fp8": FP8_BLOCK, "nvfp4": NVFP4_GROUP, "int4": 128}
