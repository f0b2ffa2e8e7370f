"""wuerstchen_fast: fused kernels and a fast implementation of the Würstchen text-to-image model.

    import wuerstchen_fast
    images = wuerstchen_fast.sample("a red circle on a blue background")

Backends of the fused ops: `wuerstchen_fast.set_backend(name)`, `with wuerstchen_fast.backend(name):`,
the WUERSTCHEN_FAST_BACKEND environment variable, or `backend=` on each op call.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from .ops.registry import BackendUnavailableError, backend, get_backend, set_backend

_PIPELINE_NAMES = ("load_pipeline", "sample", "WuerstchenPipeline", "WuerstchenPriorPipeline",
                   "WuerstchenDecoderPipeline")
__all__ = ["ops", "backend", "set_backend", "get_backend", "BackendUnavailableError", *_PIPELINE_NAMES,
           "__version__"]


def __getattr__(name):  # the pipeline pulls in the models: import it on first use only
    if name in _PIPELINE_NAMES:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'wuerstchen_fast' has no attribute {name!r}")
