"""The model-level tolerance rule of the fused-backend tests, shared by every model family.

A whole model is checked as the kernel tests check one op (wuerstchen_fast/testing/tolerance.py): the exact
answer is the torch backend in float64, "eager" the torch backend in float32, ours a fused backend in
float32. The output and the gradient of the input and of every parameter are compared.

    run_model(model, call, args, backend, dtype)  -> (output, {name: grad})
    assert_model_grad(ours, eager, exact, what)
"""
import torch

import wuerstchen_fast
from wuerstchen_fast.testing.tolerance import FACTOR, max_error

# At model level a gradient is the end of a chain of every op of the network: a kernel that sums in
# another (equally valid) order moves it by a few ulps of its own magnitude, and eager's error on one
# tensor can be luckily small (seen: 1.4e-6 on a Stage A gamma gradient of magnitude 13 with one
# thread, 1.1e-5 on its neighbour). So the per-kernel rule (2x eager's error) gets an allowance of
# MODEL_ULPS units in the last place of the tensor's largest value.
MODEL_ULPS = 8


def run_model(model, call, args, backend, dtype, kwargs=None):
    """(output, {name: grad}) of a fixed random projection of `call(model, *args, **kwargs)`, with every op
    on `backend`, model and floating inputs in `dtype`; the gradient of the first input is "input"."""
    m = model.to(dtype)
    args = [a.to(dtype).requires_grad_(True) if i == 0 else a.to(dtype) for i, a in enumerate(args)]
    kwargs = {k: v.to(dtype) for k, v in (kwargs or {}).items()}
    m.zero_grad(set_to_none=True)
    with wuerstchen_fast.backend(backend):
        out = call(m, *args, **kwargs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device, dtype)
    (out * w).sum().backward()
    grads = {"input": args[0].grad}
    grads.update({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    return out.detach(), grads


def assert_model_grad(ours, eager, exact, what):
    scale = exact.detach().abs().max().item() if exact.numel() else 0.0
    ulp = torch.finfo(ours.dtype).eps * max(scale, 1.0)
    err, theirs = max_error(ours, exact), max_error(eager, exact)
    bound = FACTOR * theirs + MODEL_ULPS * ulp
    assert err <= bound, (f"{what}: max error {err:.3e} vs float64 exceeds {bound:.3e} (= {FACTOR} x eager's "
                          f"{theirs:.3e} + {MODEL_ULPS} ulp of max |value| {scale:.3g})")
