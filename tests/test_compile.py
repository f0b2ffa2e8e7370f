"""torch.compile(fullgraph=True) traces through the registered ops: no graph breaks, same results."""
import pytest
import torch

from conftest import DEVICE
from wuerstchen_fast.ops import layer_norm_2d, registry

BACKENDS = [b for b in ("torch", "cpu", "triton", "cuda") if not registry.get_op("layer_norm_2d").impls[b].available()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_2d_fullgraph(backend):
    torch._dynamo.reset()

    def f(x):
        return layer_norm_2d(x * 2.0, backend=backend).relu().sum()

    x = torch.randn(2, 24, 5, 7, device=DEVICE, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    y, (g,) = compiled(x), torch.autograd.grad(compiled(x), x)
    y_ref = f(x)
    (g_ref,) = torch.autograd.grad(y_ref, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_context_manager_backend_is_seen_by_compile():
    torch._dynamo.reset()
    import wuerstchen_fast

    def f(x):
        return layer_norm_2d(x)

    x = torch.randn(1, 8, 3, 3)
    with wuerstchen_fast.backend("cpu"):
        gm_ops = []

        def capture(gm, inputs):
            gm_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward

        torch.compile(f, fullgraph=True, backend=capture)(x)
    assert any("wuerstchen_fast.layer_norm_2d" in t for t in gm_ops), gm_ops
