"""Text-to-image with Würstchen: `load_pipeline()`, `sample()` and the pipeline they build."""
from ..diffusion.schedule import DEFAULT_STAGE_C_TIMESTEPS
from .checks import LatentGeometry
from .core import PipelineOutput, TextEncoder, WuerstchenPipeline
from .loading import NoDefaultWeightsError, load_pipeline, sample

__all__ = [
    "DEFAULT_STAGE_C_TIMESTEPS",
    "LatentGeometry",
    "NoDefaultWeightsError",
    "PipelineOutput",
    "TextEncoder",
    "WuerstchenPipeline",
    "load_pipeline",
    "sample",
]
