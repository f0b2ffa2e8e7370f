"""Every registered op passes torch.library.opcheck, on every backend that can run here.

Walks the registry, so a new op cannot skip it: for each op, backend and sample, the op's
`opcheck_cases` name the registered ops involved — the front op `wuerstchen_fast::*` (fake and
autograd registrations) and its backward, and for the extension backends `wuerstchen_fast_C::*`.
Backends that cannot run on this machine (cuda without a GPU) are not collected; the GPU runner
runs them.
"""
import pytest
import torch

from conftest import DEVICE
from wuerstchen_fast.ops import registry


def _cases():
    for op in registry.all_ops():
        for backend in registry.BACKENDS:
            if backend != "torch" and backend in op.impls and not op.impls[backend].available():
                yield pytest.param(op, backend, id=f"{op.name}-{backend}")


@pytest.mark.parametrize("op,backend", list(_cases()))
def test_opcheck(op, backend):
    checked = 0
    for args, kwargs in op.samples(DEVICE):
        if op.reasons(backend, *args, **kwargs):
            continue
        for target, a, k in op.opcheck_cases(args, kwargs, backend):
            torch.library.opcheck(target, a, k)
            checked += 1
    assert checked, f"{op.name}: no sample runs on {backend}"


def test_extension_backends_are_covered():
    ids = [p.id for p in _cases()]
    assert any(i.endswith("-cpu") for i in ids) and any(i.endswith("-triton") for i in ids), ids
