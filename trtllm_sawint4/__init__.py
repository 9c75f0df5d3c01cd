"""trtllm-sawint4: a paged 4-bit KV cache with block-diagonal Hadamard rotation (SAW-INT4).

The installed package also holds `trtllm_sawint4.kernels` (Triton kernels),
`trtllm_sawint4.plugins` (TensorRT plugins) and `trtllm_sawint4.build_scripts`
(graph insertion and engine build), mapped from the repository's top-level folders.
"""

from .allocator import BlockAllocator, OutOfBlocks
from .cache import PagedKVCache, StepPlan
from .calibration import ChannelCalibration
from .spec import FORMATS, KVCacheSpec
from .transforms import LayerTransform, build_layer_transform

__version__ = "0.1.0"

__all__ = ["BlockAllocator", "OutOfBlocks", "PagedKVCache", "StepPlan", "ChannelCalibration", "FORMATS",
           "KVCacheSpec", "LayerTransform", "build_layer_transform", "__version__"]
