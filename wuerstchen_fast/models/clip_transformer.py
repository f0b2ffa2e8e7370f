"""The pre-LN transformer of CLIP's text and vision towers, with open_clip's parameter names, and the
conversion of transformers' CLIP encoder layers to them.

    transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}

Attention is fused-QKV (`nn.MultiheadAttention`'s names) over (B, L, width) rows; `mask` is a boolean
(B or 1, 1, L, L) "may attend" mask or None (the vision tower). Activation "gelu" (laion towers) or
"quick_gelu" (OpenAI CLIP).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CLIPTransformer", "CLIPResidualBlock", "encoder_layers_from_transformers", "check_activation"]

ACTIVATIONS = ("gelu", "quick_gelu")


def check_activation(act: str, error=ValueError) -> str:
    if act not in ACTIVATIONS:
        raise error(f"CLIP activation {act!r} is not supported; supported: {ACTIVATIONS}")
    return act


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.act = act

    def forward(self, x):
        h = self.c_fc(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.c_proj(h)


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, act: str, ln_eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = _SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = _Mlp(width, mlp_width, check_activation(act))

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class CLIPTransformer(nn.Module):
    def __init__(self, width: int, heads: int, layers: int, mlp_width: int, act: str, ln_eps: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"CLIP transformer: width={width} must be divisible by heads={heads}")
        self.resblocks = nn.ModuleList([CLIPResidualBlock(width, heads, mlp_width, act, ln_eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


_RENAME = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
           "self_attn.out_proj": "attn.out_proj"}


def encoder_layers_from_transformers(sd: dict, out: dict) -> None:
    """Move transformers' `encoder.layers.N.*` out of `sd` into `out` as `transformer.resblocks.N.*`
    (q/k/v concatenated to in_proj). A missing key raises KeyError naming it."""
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for a, b in _RENAME.items():
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
