"""The pure-PyTorch reference of every op: the one place each is written.

Each function here is at once the test oracle, the `torch` backend, the benchmark baseline and the
"equivalent code" a kernel's docstring points to. Tests and benchmarks import these; nobody rewrites
them. They follow the released Würstchen code (and diffusers) operation for operation, so the
`torch` backend reproduces the reference models bit for bit. One module per op family.
"""
from .norm import layer_norm_2d
from .ddpm import ddpm_step_fused
from .mixing import norm_mod

from .convnext import dwconv_ln, grn, resblock, resblock_stage_b
from .modulation import modulate
from .attention import attn_block, multihead_attention

__all__ = ["layer_norm_2d", "ddpm_step_fused", "norm_mod", "dwconv_ln", "grn", "resblock", "resblock_stage_b", "modulate", "attn_block", "multihead_attention"]
