"""Text-to-image with Würstchen: `load_pipeline()`, `sample()` and the pipelines they build.

`WuerstchenPipeline` is the combined call (diffusers' `WuerstchenCombinedPipeline`); its `.prior_pipe`
(`WuerstchenPriorPipeline`: text -> image embeddings) and `.decoder_pipe` (`WuerstchenDecoderPipeline`:
image embeddings -> images) run alone with diffusers' signatures. `StagePipeline` is their common base.
Stable Cascade (Würstchen v3) has the same three: `StableCascadeCombinedPipeline`, `StableCascadePriorPipeline`,
`StableCascadeDecoderPipeline`; `load_pipeline()` builds whichever family its sources are.
"""
from ..diffusion.schedule import DEFAULT_STAGE_C_TIMESTEPS
from .base import PipelineConfig, StagePipeline
from .checks import LatentGeometry
from .core import WuerstchenPipeline
from .decoder import WuerstchenDecoderPipeline
from .loading import NoDefaultWeightsError, load_decoder_pipeline, load_pipeline, load_prior_pipeline, sample
from .outputs import ImagePipelineOutput, PipelineOutput, WuerstchenPriorPipelineOutput
from .prior import WuerstchenPriorPipeline
from .stable_cascade import StableCascadeDecoderPipeline, StableCascadePriorPipeline, StableCascadePriorPipelineOutput
from .stable_cascade_combined import StableCascadeCombinedPipeline
from .text import TextEncoder

__all__ = [
    "DEFAULT_STAGE_C_TIMESTEPS",
    "ImagePipelineOutput",
    "LatentGeometry",
    "NoDefaultWeightsError",
    "PipelineConfig",
    "PipelineOutput",
    "StableCascadeCombinedPipeline",
    "StableCascadeDecoderPipeline",
    "StableCascadePriorPipeline",
    "StableCascadePriorPipelineOutput",
    "StagePipeline",
    "TextEncoder",
    "WuerstchenDecoderPipeline",
    "WuerstchenPipeline",
    "WuerstchenPriorPipeline",
    "WuerstchenPriorPipelineOutput",
    "load_decoder_pipeline",
    "load_pipeline",
    "load_prior_pipeline",
    "sample",
]
