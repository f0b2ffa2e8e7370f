"""The compiled extension: what it was built with, and the behaviour when it is missing or stale."""
import subprocess
import sys
import textwrap

import pytest
import torch

from wuerstchen_fast._extension import build_info, extension

# A child process in which importing wuerstchen_fast._C fails as it does for a source checkout or an
# extension built against another torch; the package must warn once and keep torch/triton working.
_BROKEN = textwrap.dedent("""
    import importlib.abc, sys, warnings
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "wuerstchen_fast._C":
                raise ImportError("{message}")
    sys.meta_path.insert(0, Block())
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch, wuerstchen_fast
        from wuerstchen_fast.ops import layer_norm_2d, registry
        x = torch.randn(1, 3, 2, 2)
        y = layer_norm_2d(x)
        layer_norm_2d(x)
        print(registry.resolve("layer_norm_2d", x))
        print(registry.get_op("layer_norm_2d").reasons("cpu", x))
    print(len([w for w in caught if "wuerstchen_fast._C" in str(w.message)]))
""")


def _run(message):
    out = subprocess.run([sys.executable, "-c", _BROKEN.format(message=message)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_stale_extension_warns_once_and_torch_backend_still_works():
    chosen, reasons, warnings = _run("undefined symbol: _ZN3c104cuda9SetDevice")
    assert chosen == "torch"
    assert "failed to load" in reasons and "rebuild" in reasons
    assert warnings == "1"


def test_build_info_records_torch_cuda_and_revision():
    info = build_info()
    assert info is not None, "CI builds the extension; it must load"
    assert info["torch_version"] == torch.__version__
    assert info["git_revision"]
    assert info["cpu_isa"] in ("avx2", "baseline")  # csrc/cpu/isa.h
    assert info["cpu_parallel"] in ("openmp", "serial")
    if info["with_cuda"]:
        assert info["cuda_archs"] and info["cuda_version"] == torch.version.cuda


def test_cpu_kernels_run_on_torchs_threads():
    # at::parallel_for is inlined into the extension: built without OpenMP it silently runs every CPU
    # kernel on one thread (setup.py / CMakeLists.txt pass -fopenmp for this).
    ext = extension()
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert ext.build_info()["cpu_parallel"] == "openmp"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ext.parallel_chunks(64) == 2
        torch.set_num_threads(1)
        assert ext.parallel_chunks(64) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("call,message", [
    (lambda C: C.modulate(torch.randn(2, 3, 4, 4), torch.zeros(2, 4), torch.zeros(2, 3)),
     r"modulate: a must have shape \(2, 3\)"),
    (lambda C: C.modulate_backward(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 4), torch.zeros(2, 3)),
     "modulate_backward: grad must match x in shape and dtype"),
    (lambda C: C.layer_norm_2d_backward(torch.randn(1, 3, 4, 4).half(), torch.randn(1, 3, 4, 4), 1e-6),
     "layer_norm_2d_backward: grad must match x"),
    (lambda C: C.ddpm_step(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.rand(3), torch.rand(1),
                           torch.randn(2, 4, 3, 3), 1.0, "eps", 0.008, 1.0), "ddpm_step: t needs 1 or B values"),
    (lambda C: C.ddpm_step(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.rand(1), torch.rand(1),
                           torch.randn(2, 4, 3, 3), 1.0, "v", 0.008, 1.0), "unknown model head 'v'"),
    (lambda C: C.grn_colsum(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 7), False), "grn_colsum: dy must match x"),
    (lambda C: C.grn_apply(torch.randn(1, 2, 2, 8), torch.ones(1, 8), torch.zeros(7), False),
     "grn_apply: beta needs 8 elements"),
])
def test_extension_ops_reject_bad_arguments_with_the_shared_messages(call, message):
    """The argument checks live once in csrc/fused_host.h and csrc/layout.h; CPU and CUDA entry points share them."""
    if build_info() is None:
        pytest.fail("CI builds the extension; it must load")
    with pytest.raises(RuntimeError, match=message):
        call(torch.ops.wuerstchen_fast_C)
