"""FAKE tensorrt_llm.llmapi (tests only): KvCacheConfig keeps its keyword fields."""


class KvCacheConfig:
    def __init__(self, **kwargs):
        self.__dict__.update({"dtype": "auto", "tokens_per_block": 32, "free_gpu_memory_fraction": 0.9})
        self.__dict__.update(kwargs)
        self.fields = dict(kwargs)
