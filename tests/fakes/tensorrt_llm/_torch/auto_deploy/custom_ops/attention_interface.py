"""FAKE tensorrt_llm._torch.auto_deploy.custom_ops.attention_interface (tests only).

Follows the documented interface of TensorRT-LLM 1.3 (commit 1099c65c) for what an out-of-tree
attention backend uses: ResourceHandler (is_paged, bytes_per_token -> _get_bytes_per_token,
allocate(sequence_info)), AttentionDescriptor (the abstract classmethods and the optional ones with
their defaults), AttentionRegistry (register asserts a new name, get asserts a known one, has)."""

from abc import ABC, abstractmethod

IMPORT_COUNT = [0]
IMPORT_COUNT[0] += 1


class ResourceHandler(ABC):
    @property
    def is_paged(self) -> bool:
        return False

    @property
    def bytes_per_token(self) -> int:
        if self.is_paged:
            return self._get_bytes_per_token()
        raise NotImplementedError(f"Resource {self.__class__.__name__} is not paged.")

    def _get_bytes_per_token(self) -> int:
        raise NotImplementedError

    @abstractmethod
    def allocate(self, sequence_info):
        """Initialize the resource for the given sequence info."""


class AttentionDescriptor(ABC):
    @classmethod
    @abstractmethod
    def get_attention_layout(cls): ...

    @classmethod
    @abstractmethod
    def get_num_qkv_args(cls) -> int: ...

    @classmethod
    @abstractmethod
    def get_source_attention_op(cls): ...

    @classmethod
    @abstractmethod
    def get_cached_attention_op(cls): ...

    @classmethod
    @abstractmethod
    def get_standard_metadata_args(cls): ...

    @classmethod
    @abstractmethod
    def get_cache_initializers(cls, source_attn_node, cache_config): ...

    @classmethod
    def get_prepare_extra_metadata_info(cls, any_source_attn_node):
        return None, 0, []

    @classmethod
    def get_constants(cls, source_attn_node):
        return []

    @classmethod
    def supports_shared_kv(cls) -> bool:
        return False


class AttentionRegistry:
    _attention_registry = {}

    @classmethod
    def register(cls, kernel_source):
        def decorator(attention_cls):
            assert kernel_source not in cls._attention_registry, f"Attention source {kernel_source} already registered."
            cls._attention_registry[kernel_source] = attention_cls
            return attention_cls

        return decorator

    @classmethod
    def get(cls, kernel_source):
        assert cls.has(kernel_source), f"Attention source {kernel_source} not registered."
        return cls._attention_registry[kernel_source]

    @classmethod
    def has(cls, kernel_source) -> bool:
        return kernel_source in cls._attention_registry
