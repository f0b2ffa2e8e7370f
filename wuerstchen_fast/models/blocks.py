"""Building blocks shared by Stage C (prior) and Stage B (DiffNeXt decoder).

Parameter names are those of the released checkpoints (spec §1), so state dicts load unchanged.
Each block keeps its arithmetic in a small, separately named method (`_mlp`, `_modulate`,
`_attend`, ...) so a fused op from `wuerstchen_fast.ops` can later replace exactly that method
without touching the module layout. The channel LayerNorm already goes through the op registry
(`ops.layer_norm_2d`).

Layouts: activations are (B, C, H, W); the channelwise MLPs run channels-last (B, H, W, C), as in
the released code, so `nn.Linear` weights keep their (out, in) shape.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wuerstchen_fast import ops
from wuerstchen_fast.ops import registry

__all__ = [
    "LayerNorm2d",
    "GlobalResponseNorm",
    "ResBlock",
    "ResBlockStageB",
    "TimestepBlock",
    "resblock_then_timestep",
    "Attention",
    "AttnBlock",
    "r_embedding",
    "r_frequencies",
    "RFrequencies",
]

LN_EPS = 1e-6  # every LayerNorm in Würstchen: no affine, eps 1e-6


class LayerNorm2d(nn.Module):
    """Channel LayerNorm of a (B, C, H, W) tensor without affine parameters (no state-dict keys)."""

    def __init__(self, eps: float = LN_EPS):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm_2d(x, eps=self.eps)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input (B, H, W, C); `gamma`, `beta` of shape (1, 1, 1, C).

    out = gamma * (x * Nx) + beta + x with Gx = ||x||_2 over (H, W), Nx = Gx / (mean_C Gx + 1e-6).
    Zero-initialized, so an untrained block is the identity.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.grn(x, self.gamma, self.beta)


def _channelwise_mlp(c_in: int, c: int, dropout: float) -> nn.Sequential:
    # Indices matter: keys are channelwise.0 (Linear), .2 (GRN), .4 (Linear).
    return nn.Sequential(
        nn.Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), nn.Linear(c * 4, c)
    )


class ResBlock(nn.Module):
    """Stage C residual block: the skip is concatenated *before* the depthwise conv.

    x -> depthwise(cat[x, skip]) -> LayerNorm2d -> Linear(c,4c) -> GELU -> GRN -> Dropout -> Linear(4c,c) -> + x
    """

    op_name = "resblock"  # the registered op that runs the whole block

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d()
        self.channelwise = _channelwise_mlp(c, c, dropout)

    def _params(self) -> tuple:
        lin1, grn, drop, lin2 = self.channelwise[0], self.channelwise[2], self.channelwise[3], self.channelwise[4]
        return (self.depthwise.weight, self.depthwise.bias, lin1.weight, lin1.bias, grn.gamma, grn.beta,
                lin2.weight, lin2.bias), drop.p

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None,
                mod: tuple | None = None) -> torch.Tensor:
        """The whole block as one op (`ops.resblock`); `mod=(a, b)` folds the next TimestepBlock."""
        params, p = self._params()
        return ops.resblock(x, x_skip, *params, dropout=p, training=self.training, mod=mod, eps=self.norm.eps)

    def folds(self, x: torch.Tensor, x_skip: torch.Tensor | None, mod: tuple) -> bool:
        """Whether the block's op runs fused with `mod` folded in: only when the backend the registry
        picks for it is not the reference. The `torch` backend keeps diffusers' order (the block, then
        the TimestepBlock's own modulate op), so parity with diffusers stays bit-exact; a backend that
        cannot fold (its reasons) leaves the two ops apart rather than dropping to the reference."""
        params, p = self._params()
        try:
            name = registry.resolve(self.op_name, x, x_skip, *params, dropout=p, training=self.training, mod=mod,
                                    eps=self.norm.eps)
        except registry.BackendUnavailableError:
            return False
        return name != "torch"


class ResBlockStageB(nn.Module):
    """Stage B residual block: the skip is concatenated *after* the norm, into the first Linear.

    x -> depthwise(x) -> LayerNorm2d -> cat[., skip] -> Linear(c+c_skip,4c) -> GELU -> GRN -> Dropout
      -> Linear(4c,c) -> + x
    """

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d()
        self.channelwise = _channelwise_mlp(c + c_skip, c, dropout)

    op_name = "resblock_stage_b"
    _params = ResBlock._params
    folds = ResBlock.folds

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None,
                mod: tuple | None = None) -> torch.Tensor:
        """The whole block as one op (`ops.resblock_stage_b`): the skip is the first GEMM's second K-input;
        `mod=(a, b)` folds the next TimestepBlock."""
        params, p = self._params()
        return ops.resblock_stage_b(x, x_skip, *params, dropout=p, training=self.training, mod=mod,
                                    eps=self.norm.eps)


class TimestepBlock(nn.Module):
    """Modulation by the r embedding: a, b = mapper(r).chunk(2); out = x * (1 + a) + b.

    `conds` (Stable Cascade: ("sca", "crp") in Stage C, ("sca",) in Stage B) adds one `mapper_<cond>`
    per extra condition: the r embedding is then [emb(r), emb(cond_1), ...] (c_r wide each) and every
    mapper's (a, b) is summed, in that order, before the modulation.
    """

    def __init__(self, c: int, c_r: int = 64, conds: tuple | list = ()):
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)
        self.conds = tuple(conds)
        for name in self.conds:
            setattr(self, f"mapper_{name}", nn.Linear(c_r, c * 2))

    @staticmethod
    def _modulate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ops.modulate(x, a, b)

    def ab(self, r_embed: torch.Tensor) -> tuple:
        """The (B, C) modulation pair (a, b) of this block for an r embedding."""
        if not self.conds:
            return self.mapper(r_embed).chunk(2, dim=1)
        parts = r_embed.chunk(len(self.conds) + 1, dim=1)
        a, b = self.mapper(parts[0]).chunk(2, dim=1)
        for name, part in zip(self.conds, parts[1:]):
            ac, bc = getattr(self, f"mapper_{name}")(part).chunk(2, dim=1)
            a, b = a + ac, b + bc
        return a, b

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        return self._modulate(x, *self.ab(r_embed))


def resblock_then_timestep(block: ResBlock | ResBlockStageB, timestep: TimestepBlock, x: torch.Tensor,
                           x_skip: torch.Tensor | None, r_embed: torch.Tensor, fold: bool = True) -> torch.Tensor:
    """A ResBlock (either stage) and the TimestepBlock after it: the modulation folds into the block op's
    output epilogue when `fold` and a fused backend runs it (`block.folds`); else the two run apart."""
    a, b = timestep.ab(r_embed)
    if fold and block.folds(x, x_skip, (a, b)):
        return block(x, x_skip, mod=(a, b))
    return timestep._modulate(block(x, x_skip), a, b)


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (`to_q/to_k/to_v/to_out.0`).

    Width of the heads is `(c // nhead) * nhead`, as diffusers builds it. The original checkpoints
    store the same weights as `nn.MultiheadAttention` (`attn.in_proj_weight` [3c, c], `out_proj`);
    the loaders convert (see `loading.py`).
    """

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        if nhead <= 0:
            raise ValueError(f"an attention block needs nhead >= 1, got {nhead}")
        self.nhead = nhead
        inner = (c // nhead) * nhead
        self.to_q = nn.Linear(c, inner)
        self.to_k = nn.Linear(c, inner)
        self.to_v = nn.Linear(c, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, c), nn.Dropout(dropout)])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention over (B, N, heads*d) tensors, softmax scale d**-0.5."""
        b, n, inner = q.shape
        d = inner // self.nhead
        q, k, v = (t.reshape(b, -1, self.nhead, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, inner)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """x: (B, N, c) queries; kv: (B, M, c) keys/values source."""
        out = self._attend(self.to_q(x), self.to_k(kv), self.to_v(kv))
        return self.to_out[1](self.to_out[0](out))


class AttnBlock(nn.Module):
    """Pre-norm attention of image tokens over [image tokens, mapped text tokens] (self_attn=True)."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d()
        self.attention = Attention(c, nhead, dropout=dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The whole block as one op (`ops.attn_block`): K/V read from the image and text tokens, no concat."""
        a, m = self.attention, self.kv_mapper[1]
        return ops.attn_block(x, cond, a.to_q.weight, a.to_q.bias, a.to_k.weight, a.to_k.bias, a.to_v.weight,
                              a.to_v.bias, a.to_out[0].weight, a.to_out[0].bias, m.weight, m.bias, a.nhead,
                              self_attn=self.self_attn, dropout=a.to_out[1].p, training=self.training,
                              eps=self.norm.eps)


def r_frequencies(c_r: int, device=None, max_positions: int = 10000) -> torch.Tensor:
    """f_i = exp(-i ln(10000) / (half - 1)), float32, exactly as the released code computes them."""
    half = c_r // 2
    scale = math.log(max_positions) / (half - 1)
    return torch.arange(half, device=device).float().mul(-scale).exp()


class RFrequencies(nn.Module):
    """The r-embedding frequencies as an eager constant that follows the model's device.

    Why: traced by torch.compile, `exp` compiles to a vectorized exp that differs from ATen's by an
    ulp, and r * 10000 amplifies that to ~5e-4 in the embedding (~3e-3 in images). Computed here,
    eagerly on the device the model moves to (with that device's ATen exp, as the reference code
    does), the compiled graph only reads them. Plain attribute, not a buffer: no state-dict key, and
    `.to(dtype)` leaves them float32, as the released code keeps them.
    """

    def __init__(self, c_r: int, max_positions: int = 10000):
        super().__init__()
        self.c_r, self.max_positions = c_r, max_positions
        self.freqs = r_frequencies(c_r, "cpu", max_positions)

    def _apply(self, fn, recurse=True):
        device = fn(torch.empty(0)).device
        if device != self.freqs.device:
            self.freqs = r_frequencies(self.c_r, device, self.max_positions)
        return super()._apply(fn, recurse)


def r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000,
                freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Sinusoidal embedding of the continuous noise level r in [0, 1]: (B,) -> (B, c_r).

    r' = r * 10000; f_i = exp(-i ln(10000) / (half - 1)); [sin(r' f), cos(r' f)], zero-padded if c_r is odd.
    Frequencies are computed in fp32 and the result cast to r's dtype, as the released code does.
    `freqs`: precomputed `r_frequencies(c_r, r.device)` (the models pass `RFrequencies.freqs`).
    """
    if freqs is None:
        freqs = r_frequencies(c_r, r.device, max_positions)
    args = (r * max_positions)[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype=r.dtype)
