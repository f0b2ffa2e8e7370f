"""Text-to-image with Würstchen: `load_pipeline()`, `sample()` and the pipelines they build.

`WuerstchenPipeline` is the combined call (diffusers' `WuerstchenCombinedPipeline`); its `.prior_pipe`
(`WuerstchenPriorPipeline`: text -> image embeddings) and `.decoder_pipe` (`WuerstchenDecoderPipeline`:
image embeddings -> images) run alone with diffusers' signatures. `StagePipeline` is their common base.
"""
from ..diffusion.schedule import DEFAULT_STAGE_C_TIMESTEPS
from .base import PipelineConfig, StagePipeline
from .checks import LatentGeometry
from .core import WuerstchenPipeline
from .decoder import WuerstchenDecoderPipeline
from .loading import NoDefaultWeightsError, load_pipeline, sample
from .outputs import ImagePipelineOutput, PipelineOutput, WuerstchenPriorPipelineOutput
from .prior import WuerstchenPriorPipeline
from .text import TextEncoder

__all__ = [
    "DEFAULT_STAGE_C_TIMESTEPS",
    "ImagePipelineOutput",
    "LatentGeometry",
    "NoDefaultWeightsError",
    "PipelineConfig",
    "PipelineOutput",
    "StagePipeline",
    "TextEncoder",
    "WuerstchenDecoderPipeline",
    "WuerstchenPipeline",
    "WuerstchenPriorPipeline",
    "WuerstchenPriorPipelineOutput",
    "load_pipeline",
    "sample",
]
