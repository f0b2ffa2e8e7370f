"""Training data: the synthetic shapes set, image folders with .txt captions, webdataset shards,
and a resumable, rank-sharded loader over any of them."""
from .images import decode_image, resize_center_crop, to_tensor
from .loader import ResumableLoader, StreamLoader, build_loader, build_source
from .shapes import (COLORS, HELDOUT_TRIPLES, POSITIONS, SHAPES, TRAIN_TRIPLES, ShapesDataset, ShapeSpec, caption_of,
                     make_spec, render_shape)
from .sources import ImageFolderDataset, WebDatasetSource, expand_shards

__all__ = ["ShapesDataset", "ShapeSpec", "COLORS", "SHAPES", "POSITIONS", "TRAIN_TRIPLES", "HELDOUT_TRIPLES",
           "caption_of", "make_spec", "render_shape", "ImageFolderDataset", "WebDatasetSource", "expand_shards",
           "ResumableLoader", "StreamLoader", "build_loader", "build_source", "decode_image", "resize_center_crop",
           "to_tensor"]
