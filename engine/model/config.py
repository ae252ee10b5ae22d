"""Step 3.7 Flash configuration, normalised from either config dialect into plain dataclasses.

Two dialects exist for the same model:
- the hub's (remote-code era): per-layer lists padded with the MTP layers (`layer_types`, `rope_theta`,
  `partial_rotary_factors`, `swiglu_limits*`), `moe_layers_enum`, `attention_other_setting`,
  `rope_scaling`, `num_nextn_predict_layers`, and aliases such as `moe_num_experts`;
- the one `transformers` writes: trimmed lists, `mlp_layer_types`, `num_sliding_attention_heads`,
  `per_layer_config`, `rope_parameters` keyed by layer type, `mtp_*` lists.
Both become one `ModelConfig`, so nothing downstream knows which dialect a checkpoint used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"

# Hub aliases -> canonical names (mirrors transformers' Step3p7TextConfig.attribute_map).
_ALIASES = {
    "num_attention_groups": "num_key_value_heads",
    "moe_num_experts": "n_routed_experts",
    "num_local_experts": "n_routed_experts",
    "moe_top_k": "num_experts_per_tok",
    "share_expert_dims": "share_expert_dim",
    "num_mtp_layers": "num_nextn_predict_layers",
}


class ConfigError(ValueError):
    """A config.json that cannot describe a Step model."""


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    partial_rotary_factor: float = 1.0
    rope_type: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LayerSpec:
    """Everything that may differ between decoder layers."""

    attention: str  # FULL or SLIDING
    mlp: str  # "dense" or "sparse"
    num_heads: int
    swiglu_limit: float  # routed experts; 0 means no clamp
    swiglu_limit_shared: float  # shared expert (or dense MLP); 0 means no clamp


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    sliding_window: int | None
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    share_expert_dim: int
    moe_router_scaling_factor: float
    query_pre_attn_scalar: float
    layers: list[LayerSpec]
    mtp_layers: list[LayerSpec]
    rope: dict[str, RopeSpec]
    pad_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def layer_types(self) -> list[str]:
        return [layer.attention for layer in self.layers]


@dataclass
class ModelConfig:
    text: TextConfig
    vision: dict[str, Any] | None  # raw vision_config, interpreted by advisor.engine.model.vision
    image_token_id: int | None
    projector_bias: bool
    dtype: str | None  # checkpoint dtype as declared ("bfloat16", ...), if any
    raw: dict[str, Any]


def _canon(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for alias, name in _ALIASES.items():
        if alias in out and name not in out:
            out[name] = out[alias]
    return out


def _per_layer(value: Any, n: int, name: str, default: float = 0.0) -> list[float]:
    """A per-layer list (legacy lists carry trailing MTP entries) -> exactly n entries, None -> 0."""
    if value is None:
        return [default] * n
    if not isinstance(value, list):
        return [float(value)] * n
    if len(value) < n:
        raise ConfigError(f"config.json: {name} has {len(value)} entries, expected at least {n}")
    return [float(v) if v is not None else default for v in value[:n]]


def _rope_from_dict(p: dict[str, Any]) -> RopeSpec:
    rope_type = p.get("rope_type", p.get("type", "default")) or "default"
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"config.json: unsupported rope_type {rope_type!r} (supported: default, llama3)")
    return RopeSpec(
        theta=float(p.get("rope_theta", 10000.0)),
        partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0) or 1.0),
        rope_type=rope_type,
        factor=float(p.get("factor", 1.0)),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(p.get("original_max_position_embeddings", 8192)),
    )


def parse_text_config(tc: dict[str, Any]) -> TextConfig:
    tc = _canon(tc)
    try:
        n = int(tc["num_hidden_layers"])
        hidden = int(tc["hidden_size"])
        num_heads = int(tc["num_attention_heads"])
    except KeyError as e:
        raise ConfigError(f"config.json: text config lacks {e.args[0]!r}") from None
    n_mtp = int(tc.get("num_nextn_predict_layers", 0) or 0)
    padded = n + n_mtp
    head_dim = int(tc.get("head_dim") or hidden // num_heads)

    # Attention types: transformers writes trimmed `layer_types` + `mtp_layer_types`; the hub pads.
    layer_types = tc.get("layer_types")
    if layer_types is None:
        layer_types = [FULL] * padded
    elif len(layer_types) == n and tc.get("mtp_layer_types") is not None:
        layer_types = list(layer_types) + list(tc["mtp_layer_types"])
    elif len(layer_types) == n:
        layer_types = list(layer_types) + [FULL] * n_mtp
    if len(layer_types) < padded:
        raise ConfigError(
            f"config.json: layer_types has {len(layer_types)} entries, expected {n} (+{n_mtp} MTP)"
        )
    for t in layer_types:
        if t not in (FULL, SLIDING):
            raise ConfigError(f"config.json: unsupported layer type {t!r} (supported: {FULL}, {SLIDING})")

    # MLP types: `mlp_layer_types` (+ `mtp_mlp_layer_types`) or the legacy `moe_layers_enum`.
    mlp_types = tc.get("mlp_layer_types")
    if mlp_types is not None:
        mlp_types = list(mlp_types)
        if len(mlp_types) == n:
            mlp_types += list(tc.get("mtp_mlp_layer_types") or ["dense"] * n_mtp)
    else:
        enum = tc.get("moe_layers_enum")
        if enum is not None:
            items = enum.split(",") if isinstance(enum, str) else enum
            moe_set = {int(i) for i in items if str(i).strip()}
        else:
            moe_set = set(range(3, n))
        mlp_types = ["sparse" if i in moe_set else "dense" for i in range(padded)]
    if len(mlp_types) < padded:
        raise ConfigError(f"config.json: mlp_layer_types has {len(mlp_types)} entries, expected {padded}")

    # Heads per layer: transformers' `per_layer_config` wins, then `num_sliding_attention_heads`,
    # then the hub's `attention_other_setting` (which applies to sliding layers).
    sliding_heads = tc.get("num_sliding_attention_heads")
    if sliding_heads is None:
        other = tc.get("attention_other_setting") or {}
        sliding_heads = other.get("num_attention_heads", num_heads)
        other_kv = other.get("num_attention_groups", other.get("num_key_value_heads"))
        if other_kv is not None and int(other_kv) != int(tc.get("num_key_value_heads", other_kv)):
            raise ConfigError("config.json: attention_other_setting changes the KV head count; not supported")
    per_layer = {int(k): v for k, v in (tc.get("per_layer_config") or {}).items()}
    heads = []
    for i in range(padded):
        h = num_heads if layer_types[i] == FULL else int(sliding_heads)
        if i in per_layer and "num_attention_heads" in per_layer[i]:
            h = int(per_layer[i]["num_attention_heads"])
        heads.append(h)

    limits = _per_layer(tc.get("swiglu_limits"), n, "swiglu_limits")
    limits_shared = _per_layer(tc.get("swiglu_limits_shared"), n, "swiglu_limits_shared")
    # MTP entries exist only in the legacy (padded) lists.
    raw_l, raw_s = tc.get("swiglu_limits"), tc.get("swiglu_limits_shared")
    mtp_l = (
        _per_layer(raw_l[n:], n_mtp, "swiglu_limits")
        if isinstance(raw_l, list) and len(raw_l) >= padded
        else [0.0] * n_mtp
    )
    mtp_s = (
        _per_layer(raw_s[n:], n_mtp, "swiglu_limits_shared")
        if isinstance(raw_s, list) and len(raw_s) >= padded
        else [0.0] * n_mtp
    )
    all_l, all_s = limits + mtp_l, limits_shared + mtp_s
    specs = [LayerSpec(layer_types[i], mlp_types[i], heads[i], all_l[i], all_s[i]) for i in range(padded)]

    # RoPE per attention type.
    rope: dict[str, RopeSpec] = {}
    rp = tc.get("rope_parameters")
    if isinstance(rp, dict) and any(isinstance(rp.get(t), dict) for t in (FULL, SLIDING)):
        for t, p in rp.items():
            if isinstance(p, dict):
                rope[t] = _rope_from_dict(p)
    else:
        base = rp if isinstance(rp, dict) else {}
        thetas = tc.get("rope_theta", base.get("rope_theta", 10000.0))
        partials = tc.get(
            "partial_rotary_factors", tc.get("partial_rotary_factor", base.get("partial_rotary_factor"))
        )
        scaling = tc.get("rope_scaling")
        for t in (FULL, SLIDING):
            if t not in layer_types[:n]:
                continue
            i = layer_types.index(t)
            p = {"rope_theta": thetas[i] if isinstance(thetas, list) else thetas}
            if partials is not None:
                p["partial_rotary_factor"] = partials[i] if isinstance(partials, list) else partials
            if scaling and t == FULL:
                p.update(scaling)
            rope[t] = _rope_from_dict(p)
    for t in set(layer_types):
        if t not in rope:
            rope[t] = rope.get(FULL) or RopeSpec(theta=10000.0)

    eos = tc.get("eos_token_id")
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return TextConfig(
        vocab_size=int(tc["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(tc.get("intermediate_size", 11264)),
        num_hidden_layers=n,
        num_key_value_heads=int(tc.get("num_key_value_heads", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-5)),
        sliding_window=int(tc["sliding_window"]) if tc.get("sliding_window") else None,
        moe_intermediate_size=int(tc.get("moe_intermediate_size", 1280)),
        n_routed_experts=int(tc.get("n_routed_experts", 288)),
        num_experts_per_tok=int(tc.get("num_experts_per_tok", 8)),
        share_expert_dim=int(tc.get("share_expert_dim", 1280)),
        moe_router_scaling_factor=float(tc.get("moe_router_scaling_factor", 1.0)),
        query_pre_attn_scalar=float(tc.get("query_pre_attn_scalar") or head_dim),
        layers=specs[:n],
        mtp_layers=specs[n:padded],
        rope=rope,
        pad_token_id=tc.get("pad_token_id"),
        eos_token_ids=eos_ids,
    )


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Normalise a config.json dict (multimodal `step3p7` or a bare text config)."""
    if "text_config" in raw and isinstance(raw["text_config"], dict):
        tc = dict(raw["text_config"])
        vision = raw.get("vision_config")
    else:
        tc, vision = dict(raw), None
    # Top-level eos/pad apply when the text config does not say.
    for key in ("eos_token_id", "pad_token_id"):
        if tc.get(key) is None and raw.get(key) is not None:
            tc[key] = raw[key]
    text = parse_text_config(tc)
    image_token_id = raw.get("image_token_id", raw.get("im_patch_token_id"))
    return ModelConfig(
        text=text,
        vision=vision if isinstance(vision, dict) else None,
        image_token_id=int(image_token_id) if image_token_id is not None else None,
        projector_bias=bool(raw.get("projector_bias", False)),
        dtype=raw.get("dtype") or raw.get("torch_dtype") or tc.get("dtype") or tc.get("torch_dtype"),
        raw=raw,
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (plus eos ids from generation_config.json)."""
    d = Path(path)
    f = d / "config.json" if d.is_dir() else d
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{f}: no config.json in the checkpoint directory") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: invalid JSON ({e})") from None
    cfg = parse_config(raw)
    gen = f.parent / "generation_config.json"
    if not cfg.text.eos_token_ids and gen.exists():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        if eos is not None:
            cfg.text.eos_token_ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    return cfg
