"""Cache operations: `torch.ops.sawint4.*` custom ops, their reference and their dispatch."""

from . import checks, dispatch, reference
from .library import append, decode, decode_planned, prefill

__all__ = ["append", "decode", "decode_planned", "prefill", "checks", "dispatch", "reference"]
