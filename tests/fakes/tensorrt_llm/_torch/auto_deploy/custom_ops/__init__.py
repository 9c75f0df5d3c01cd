"""FAKE tensorrt_llm._torch.auto_deploy.custom_ops (tests only). Like the real package, importing it
imports the attention interface and then the attention ops, which register with it."""

from . import attention_interface  # noqa: F401
from .attention import torch_attention  # noqa: F401
