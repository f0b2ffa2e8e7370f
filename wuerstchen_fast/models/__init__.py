"""Würstchen models: Stage C (prior), Stage B (decoder), Stage A (VQGAN), the EfficientNetV2-S semantic
compressor and the CLIP text encoders, with loaders for diffusers, original and our own checkpoints; and
Stable Cascade (Würstchen v3): one UNet class for its prior and decoder, on the same blocks."""
from .checkpoint_io import CheckpointError
from .configs import EffNetConfig, StageAConfig, StageBConfig, StageCConfig
from .effnet import EfficientNetEncoder, preprocess_for_effnet
from .loading import (from_original_layout, infer_config, load_effnet, load_stage_a, load_stage_b, load_stage_c,
                      save_stage, to_original_layout)
from .stable_cascade import StableCascadeUNet
from .stable_cascade_config import StableCascadeConfig
from .stable_cascade_loading import (from_original_stable_cascade, infer_stable_cascade_config, load_stable_cascade,
                                     save_stable_cascade, to_original_stable_cascade)
from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC
from .text import (CLIPTextEncoder, CLIPTokenizer, TextEncoderConfig, load_text_encoder, load_tokenizer,
                   save_text_encoder)

__all__ = [
    "StageC", "StageB", "StageA", "EfficientNetEncoder", "preprocess_for_effnet",
    "StageCConfig", "StageBConfig", "StageAConfig", "EffNetConfig",
    "load_stage_a", "load_stage_b", "load_stage_c", "load_effnet", "save_stage",
    "to_original_layout", "from_original_layout", "infer_config", "CheckpointError",
    "CLIPTextEncoder", "CLIPTokenizer", "TextEncoderConfig", "load_text_encoder", "load_tokenizer", "save_text_encoder",
    "StableCascadeUNet", "StableCascadeConfig", "load_stable_cascade", "save_stable_cascade",
    "infer_stable_cascade_config", "from_original_stable_cascade", "to_original_stable_cascade",
]
