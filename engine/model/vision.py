"""Step 3.7 vision tower and projector, laid out exactly like the published checkpoint.

Parameter names are the checkpoint keys (``vision_model.*``, ``vit_large_projector.weight``), so a
name-based loader can fill a ``StepVision`` straight from the safetensors. That layout is the
Perception-Encoder one: fused ``in_proj`` with q/k in *interleaved* RoPE order (transformers permutes
them to rotate-half on load; we keep the file's order and rotate interleaved pairs instead).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Released tower: its config files omit some of these, transformers falls back to the same values.
_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1536,
    num_hidden_layers=47,
    num_attention_heads=16,
    num_channels=3,
    image_size=728,
    patch_size=14,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
    mlp_ratio=8960 / 1536,
    rope_theta=10000.0,
)
# Hub (remote-code) spellings of the same fields.
_ALIASES = {"width": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads"}
# Each downsampler is a stride-2 conv: two of them shrink the patch grid by 4 per side.
DOWNSAMPLE = 4


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_channels: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    rope_theta: float

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> VisionConfig:
        """Either dialect of ``vision_config`` (hub aliases or transformers' names)."""
        d = dict(_DEFAULTS)
        for k, v in raw.items():
            d[_ALIASES.get(k, k)] = v
        rope = d.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", d["rope_theta"]))
        # transformers always derives the MLP width from mlp_ratio, even when intermediate_size is given.
        inter = int(d["hidden_size"] * d["mlp_ratio"])
        if d["hidden_act"] not in _ACTS:
            raise ValueError(f"vision_config.hidden_act: unsupported activation {d['hidden_act']!r}")
        if d["hidden_size"] % d["num_attention_heads"] or (d["hidden_size"] // d["num_attention_heads"]) % 4:
            raise ValueError(
                f"vision_config: hidden_size {d['hidden_size']} / num_attention_heads "
                f"{d['num_attention_heads']} must give a head_dim divisible by 4 (2-D RoPE)"
            )
        return cls(
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            intermediate_size=inter,
            num_channels=int(d["num_channels"]),
            image_size=int(d["image_size"]),
            patch_size=int(d["patch_size"]),
            layer_norm_eps=float(d["layer_norm_eps"]),
            hidden_act=str(d["hidden_act"]),
            rope_theta=theta,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tokens_per_side(self, pixels: int) -> int:
        """Feature tokens along one side of a square view of ``pixels`` (two pad-1 stride-2 convs)."""
        g = pixels // self.patch_size
        for _ in range(2):
            g = (g - 1) // 2 + 1
        return g


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x [B, H, N, D] by angle i; cos/sin are [N, D/2], fp32."""
    dtype = x.dtype
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return out.flatten(-2).to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d))
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = _rope_interleaved(q, cos, sin), _rope_interleaved(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ResBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls_1 = LayerScale(cfg.hidden_size)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls_2 = LayerScale(cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), cos, sin))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class _Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """ViT + the two stride-2 conv downsamplers; keys as under ``vision_model.`` in the checkpoint."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.conv1 = nn.Conv2d(cfg.num_channels, c, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty((cfg.image_size // cfg.patch_size) ** 2, c))
        self.ln_pre = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.transformer = _Transformer(cfg)
        self.vit_downsampler1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.vit_downsampler2 = nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1)

    def _positions(self, gh: int, gw: int, dtype: torch.dtype) -> torch.Tensor:
        pos = self.positional_embedding
        side = math.isqrt(pos.shape[0])
        if (gh, gw) == (side, side):
            return pos.to(dtype)
        grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # Bilinear, not bicubic, as in the reference (and the released model's training).
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(dtype)

    def _rope(self, gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles per interleaved pair: the first quarter of the head turns with the column, the next with the row."""
        quarter = self.cfg.head_dim // 4
        inv = 1.0 / (
            self.cfg.rope_theta ** (torch.arange(0, quarter, device=device, dtype=torch.float) / quarter)
        )
        rows = torch.arange(gh, device=device).repeat_interleave(gw).float()
        cols = torch.arange(gw, device=device).repeat(gh).float()
        ang = torch.cat((cols[:, None] * inv, rows[:, None] * inv), dim=-1)
        return ang.cos(), ang.sin()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, (H/p/4) * (W/p/4), 4 * hidden], row-major over the downsampled grid."""
        b, _, h, w = pixel_values.shape
        gh, gw = h // self.cfg.patch_size, w // self.cfg.patch_size
        dtype = self.conv1.weight.dtype
        x = self.conv1(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        x = self.ln_pre(x + self._positions(gh, gw, x.dtype))
        cos, sin = self._rope(gh, gw, x.device)
        for blk in self.transformer.resblocks:
            x = blk(x, cos, sin)
        x = x.transpose(1, 2).reshape(b, -1, gh, gw)
        x = self.vit_downsampler2(self.vit_downsampler1(x))
        return x.flatten(2).transpose(1, 2)


class StepVision(nn.Module):
    """Vision tower + projector into the text hidden size; ``state_dict()`` keys are the checkpoint's."""

    def __init__(self, cfg: VisionConfig, text_hidden_size: int, projector_bias: bool = False):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTower(cfg)
        self.vit_large_projector = nn.Linear(4 * cfg.hidden_size, text_hidden_size, bias=projector_bias)

    def encode(self, pixel_values: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """[B, 3, S, S] -> [B, tokens, text_hidden]; ``batch`` views at a time to bound activation memory."""
        outs = [
            self.vit_large_projector(self.vision_model(pixel_values[i : i + batch]))
            for i in range(0, pixel_values.shape[0], batch)
        ]
        return torch.cat(outs)

    @torch.inference_mode()
    def image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_values_local: torch.Tensor | None = None,
        num_local_patches: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Features in ``<im_patch>`` order: per image, its local crops (in crop order), then its global view.

        Matches ``Step3p7Model.get_image_features`` concatenated over images, i.e. what the reference
        scatters into the image-token positions. Returns [N_image_tokens, text_hidden].
        """
        n_img = pixel_values.shape[0]
        counts = [0] * n_img if num_local_patches is None else [int(c) for c in num_local_patches]
        if len(counts) != n_img:
            raise ValueError(
                f"num_local_patches has {len(counts)} entries for {n_img} images in pixel_values"
            )
        total = sum(counts)
        have = 0 if pixel_values_local is None else pixel_values_local.shape[0]
        if total != have:
            raise ValueError(f"num_local_patches sums to {total} but pixel_values_local holds {have} crops")
        glob = self.encode(pixel_values)
        loc = self.encode(pixel_values_local) if total else None
        parts: list[torch.Tensor] = []
        start = 0
        for i, c in enumerate(counts):
            if c:
                parts.append(loc[start : start + c].reshape(-1, loc.shape[-1]))
                start += c
            parts.append(glob[i])
        return torch.cat(parts)


def build_vision(
    vision_config: Mapping[str, Any],
    text_hidden_size: int,
    projector_bias: bool = False,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.float32,
) -> StepVision:
    """An empty ``StepVision`` (on ``meta`` by default) for a loader to fill by name, e.g. with
    ``load_state_dict(tensors, assign=True)``; keys as in :func:`vision_keys`."""
    with torch.device(device):
        model = StepVision(VisionConfig.from_dict(vision_config), text_hidden_size, projector_bias)
    return model.to(dtype).eval()


# Some exports put the downsamplers at the top level instead of under vision_model.
_TOP_LEVEL_DOWNSAMPLERS = ("vit_downsampler1.", "vit_downsampler2.")


def checkpoint_key(key: str) -> str:
    """Our parameter name for a checkpoint key (identity except top-level downsamplers)."""
    return "vision_model." + key if key.startswith(_TOP_LEVEL_DOWNSAMPLERS) else key


def vision_keys(model: StepVision) -> dict[str, tuple[int, ...]]:
    """Parameter name -> expected shape, for a loader's missing/mis-shaped checks."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_vision(
    vision_config: Mapping[str, Any],
    text_hidden_size: int,
    tensors: Mapping[str, torch.Tensor],
    projector_bias: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StepVision:
    """Build and fill from ``{checkpoint key: tensor}`` (only vision keys are looked at).

    A missing or mis-shaped tensor is an error naming it and both shapes.
    """
    model = build_vision(vision_config, text_hidden_size, projector_bias, device="meta", dtype=dtype)
    want = vision_keys(model)
    got = {checkpoint_key(k): v for k, v in tensors.items() if checkpoint_key(k) in want}
    for name, shape in want.items():
        if name not in got:
            raise ValueError(f"vision checkpoint: missing tensor {name} (expected shape {list(shape)})")
        if tuple(got[name].shape) != shape:
            raise ValueError(
                f"vision checkpoint: tensor {name} has shape {list(got[name].shape)}, expected {list(shape)}"
            )
    state = {k: v.to(device=device, dtype=dtype) for k, v in got.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()
