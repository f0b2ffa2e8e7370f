"""Reference: the attention block (AttnBlock) of Stage C and Stage B (see the package docstring).

Operation for operation what `AttnBlock.forward` and diffusers' `AttnBlock` do (LayerNorm2d, kv_mapper
= SiLU + Linear on the text tokens, K/V from concat[image tokens, mapped text], multi-head attention
with bias through `F.scaled_dot_product_attention`, output Linear, Dropout, residual), with the
modules' `nn.Linear`/`nn.SiLU`/`nn.Dropout` as their functional forms, so the `torch` backend reproduces
diffusers bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .norm import layer_norm_2d

__all__ = ["attn_block", "multihead_attention"]


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nhead: int) -> torch.Tensor:
    """SDPA over (B, N, heads*d) tensors, softmax scale d**-0.5 (diffusers' AttnProcessor2_0)."""
    b, n, inner = q.shape
    d = inner // nhead
    q, k, v = (t.reshape(b, -1, nhead, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner)


def attn_block(x, cond, wq, bq, wk, bk, wv, bv, wo, bo, wkv, bkv, nhead, self_attn=True, dropout=0.0,
               training=False, eps=1e-6):
    """x: (B, C, H, W) image; cond: (B, T, c_cond) text tokens. Returns x + attention output."""
    b, c, h, w = x.shape
    kv = F.linear(F.silu(cond), wkv, bkv)
    tokens = layer_norm_2d(x, eps).reshape(b, c, h * w).transpose(1, 2)
    if self_attn:
        kv = torch.cat([tokens, kv], dim=1)
    out = multihead_attention(F.linear(tokens, wq, bq), F.linear(kv, wk, bk), F.linear(kv, wv, bv), nhead)
    out = F.dropout(F.linear(out, wo, bo), dropout, training)
    return x + out.transpose(1, 2).reshape(b, c, h, w)
