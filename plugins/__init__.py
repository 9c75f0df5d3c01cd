"""TensorRT plugins of the SAW-INT4 cache ops (namespace `saw_int4`).

Importing this package never imports TensorRT. `contract` holds the op contract in plain Python;
`register_plugins()` registers the `tensorrt.plugin` definitions (and raises an ImportError that
names TensorRT when it is missing). docs/tensorrt.md describes the contract.
"""

from . import aot, contract
from .contract import NAMESPACE, OPS, PLUGIN_VERSION
from .trt import MISSING_TENSORRT, register_plugins, require_tensorrt

__all__ = ["aot", "contract", "NAMESPACE", "OPS", "PLUGIN_VERSION", "MISSING_TENSORRT", "register_plugins",
           "require_tensorrt"]
