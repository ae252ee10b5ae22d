"""Tile configurations for the fused MoE kernels.

Tables live in `configs/` as JSON, one file per shape and dtype: `E{E}_N{I}_K{H}_{dtype}.json`
(N = expert intermediate size, K = hidden size), mapping a batch size (tokens per call, as a string) to
{"BLOCK_M", "gate_up": {...}, "down": {...}} where each GEMM's entry has BLOCK_N, BLOCK_K, GROUP_M,
num_warps, num_stages. The entry whose batch key is nearest to the call's token count is used (vLLM's
convention); shapes without a table fall back to `default_config`. Nothing is autotuned at import.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEConfig:
    BLOCK_M: int  # shared by both GEMMs: the alignment pads each expert's rows to it
    gate_up: GemmConfig
    down: GemmConfig


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"fused_moe: unsupported dtype {dtype} (fp32, fp16, bf16)") from None


def config_path(num_experts: int, inter: int, hidden: int, dtype: torch.dtype) -> Path:
    return CONFIG_DIR / f"E{num_experts}_N{inter}_K{hidden}_{dtype_name(dtype)}.json"


def _parse_gemm(raw: object, where: str) -> GemmConfig:
    if not isinstance(raw, dict) or set(raw) - set(_GEMM_KEYS) or not {"BLOCK_N", "BLOCK_K"} <= set(raw):
        raise ValueError(f"{where}: expected keys BLOCK_N, BLOCK_K (optional GROUP_M, num_warps, num_stages)")
    if not all(isinstance(v, int) and v > 0 for v in raw.values()):
        raise ValueError(f"{where}: values must be positive integers, got {raw}")
    return GemmConfig(**raw)


@functools.cache
def load_table(path: Path) -> dict[int, MoEConfig] | None:
    """The table at `path` keyed by batch size, or None when there is no file. Malformed files raise a
    one-line ValueError naming the file and the entry."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    table: dict[int, MoEConfig] = {}
    for key, entry in raw.items():
        if key.startswith("_"):  # comments / provenance
            continue
        where = f"{path} [{key!r}]"
        if not key.isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("BLOCK_M"), int):
            raise ValueError(f"{where}: expected a batch-size key with BLOCK_M, gate_up and down")
        table[int(key)] = MoEConfig(
            entry["BLOCK_M"],
            _parse_gemm(entry.get("gate_up"), f"{where}.gate_up"),
            _parse_gemm(entry.get("down"), f"{where}.down"),
        )
    return table or None


def _pow2_at_most(n: int, cap: int) -> int:
    """Smallest power of two >= n, capped at `cap`, and at least 16 (tl.dot's minimum tile side)."""
    p = 16
    while p < n and p < cap:
        p *= 2
    return p


def default_config(num_tokens: int, num_experts: int, top_k: int, inter: int, hidden: int) -> MoEConfig:
    """Heuristic when no table matches: BLOCK_M follows the average rows per expert (decode hits many
    experts with one or two rows each: small M tiles waste least); N/K tiles are wide to stream weights."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64
    big = rows_per_expert > 64
    gate_up = GemmConfig(
        BLOCK_N=_pow2_at_most(inter, 64 if big else 64),
        BLOCK_K=_pow2_at_most(hidden, 64 if big else 128),
        GROUP_M=8 if big else 1,
        num_warps=4,
        num_stages=3 if big else 4,
    )
    down = GemmConfig(
        BLOCK_N=_pow2_at_most(hidden, 128 if big else 64),
        BLOCK_K=_pow2_at_most(inter, 64 if big else 128),
        GROUP_M=8 if big else 1,
        num_warps=4,
        num_stages=3 if big else 4,
    )
    return MoEConfig(block_m, gate_up, down)


def get_config(
    num_tokens: int, num_experts: int, top_k: int, inter: int, hidden: int, dtype: torch.dtype
) -> MoEConfig:
    table = load_table(config_path(num_experts, inter, hidden, dtype))
    if table is None:
        return default_config(num_tokens, num_experts, top_k, inter, hidden)
    return table[min(table, key=lambda b: (abs(b - num_tokens), b))]
