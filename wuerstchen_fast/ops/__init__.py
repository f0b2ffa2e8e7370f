"""Ops of wuerstchen_fast, each dispatched through the backend registry (see registry.py).

Every op here is a plain function `op(*inputs, backend=None)`; its pure-PyTorch reference lives in
`wuerstchen_fast.ops.reference`.
"""
from . import reference, registry
from .layer_norm_2d import layer_norm_2d
from .ddpm import ddpm_step
from .mixing import mixing_dwconv, norm_mod
from .mixing_mlp import mixing_mlp
from .grn import grn
from .dwconv_ln import dwconv_ln
from .modulation import modulate
from .resblock import resblock, resblock_stage_b
from .attention import attn_block
from .registry import BackendUnavailableError, backend, get_backend, set_backend

__all__ = ["layer_norm_2d", "ddpm_step", "norm_mod", "mixing_dwconv", "mixing_mlp", "grn", "dwconv_ln", "modulate", "resblock", "resblock_stage_b", "attn_block", "reference", "registry", "backend", "set_backend", "get_backend",
           "BackendUnavailableError"]
