"""The compiled extension: what it was built with, and the behaviour when it is missing or stale."""
import subprocess
import sys
import textwrap

import torch

from wuerstchen_fast._extension import build_info

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
    if info["with_cuda"]:
        assert info["cuda_archs"] and info["cuda_version"] == torch.version.cuda
