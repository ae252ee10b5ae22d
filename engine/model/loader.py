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
from safetensors import safe_open
from torch import nn

from engine.model.layers import Spec

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
# Tensors that only FP8 / NVFP4 exports carry.
_QUANT_SUFFIXES = ("weight_scale", "weight_scale_inv", "weight_scale_2", "input_scale")
_QUANT_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8"}
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

    def __init__(self, path: str | Path):
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
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.file_of: dict[str, Path] = {}
        for f in files:
            for key, info in _check_file(f).items():
                if key == "__metadata__":
                    continue
                if key.endswith(_QUANT_SUFFIXES) or info["dtype"] in _QUANT_DTYPES:
                    raise CheckpointError(
                        f"{f}: tensor {key} ({info['dtype']}) belongs to a quantized export; the engine loads "
                        "bf16/fp16/fp32 checkpoints"
                    )
                self.shapes[key] = tuple(info["shape"])
                self.file_of[key] = f
                self.first_dtype = _ST_DTYPES.get(info["dtype"], torch.float32)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def keys(self) -> Iterable[str]:
        return self.shapes.keys()

    def get(self, key: str) -> torch.Tensor:
        f = self.file_of[key]
        if f not in self._handles:
            try:
                self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: cannot open safetensors file ({e})") from None
        return self._handles[f].get_tensor(key)

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
        want = torch.float32 if name.rsplit(".", 1)[-1] in fp32_params else dtype
        tensors = [ckpt.get(key).to(device=device, dtype=want) for key, _ in parts]
        _set_param(root, name, tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim))
        del tensors
        used.update(key for key, _ in parts)
    return used


def check_unexpected(ckpt: Checkpoint, used: set[str], ignored_prefixes: tuple[str, ...] = ()) -> None:
    extra = [k for k in ckpt.keys() if k not in used and not k.startswith(ignored_prefixes)]
    if extra:
        k = sorted(extra)[0]
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{ckpt.dir}: unexpected tensor {k} with shape {list(ckpt.shapes[k])}, not part of the model the "
            f"config describes{more}"
        )
