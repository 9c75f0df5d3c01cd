"""FAKE tensorrt_llm for trtllm_sawint4's tests (see tests/fakes/README.md).

Follows the documented interface of TensorRT-LLM 1.3 (AutoDeploy sources at commit 1099c65c): only
the names trtllm_sawint4 uses. Not TensorRT-LLM; nothing here runs a model."""

__version__ = "1.3.0rc0+fake"


class SamplingParams:
    """tensorrt_llm.SamplingParams: keyword fields (max_tokens, temperature, top_p, top_k, seed, stop)."""

    _FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self._FIELDS)
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        if kwargs.get("max_tokens", 1) < 1:
            raise ValueError("max_tokens must be >= 1")
        self.max_tokens = kwargs.get("max_tokens", 32)
        self.kwargs = kwargs
