"""attn_block: the AttnBlock of Stage C and Stage B as one op (op family 3).

    attn_block(x, cond, wq, bq, wk, bk, wv, bv, wo, bo, wkv, bkv, nhead, *, self_attn, dropout, training,
               eps, backend, variant)

Layers as in layer_norm_2d.py: reference (`reference.attn_block`, the `torch` backend, bit-exact with
diffusers) -> kernels (kernels/triton/attention.py: two-source flash attention; the LayerNorm2d kernel
of kernels/triton/layer_norm_2d.py writing token rows) -> front op `wuerstchen_fast::attn_block(...,
variant) -> (out, tokens, kvm, qkv, kv2, o, lse)` with fake and autograd (the extra outputs
are the activations the backward needs) -> `wuerstchen_fast::attn_block_backward`.

The triton backend: Triton LayerNorm2d straight into (B·H·W, C) token rows; cuBLAS GEMMs for Q/K/V
of the image tokens and K/V of the mapped text (kv_mapper = SiLU + Linear, torch); the attention core
reads K/V from the two sources (image, text) without a concatenated tensor; out-projection GEMM, then
the residual add. Two variants of the core:
    "flash"  the Triton kernel (forward; backward recomputes P from the saved logsumexp and writes
             dK/dV of each source separately).
    "sdpa"   PyTorch's scaled_dot_product_attention on concatenated K/V (cuDNN / FlashAttention-2 /
             memory-efficient inside); its backward is the math form in float32 (P recomputed whole;
             torch.func/autograd cannot run inside the registered op under opcheck's dispatch modes).
`choose_variant` picks per shape: the measured table (`VARIANT_TABLE`, filled by `record_variant`
from bench/bench_ops_attention.py on a GPU) first, else the rule stated there.
Dropout > 0 in training (to_out's Dropout) is not fused: the triton backend reports it as a reason.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends as bk
from . import registry
from .layout import empty_out_like
from .reference.attention import attn_block as _ref_attn_block
from .reference.attention import multihead_attention

__all__ = ["attn_block", "choose_variant", "record_variant", "VARIANTS", "VARIANT_TABLE"]

VARIANTS = ("flash", "sdpa")
# (device name, dtype, batch, heads, head dim, queries, keys of source 1, keys of source 2) -> variant,
# from measurements (bench/bench_ops_attention.py).
VARIANT_TABLE: dict = {}


def _key(x, cond, wq, nhead, self_attn):
    B, C, H, W = x.shape
    return (x.dtype, B, nhead, wq.shape[0] // nhead, H * W, H * W if self_attn else 0, cond.shape[1])


def record_variant(device_name: str, dtype: torch.dtype, B: int, nhead: int, head_dim: int, Nq: int, N1: int,
                   N2: int, variant: str) -> None:
    """The hook for measurement-based selection: store the faster variant measured at this shape."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    VARIANT_TABLE[(device_name, dtype, B, nhead, head_dim, Nq, N1, N2)] = variant


def choose_variant(x, cond, wq, nhead, self_attn=True) -> str:
    """Measured choice if recorded, else the intended rule (to be replaced by measurements): "flash"
    (one kernel over both sources, no concatenated K/V copy) for head dims the kernel tiles without
    padding (powers of two 16..128), "sdpa" otherwise. On CPU (the interpreter) "flash", so the
    kernel is what the tests exercise."""
    if VARIANT_TABLE and x.device.type == "cuda":
        hit = VARIANT_TABLE.get((torch.cuda.get_device_name(x.device), *_key(x, cond, wq, nhead, self_attn)))
        if hit is not None:
            return hit
    d = wq.shape[0] // nhead
    if x.device.type != "cuda":
        return "flash"
    return "flash" if d in (16, 32, 64, 128) else "sdpa"


def _k():
    from ..kernels.triton import attention, layer_norm_2d

    return attention, layer_norm_2d


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B·H·W, C) rows (a view for channels-last, a copy otherwise)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _ln_rows(x, eps):
    """LayerNorm2d of x written as (B·H·W, C) row-major token rows, in x.dtype (Triton kernel)."""
    _, kl = _k()
    B, C, H, W = x.shape
    y = torch.empty(B, H, W, C, device=x.device, dtype=x.dtype)
    if y.numel():
        yv = y.permute(0, 3, 1, 2)
        bc, bp, nw = kl._tiles(x)
        grid = (-(-(H * W) // bp), B)
        kl._ln2d_fwd_kernel[grid](x, yv, C, H * W, W, *x.stride(), *yv.stride(), eps, BLOCK_C=bc, BLOCK_P=bp,
                                  num_warps=nw)
    return y.view(B * H * W, C)


# ------------------------------------------------------------------------------ forward / backward

def _split(qkv, kv2, inner):
    """Views q, k1, v1 (image tokens; k1/v1 empty without self-attention) and k2, v2 (text tokens)."""
    q, k1, v1 = qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., 2 * inner:]
    if qkv.shape[-1] == inner:
        k1, v1 = qkv[:, :0], qkv[:, :0]
    return q, k1, v1, kv2[..., :inner], kv2[..., inner:]


def _forward(x, cond, wq, bq, wk, bk_, wv, bv, wo, bo, wkv, bkv, nhead, self_attn, eps, variant):
    ka, _ = _k()
    B, C, H, W = x.shape
    T, inner = cond.shape[1], wq.shape[0]
    tokens = _ln_rows(x, eps)
    kvm = torch.addmm(bkv, F.silu(cond).reshape(B * T, -1), wkv.t())
    # one GEMM for Q/K/V of the image tokens, one for K/V of the text: q, k1, v1 are column slices
    # of qkv (the kernel reads them with their row stride), no separate tensors, no concatenated K/V.
    if self_attn:
        qkv = torch.addmm(torch.cat([bq, bk_, bv]), tokens, torch.cat([wq, wk, wv]).t()).view(B, H * W, 3 * inner)
    else:
        qkv = torch.addmm(bq, tokens, wq.t()).view(B, H * W, inner)
    kv2 = torch.addmm(torch.cat([bk_, bv]), kvm, torch.cat([wk, wv]).t()).view(B, T, 2 * inner)
    q, k1, v1, k2, v2 = _split(qkv, kv2, inner)
    if variant == "flash":
        o, lse = ka.attn_fwd(q, k1, v1, k2, v2, nhead)
    else:
        o = multihead_attention(q, torch.cat([k1, k2], 1), torch.cat([v1, v2], 1), nhead)
        lse = x.new_empty(0, dtype=torch.float32)
    proj = torch.addmm(bo, o.reshape(B * H * W, inner), wo.t())
    out = torch.add(x, proj.view(B, H, W, C).permute(0, 3, 1, 2), out=empty_out_like(x))
    return out, tokens, kvm, qkv, kv2, o, lse


def _math_attn_bwd(do, q, k1, v1, k2, v2, nhead):
    """dq, dk1, dv1, dk2, dv2 of softmax(q·kᵀ/√d)·v over K/V = [k1; k2], [v1; v2], in float32."""
    B, N, inner = q.shape
    d = inner // nhead
    heads = lambda t: t.float().reshape(B, t.shape[1], nhead, d).transpose(1, 2)  # noqa: E731
    qh, kh, vh, doh = heads(q), heads(torch.cat([k1, k2], 1)), heads(torch.cat([v1, v2], 1)), heads(do)
    p = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)
    dv = p.transpose(-1, -2) @ doh
    dp = doh @ vh.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * d ** -0.5
    dq, dk = ds @ kh, ds.transpose(-1, -2) @ qh
    flat = lambda t: t.transpose(1, 2).reshape(B, t.shape[2], inner)  # noqa: E731
    n1 = k1.shape[1]
    dk, dv = flat(dk), flat(dv)
    return flat(dq), dk[:, :n1], dv[:, :n1], dk[:, n1:], dv[:, n1:]


def _backward_impl(grad, x, cond, wq, wk, wv, wo, wkv, tokens, kvm, qkv, kv2, o, lse, nhead, eps, variant):
    ka, kl = _k()
    B, C, H, W = x.shape
    T, inner = cond.shape[1], wq.shape[0]
    self_attn = qkv.shape[-1] == 3 * inner
    g = _rows(grad)
    o2 = o.reshape(B * H * W, inner)
    dbo, dwo = g.sum(0), g.t() @ o2
    do = (g @ wo).view(B, H * W, inner)
    # gradients land in one buffer per source, laid out as qkv / kv2, so each GEMM below is one call
    dqkv, dkv2 = torch.empty_like(qkv), torch.empty_like(kv2)
    grads = _split(dqkv, dkv2, inner)
    if variant == "flash":
        res = ka.attn_bwd(do, *_split(qkv, kv2, inner), o, lse, nhead, out=grads)
    else:  # math backward in float32 (P recomputed whole: (B, heads, Nq, Nk) floats of memory)
        for dst, src in zip(grads, _math_attn_bwd(do, *_split(qkv, kv2, inner), nhead)):
            dst.copy_(src)
    dqkv, dkv2 = dqkv.view(B * H * W, -1), dkv2.view(B * T, 2 * inner)
    wqkv = torch.cat([wq, wk, wv]) if self_attn else wq
    dtok = dqkv @ wqkv
    dwqkv, dbqkv = dqkv.t() @ tokens, dqkv.sum(0)
    dkvm = dkv2 @ torch.cat([wk, wv])
    dwkv2, dbkv2 = dkv2.t() @ kvm, dkv2.sum(0)
    dwq, dbq = dwqkv[:inner], dbqkv[:inner]
    dwk, dwv, dbk, dbv = dwkv2[:inner], dwkv2[inner:], dbkv2[:inner], dbkv2[inner:]
    if self_attn:
        dwk, dwv = dwk + dwqkv[inner:2 * inner], dwv + dwqkv[2 * inner:]
        dbk, dbv = dbk + dbqkv[inner:2 * inner], dbv + dbqkv[2 * inner:]
    else:  # slices of one buffer: returned outputs may not alias each other
        dwk, dwv, dbk, dbv = dwk.clone(), dwv.clone(), dbk.clone(), dbv.clone()
    c2 = cond.reshape(B * T, -1)
    dwkv, dbkv = dkvm.t() @ F.silu(c2), dkvm.sum(0)
    cf = c2.float()
    s = torch.sigmoid(cf)
    dcond = ((dkvm @ wkv).float() * (s * (1 + cf * (1 - s)))).to(cond.dtype).view(cond.shape)
    dln = kl.layer_norm_2d_bwd(dtok.view(B, H, W, C).permute(0, 3, 1, 2), x, eps)
    dx = torch.add(grad, dln, out=empty_out_like(x))
    return [dx, dcond, dwq.contiguous(), dbq.contiguous(), dwk.contiguous(), dbk.contiguous(), dwv.contiguous(),
            dbv.contiguous(), dwo, dbo, dwkv, dbkv]


# ------------------------------------------------------------------------------ front ops

@torch.library.custom_op("wuerstchen_fast::attn_block", mutates_args=())
def attn_block_op(x: torch.Tensor, cond: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor,
                  bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor,
                  wkv: torch.Tensor, bkv: torch.Tensor, nhead: int, self_attn: bool, eps: float,
                  variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor, torch.Tensor]:
    return _forward(x, cond, wq, bq, wk, bk, wv, bv, wo, bo, wkv, bkv, nhead, self_attn, eps, variant)


@attn_block_op.register_fake
def _(x, cond, wq, bq, wk, bk, wv, bv, wo, bo, wkv, bkv, nhead, self_attn, eps, variant):
    B, C, H, W = x.shape
    T, inner, N = cond.shape[1], wq.shape[0], H * W
    lse = x.new_empty(B, nhead, N, dtype=torch.float32) if variant == "flash" else x.new_empty(0, dtype=torch.float32)
    return (empty_out_like(x), x.new_empty(B * N, C), x.new_empty(B * T, C),
            x.new_empty(B, N, 3 * inner if self_attn else inner), x.new_empty(B, T, 2 * inner), x.new_empty(B, N, inner),
            lse)


@torch.library.custom_op("wuerstchen_fast::attn_block_backward", mutates_args=())
def attn_block_backward_op(grad: torch.Tensor, x: torch.Tensor, cond: torch.Tensor, wq: torch.Tensor,
                           wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor, wkv: torch.Tensor,
                           tokens: torch.Tensor, kvm: torch.Tensor, qkv: torch.Tensor, kv2: torch.Tensor,
                           o: torch.Tensor, lse: torch.Tensor, nhead: int, eps: float, variant: str) -> list[torch.Tensor]:
    return _backward_impl(grad, x, cond, wq, wk, wv, wo, wkv, tokens, kvm, qkv, kv2, o, lse, nhead, eps, variant)


@attn_block_backward_op.register_fake
def _(grad, x, cond, wq, wk, wv, wo, wkv, tokens, kvm, qkv, kv2, o, lse, nhead, eps, variant):
    bias = lambda w: w.new_empty(w.shape[0])  # noqa: E731
    return [empty_out_like(x), cond.new_empty(cond.shape), torch.empty_like(wq), bias(wq), torch.empty_like(wk),
            bias(wk), torch.empty_like(wv), bias(wv), torch.empty_like(wo), bias(wo), torch.empty_like(wkv), bias(wkv)]


def _setup_context(ctx, inputs, output):
    x, cond, wq, bq, wk, bk_, wv, bv, wo, bo, wkv, bkv, nhead, self_attn, eps, variant = inputs
    out, *saved = output
    ctx.save_for_backward(x, cond, wq, wk, wv, wo, wkv, *saved)
    ctx.mark_non_differentiable(*saved)
    ctx.nhead, ctx.eps, ctx.variant = nhead, eps, variant


def _backward(ctx, grad, *_unused):
    g = attn_block_backward_op(grad, *ctx.saved_tensors, ctx.nhead, ctx.eps, ctx.variant)
    return (*g, None, None, None, None)


attn_block_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ registry entry

def _check(x, cond, wq, bq, wk, bk_, wv, bv, wo, bo, wkv, bkv, nhead, self_attn=True, dropout=0.0, training=False,
           eps=1e-6):
    ka, _ = _k()
    tensors = (x, cond, wq, bq, wk, bk_, wv, bv, wo, bo, wkv, bkv)
    reasons = bk.ndim(4, x) + bk.ndim(3, cond) + bk.float_dtype(*tensors) + bk.for_triton(*tensors)
    if training and dropout > 0:
        reasons.append(f"dropout {dropout} in training is not fused: the reference (torch backend) runs it")
    if len({t.dtype for t in tensors}) > 1:
        reasons.append("needs every tensor in one dtype (cast the module with .to(dtype))")
    d = wq.shape[0] // nhead
    if d > ka.MAX_HEAD_DIM:
        reasons.append(f"head dim {d} above the kernel's limit {ka.MAX_HEAD_DIM}")
    return reasons


def _make_args(g, B, C, H, W, T, cc, nhead, dtype, channels_last, device):
    """Random (x, cond, wq, bq, wk, bk, wv, bv, wo, bo, wkv, bkv) for tests and benchmarks."""
    inner = (C // nhead) * nhead

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = r(B, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ts = [x, r(B, T, cc), r(inner, C, scale=C ** -0.5), r(inner, scale=0.3), r(inner, C, scale=C ** -0.5),
          r(inner, scale=0.3), r(inner, C, scale=C ** -0.5), r(inner, scale=0.3), r(C, inner, scale=inner ** -0.5),
          r(C, scale=0.3), r(C, cc, scale=cc ** -0.5), r(C, scale=0.3)]
    return tuple(t.requires_grad_(True) for t in ts)


def _samples(device="cpu"):
    g = torch.Generator().manual_seed(0)
    out = []
    for (B, C, H, W, T, cc, nh, dtype, cl) in [(2, 32, 3, 5, 7, 24, 2, torch.float32, False),
                                               (1, 32, 2, 2, 3, 32, 2, torch.float32, True),
                                               (2, 32, 1, 3, 5, 16, 1, torch.bfloat16, False)]:
        out.append((_make_args(g, B, C, H, W, T, cc, nh, dtype, cl, device) + (nh,), {}))
    return out


def _opcheck_cases(args, kwargs, backend):
    cases = []
    for variant in VARIANTS:
        fwd = (*args, True, 1e-6, variant)
        cases.append((attn_block_op, fwd, {}))
        det = [t.detach() if isinstance(t, torch.Tensor) else t for t in fwd]
        res = attn_block_op(*det)
        x, cond, wq, _, wk, _, wv, _, wo, _, wkv = det[:11]
        grad = torch.randn_like(res[0])
        cases.append((attn_block_backward_op, (grad, x, cond, wq, wk, wv, wo, wkv, *res[1:], args[-1], 1e-6, variant),
                      {}))
    return cases


SPEC = registry.OpSpec(name="attn_block", doc="AttnBlock: LayerNorm2d, kv_mapper, attention over image + text "
                       "tokens (two K/V sources), out projection, residual", samples=_samples,
                       opcheck_cases=_opcheck_cases, triton_modules=("wuerstchen_fast.kernels.triton.attention",))
SPEC.add(registry.Impl("torch", _ref_attn_block, lambda x, *a, **k: bk.ndim(4, x), lambda: []))
SPEC.add(registry.Impl("triton", lambda *a, **k: _call("triton", *a, **k), _check, bk.triton_available))
registry.register_op(SPEC)


def _call(name, x, cond, wq, bq, wk, bk_, wv, bv, wo, bo, wkv, bkv, nhead, self_attn=True, dropout=0.0,
          training=False, eps=1e-6, variant=None):
    if name == "torch":
        return _ref_attn_block(x, cond, wq, bq, wk, bk_, wv, bv, wo, bo, wkv, bkv, nhead, self_attn, dropout,
                               training, eps)
    variant = variant or choose_variant(x, cond, wq, nhead, self_attn)
    return attn_block_op(x, cond, wq, bq, wk, bk_, wv, bv, wo, bo, wkv, bkv, nhead, self_attn, eps, variant)[0]


def attn_block(x, cond, wq, bq, wk, bk, wv, bv, wo, bo, wkv, bkv, nhead, *, self_attn=True, dropout=0.0,
               training=False, eps=1e-6, backend=None, variant=None):
    """AttnBlock: x + out_proj(attention(q = LN(x) tokens, kv = [LN(x) tokens, kv_mapper(cond)])).

    Equivalent code: `wuerstchen_fast.ops.reference.attn_block(...)`. `backend` overrides the registry's
    choice; `variant` ("flash" / "sdpa") the triton backend's attention core.
    """
    name = registry.resolve(SPEC, x, cond, wq, bq, wk, bk, wv, bv, wo, bo, wkv, bkv, nhead, self_attn=self_attn,
                            dropout=dropout, training=training, eps=eps, backend=backend)
    return _call(name, x, cond, wq, bq, wk, bk, wv, bv, wo, bo, wkv, bkv, nhead, self_attn, dropout, training, eps,
                 variant)
