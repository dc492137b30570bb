"""mambatrim: fast Vision Mamba through token pruning, merging and dynamic SSM-block selection."""
from .models import (
    CheckpointError,
    CheckpointMismatchError,
    VisionMamba,
    create_model,
    list_models,
    load_checkpoint,
)
from .models.segmentation import create_segmentation_model
from .ops import selective_scan

__version__ = "0.1.0"
__all__ = ["CheckpointError", "CheckpointMismatchError", "VisionMamba", "create_model", "list_models",
           "create_segmentation_model", "load_checkpoint", "selective_scan", "__version__"]
