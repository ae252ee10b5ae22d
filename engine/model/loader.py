"""Load a Hugging Face-layout Step checkpoint directory into the engine's modules.

Tensors are read through safetensors' memory map and placed one parameter at a time (fused matrices are
concatenated straight into their final buffer), so the process never holds two full copies of the model.
Every mismatch between the checkpoint and the model the config describes is a one-line error naming the
tensor (and both shapes).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from advisor.engine.model.layers import Spec
from advisor.engine.quant.packed import QWeight, concat_outputs, expected_parts, from_checkpoint
from advisor.engine.quant.scheme import QuantScheme
from safetensors import safe_open
from torch import nn

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# Tensors that only quantized exports carry.
_QUANT_SUFFIXES = (
    "weight_scale",
    "weight_scale_inv",
    "weight_scale_2",
    "input_scale",
    "weight_packed",
    "weight_shape",
)
_QUANT_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8"}
_FORMAT_NAMES = {"fp8": "FP8", "nvfp4": "NVFP4", "int4": "int4"}
# How each format stores a quantized weight: the tensor that holds the codes, and its dtype.
_CODES = {"fp8": ("weight", "F8_E4M3"), "nvfp4": ("weight", "U8"), "int4": ("weight_packed", "I32")}


def canonical_key(key: str) -> str:
    """The hub name of a tensor. ModelOpt's NVFP4 export of this family nests the text model under
    `model.language_model.` and the vision tower under `model.vision_model.` (as vLLM's and SGLang's
    loaders for it strip them); everything else already uses the hub names."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    for p in ("model.vision_model.", "model.vit_downsampler", "model.vit_large_projector."):
        if key.startswith(p):
            return key[len("model.") :]
    return key


# Parameters kept in fp32 whatever the model dtype: the router decides in fp32.
_FP32_PARAMS = ("router", "router_bias")


class CheckpointError(ValueError):
    """A checkpoint directory that does not match its config (or is damaged)."""


def resolve_dtype(dtype: str | torch.dtype | None, declared: str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or declared or "float32"
    if name not in _DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r} (use bfloat16, float16 or float32)")
    return _DTYPES[name]


def _check_file(path: Path) -> dict[str, Any]:
    """Validate a .safetensors header against the file size (catches truncated or corrupt shards)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header ({size} bytes on disk)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: {size} bytes on disk, header needs {8 + n + end}"
        )
    return header


class Checkpoint:
    """The tensors of a checkpoint directory, memory-mapped, one or many shards."""

    def __init__(self, path: str | Path, scheme: QuantScheme | None = None):
        self.dir = Path(path)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index}: invalid index (no weight_map)") from None
            files = sorted({self.dir / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        self.scheme = scheme
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.file_of: dict[str, Path] = {}
        self.stored: dict[str, str] = {}  # canonical name -> the name in the file
        dtypes: dict[str, str] = {}
        for f in files:
            for key, info in _check_file(f).items():
                if key == "__metadata__":
                    continue
                name = canonical_key(key)
                if scheme is None and (key.endswith(_QUANT_SUFFIXES) or info["dtype"] in _QUANT_DTYPES):
                    raise CheckpointError(
                        f"{f}: tensor {key} ({info['dtype']}) belongs to a quantized export, but "
                        f"{self.dir / 'config.json'} declares no quantization_config (nor is there an "
                        "hf_quant_config.json)"
                    )
                self.shapes[name] = tuple(info["shape"])
                self.file_of[name] = f
                self.stored[name] = key
                dtypes[name] = info["dtype"]
                self.first_dtype = _ST_DTYPES.get(info["dtype"], torch.float32)
        # quantized weight (canonical `X.weight`) -> its tensors, suffix -> canonical name
        self.quant: dict[str, dict[str, str]] = {}
        if scheme is not None:
            self._find_quantized(scheme, dtypes)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def _find_quantized(self, scheme: QuantScheme, dtypes: dict[str, str]) -> None:
        """Every weight the checkpoint stores quantized, with its scales checked against its shape: a
        missing or wrong-shaped scale is a one-line error naming both tensors, the shapes and the file."""
        fmt = scheme.format
        codes_suffix, codes_dtype = _CODES[fmt]
        label = _FORMAT_NAMES[fmt]
        for name in list(self.shapes):
            if not name.endswith("." + codes_suffix) or dtypes[name] != codes_dtype:
                if (
                    dtypes[name] in _QUANT_DTYPES
                    and not name.endswith(_QUANT_SUFFIXES)
                    and dtypes[name] != codes_dtype
                ):
                    raise CheckpointError(
                        f"{self.file_of[name]}: tensor {self.stored[name]} is stored as {dtypes[name]}, which is not "
                        f"how {scheme.source} ({label}) stores weights"
                    )
                continue
            base = name[: -len(codes_suffix)]
            stored = self.shapes[name]
            if len(stored) < 2:
                raise CheckpointError(
                    f"{self.file_of[name]}: {label} weight {self.stored[name]} has shape {list(stored)}"
                )
            *lead, n, kq = stored
            k = kq * (2 if fmt == "nvfp4" else 8 if fmt == "int4" else 1)
            shape = (*lead, n, k)
            parts = {codes_suffix: name}
            scale_dtype = "F32"
            if fmt == "int4" and base + "weight_scale" in dtypes:
                scale_dtype = dtypes[base + "weight_scale"]
            if k % scheme.group and fmt != "fp8":
                raise CheckpointError(
                    f"{self.file_of[name]}: {label} weight {self.stored[name]} {list(stored)} has {k} inputs, not a "
                    f"multiple of the group ({scheme.group})"
                )
            want = expected_parts(fmt, scheme.group, shape, scale_dtype)
            if fmt == "nvfp4":
                # The per-matrix scales as vLLM reads ModelOpt NVFP4 (quantization/modelopt.py: one fp32
                # `weight_scale_2` and `input_scale` per Linear; models/step3p5.py: the packed experts'
                # `moe.{gate,up,down}_proj.weight_scale_2` / `.input_scale` a scalar broadcast over the
                # experts, or one per expert [E]); w = e2m1 * weight_scale * weight_scale_2, no reciprocal
                # (ModelOpt stores amax / (6 * 448)). Where vLLM fuses q/k/v or gate/up it keeps one
                # scale_2 (the max, or gate's, warning when the parts differ); `QWeight` keeps each part's
                # per output column, which is exact whether or not they differ.
                s2 = base + "weight_scale_2"
                if s2 not in self.shapes:
                    raise CheckpointError(
                        f"{self.file_of[name]}: tensor {base}weight_scale_2 is missing: the NVFP4 weight "
                        f"{self.stored[name]} {list(stored)} needs its per-matrix scale (shape [] or {list(lead)})"
                    )
                if self.shapes[s2] not in ((), (1,), tuple(lead)):
                    raise CheckpointError(
                        f"{self.file_of[s2]}: tensor {self.stored[s2]} has shape {list(self.shapes[s2])}, expected [] or "
                        f"{list(lead)} for the NVFP4 weight {self.stored[name]} {list(stored)}"
                    )
                parts["weight_scale_2"] = s2
                inp = base + "input_scale"
                if inp in self.shapes:
                    if self.shapes[inp] not in ((), (1,), tuple(lead)):
                        raise CheckpointError(
                            f"{self.file_of[inp]}: tensor {self.stored[inp]} has shape {list(self.shapes[inp])}, expected [] or "
                            f"{list(lead)} for the NVFP4 weight {self.stored[name]} {list(stored)}"
                        )
                    parts["input_scale"] = inp
            for suffix, (shp, dt) in want.items():
                key = base + suffix
                if key not in self.shapes:
                    raise CheckpointError(
                        f"{self.file_of[name]}: tensor {key} is missing: the {label} weight {self.stored[name]} "
                        f"{list(stored)} needs it, shape {list(shp)}"
                    )
                if self.shapes[key] != shp:
                    raise CheckpointError(
                        f"{self.file_of[key]}: tensor {self.stored[key]} has shape {list(self.shapes[key])}, expected "
                        f"{list(shp)} for the {label} weight {self.stored[name]} {list(stored)}"
                    )
                if dtypes[key] != dt:
                    raise CheckpointError(
                        f"{self.file_of[key]}: tensor {self.stored[key]} is stored as {dtypes[key]}, expected {dt} "
                        f"for the {label} weight {self.stored[name]} {list(stored)}"
                    )
                parts[suffix] = key
            logical = base + "weight"
            self.quant[logical] = parts
            for key in parts.values():
                if key != logical:
                    del self.shapes[key]
            self.shapes[logical] = shape
            self.file_of[logical] = self.file_of[name]
        for name in self.shapes:
            if name.endswith(_QUANT_SUFFIXES) and name not in self.quant:
                raise CheckpointError(
                    f"{self.file_of[name]}: tensor {self.stored[name]} {list(self.shapes[name])} belongs to a "
                    f"{label} weight, but {name.rsplit('.', 1)[0]}.weight is not stored as {label} ({codes_dtype})"
                )

    def keys(self) -> Iterable[str]:
        return self.shapes.keys()

    def get(self, key: str) -> torch.Tensor:
        f = self.file_of[key]
        if f not in self._handles:
            try:
                self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: cannot open safetensors file ({e})") from None
        return self._handles[f].get_tensor(self.stored.get(key, key))

    def get_quantized(self, key: str) -> QWeight:
        """A quantized weight (canonical `X.weight`) in the engine's layout (`advisor.engine.quant.packed`)."""
        scheme = self.scheme
        assert scheme is not None
        parts = self.quant[key]
        tensors = {}
        for suffix, name in parts.items():
            tensors[suffix] = self.get(name)
        shape = self.shapes[key]
        if "weight_shape" in tensors and tuple(tensors["weight_shape"].tolist()) != shape:
            raise CheckpointError(
                f"{self.file_of[key]}: tensor {self.stored[parts['weight_shape']]} says {tensors['weight_shape'].tolist()}, "
                f"but the packed weight holds {list(shape)}"
            )
        return from_checkpoint(scheme.format, scheme.group, tensors, shape)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_spec(
    root: nn.Module,
    spec: Spec,
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    fp32_params: tuple[str, ...] = _FP32_PARAMS,
) -> set[str]:
    """Fill root's parameters from the checkpoint per spec; returns the checkpoint keys consumed."""
    used: set[str] = set()
    for name, (parts, dim) in spec.items():
        for key, shape in parts:
            if key not in ckpt.shapes:
                raise CheckpointError(f"{ckpt.dir}: missing tensor {key} (expected shape {list(shape)})")
            if ckpt.shapes[key] != tuple(shape):
                raise CheckpointError(
                    f"{ckpt.dir}: tensor {key} has shape {list(ckpt.shapes[key])}, expected {list(shape)}"
                )
        quantized = [key in ckpt.quant for key, _ in parts]
        if any(quantized):
            _load_quantized(root, name, parts, dim, quantized, ckpt, device)
            used.update(k for key, _ in parts for k in (key, *ckpt.quant[key].values()))
            continue
        want = torch.float32 if name.rsplit(".", 1)[-1] in fp32_params else dtype
        tensors = [ckpt.get(key).to(device=device, dtype=want) for key, _ in parts]
        _set_param(root, name, tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim))
        del tensors
        used.update(key for key, _ in parts)
    return used


def _load_quantized(root, name, parts, dim, quantized, ckpt: Checkpoint, device) -> None:
    """Hand a quantized weight (its parts fused along the outputs) to the module that holds it."""
    key0 = parts[0][0]
    label = _FORMAT_NAMES[ckpt.scheme.format]
    if not all(quantized):
        plain = next(key for (key, _), q in zip(parts, quantized, strict=True) if not q)
        raise CheckpointError(
            f"{ckpt.file_of[key0]}: tensor {key0} is {label} but {plain}, fused with it into {name}, is not"
        )
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    hook = getattr(mod, "load_quantized", None)
    if hook is None or (len(parts) > 1 and dim != len(parts[0][1]) - 2):
        raise CheckpointError(
            f"{ckpt.file_of[key0]}: tensor {ckpt.stored[ckpt.quant[key0][_CODES[ckpt.scheme.format][0]]]} is "
            f"{label}, but the engine holds {name} in full precision (only projections and experts can be quantized)"
        )
    q = concat_outputs([ckpt.get_quantized(key) for key, _ in parts])
    hook(attr, q.to(device) if device.type != "cpu" else q)


def check_unexpected(ckpt: Checkpoint, used: set[str], ignored_prefixes: tuple[str, ...] = ()) -> None:
    extra = [k for k in ckpt.keys() if k not in used and not k.startswith(ignored_prefixes)]
    if extra:
        k = sorted(extra)[0]
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{ckpt.dir}: unexpected tensor {k} with shape {list(ckpt.shapes[k])}, not part of the model the "
            f"config describes{more}"
        )
