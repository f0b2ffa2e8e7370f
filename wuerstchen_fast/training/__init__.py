"""Training entry points for Stage A (VQGAN), Stage B (latent decoder + semantic compressor) and Stage C
(text-conditional prior): `train(config)` and `wuerstchen-fast train {stage-a,stage-b,stage-c}`."""
from .config import TrainConfig, apply_overrides, load_config
from .trainer import TrainResult, train

__all__ = ["train", "TrainResult", "TrainConfig", "load_config", "apply_overrides"]
