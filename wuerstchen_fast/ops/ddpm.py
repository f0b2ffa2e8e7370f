"""ddpm_step: one sampler step fused — model head, classifier-free guidance and the DDPM update.

    front op   torch.ops.wuerstchen_fast.ddpm_step(x, model_out, t, t_prev, noise, guidance, head, s,
                                                   scaler, backend)    custom op with a fake impl
    function   ddpm_step(x, model_out, t, t_prev, noise, *, guidance, head, s, scaler, backend=None)

`model_out` is what the denoiser returned for the batch it was fed: ε̂ (head "eps") or the raw
output of the final 1x1 conv (head "stage_c" / "stage_b", 2·C channels: a then b). Guidance
applies when model_out has twice x's batch ([cond, uncond], as the loop feeds it). `noise` is drawn
by the caller's generator every step (also the last, whose noise is masked out), so seeds keep
matching diffusers. The `torch` backend is the reference (`reference.ddpm_step_fused`) and
reproduces diffusers bit for bit; Triton computes all of it in float32 in one kernel.
Forward only: sampling does not differentiate through the step (no autograd registered).
"""
from __future__ import annotations

import torch

from .._extension import extension
from . import backends as bk
from . import reference, registry
from .layout import empty_out_like

__all__ = ["ddpm_step"]


def _triton_fwd(x, model_out, t, t_prev, noise, guidance=1.0, head="eps", s=0.008, scaler=1.0):
    from ..kernels.triton import ddpm as k

    return k.ddpm_step_fwd(x, model_out, t, t_prev, noise, guidance, head, s, scaler)


def _torch_fwd(x, model_out, t, t_prev, noise, guidance, head, s, scaler):
    out = reference.ddpm_step_fused(x, model_out, t, t_prev, noise, guidance, head, s, scaler)
    return empty_out_like(x).copy_(out)


def _ext_fwd(x, model_out, t, t_prev, noise, guidance=1.0, head="eps", s=0.008, scaler=1.0):
    # the C++ op dispatches on the device: CPU or CUDA kernel
    return torch.ops.wuerstchen_fast_C.ddpm_step(x, model_out, t, t_prev, noise, float(guidance), head, float(s),
                                                 float(scaler))


_FWD = {"torch": _torch_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}


@torch.library.custom_op("wuerstchen_fast::ddpm_step", mutates_args=())
def ddpm_step_op(x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                 noise: torch.Tensor, guidance: float, head: str, s: float, scaler: float,
                 backend: str) -> torch.Tensor:
    return _FWD[backend](x, model_out, t, t_prev, noise, guidance, head, s, scaler)


@ddpm_step_op.register_fake
def _(x, model_out, t, t_prev, noise, guidance, head, s, scaler, backend):
    return empty_out_like(x)


if extension() is not None:
    torch.library.register_fake("wuerstchen_fast_C::ddpm_step")(lambda x, *rest: empty_out_like(x))


# ------------------------------------------------------------------------------ registry entry

def _shape_reasons(x, model_out, t, t_prev, noise, guidance=1.0, head="eps", s=0.008, scaler=1.0):
    if head not in reference.ddpm.HEADS:
        return [f"unknown model head {head!r}; expected one of {reference.ddpm.HEADS}"]
    if x.dim() != 4:
        return [f"needs a 4-d (B, C, H, W) x, got {x.dim()}-d"]
    B, C = x.shape[:2]
    want_c = C if head == "eps" else 2 * C
    if model_out.dim() != 4 or model_out.shape[0] not in (B, 2 * B) or model_out.shape[1] != want_c \
            or model_out.shape[2:] != x.shape[2:]:
        return [f"model_out must be ({B} or {2 * B}, {want_c}, {x.shape[2]}, {x.shape[3]}) for head {head!r}, "
                f"got {tuple(model_out.shape)}"]
    if noise.shape != x.shape:
        return [f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}"]
    bad = [tuple(v.shape) for v in (t, t_prev) if v.numel() not in (1, B)]
    if bad:
        return [f"t and t_prev need one value or one per batch element ({B}), got shape {bad[0]}"]
    return []


def _check_triton(x, model_out, t, t_prev, noise, guidance=1.0, head="eps", s=0.008, scaler=1.0):
    r = _shape_reasons(x, model_out, t, t_prev, noise, guidance, head, s, scaler)
    return r + bk.float_dtype(x, model_out, noise) + bk.for_triton(x, model_out, noise, t, t_prev)


def _check_ext(device):
    def check(x, model_out, t, t_prev, noise, guidance=1.0, head="eps", s=0.008, scaler=1.0):
        r = _shape_reasons(x, model_out, t, t_prev, noise, guidance, head, s, scaler)
        return r + bk.float_dtype(x, model_out, noise) + bk.on_device(device, x, model_out, noise, t, t_prev)
    return check


def _samples(device="cpu"):
    g = torch.Generator().manual_seed(0)
    out = []
    for (B, C, H, W), head, cfg, dtype, t, tp in [
        ((2, 4, 3, 5), "eps", False, torch.float32, 0.7, 0.5),
        ((1, 3, 4, 4), "stage_c", True, torch.float32, 0.4, 0.0),
        ((2, 2, 5, 3), "stage_b", True, torch.bfloat16, 1.0, 0.6),
        ((1, 4, 2, 6), "stage_b", False, torch.float16, 0.3, 0.1),
    ]:
        nb, nc = (2 * B if cfg else B), (C if head == "eps" else 2 * C)
        x = torch.randn(B, C, H, W, generator=g).to(device, dtype)
        mo = torch.randn(nb, nc, H, W, generator=g).to(device, dtype)
        nz = torch.randn(B, C, H, W, generator=g).to(device, dtype)
        tt, ttp = torch.tensor(t, device=device), torch.tensor(tp, device=device)
        out.append(((x, mo, tt, ttp, nz), dict(guidance=3.5 if cfg else 1.0, head=head)))
    return out


def _opcheck_cases(args, kwargs, backend):
    kw = dict(dict(guidance=1.0, head="eps", s=0.008, scaler=1.0), **kwargs)
    extra = (kw["guidance"], kw["head"], kw["s"], kw["scaler"])
    cases = [(ddpm_step_op, tuple(args) + extra + (backend,), {})]
    if backend in ("cpu", "cuda"):
        cases.append((torch.ops.wuerstchen_fast_C.ddpm_step.default, tuple(args) + extra, {}))
    return cases


SPEC = registry.OpSpec(
    name="ddpm_step",
    doc="model head + CFG lerp + Würstchen DDPM update, forward only",
    samples=_samples,
    opcheck_cases=_opcheck_cases,
    triton_modules=("wuerstchen_fast.kernels.triton.ddpm",),
    priority={"cuda": ("triton", "torch"), "cpu": ("torch",)},
)
SPEC.add(registry.Impl("torch", reference.ddpm_step_fused, _shape_reasons, lambda: []))
SPEC.add(registry.Impl("triton", _triton_fwd, _check_triton, bk.triton_available))
SPEC.add(registry.Impl("cpu", _ext_fwd, _check_ext("cpu"), bk.cpu_ext_available))
SPEC.add(registry.Impl("cuda", _ext_fwd, _check_ext("cuda"), bk.cuda_ext_available))
registry.register_op(SPEC)


def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              noise: torch.Tensor, *, guidance: float = 1.0, head: str = "eps", s: float = 0.008,
              scaler: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """x_t -> x_{t_prev} from the raw denoiser output (see the module docstring).

    Equivalent code: `wuerstchen_fast.ops.reference.ddpm_step_fused`. `t`, `t_prev`: tensors with one
    value or one per batch element (on x's device). Returns x's dtype and layout.
    """
    t = torch.as_tensor(t, device=x.device)
    t_prev = torch.as_tensor(t_prev, device=x.device)
    name = registry.resolve(SPEC, x, model_out, t, t_prev, noise, guidance=guidance, head=head, s=s,
                            scaler=scaler, backend=backend)
    if name == "torch":
        reasons = _shape_reasons(x, model_out, t, t_prev, noise, guidance, head, s, scaler)
        if reasons:
            raise ValueError(f"ddpm_step: {reasons[0]}")
        return reference.ddpm_step_fused(x, model_out, t, t_prev, noise, guidance, head, s, scaler)
    return ddpm_step_op(x, model_out, t, t_prev, noise, float(guidance), head, float(s), float(scaler), name)
