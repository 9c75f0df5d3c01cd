"""transformers integration: a `Cache` backed by `PagedKVCache` and the `sawint4_paged` attention.

Usage::

    import trtllm_sawint4.integrations.transformers as sawint4_hf   # registers "sawint4_paged"

    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="sawint4_paged")
    cache = sawint4_hf.SawInt4Cache(model, max_tokens=1024, batch_size=2)      # saw_int4 by default
    out = model.generate(input_ids, **sawint4_hf.cache_kwarg(model, cache), max_new_tokens=32)

(`cache_kwarg` names the cache argument as the installed transformers does: ``cache=`` from 5.25,
``past_key_values=`` before; 5.25 to 5.39 still accept the old name with a FutureWarning.)

How the two halves meet. A transformers attention layer (e.g. LlamaAttention in 5.x) calls
``past_key_values.update(k, v, layer_idx)`` and then the registered attention function, but does
not pass the cache to the latter. `SawInt4Cache.update` therefore plans the step (on layer 0),
appends the new K/V to the paged pool, and leaves a *binding* (cache, layer, plan, the key tensor
it returned) in a context variable. The attention function takes that binding, checks that it
belongs to the calling module's ``layer_idx`` and to the very key tensor it was handed, and runs
`PagedKVCache.attend`: attention reads K/V back through the block table (decode when every
sequence adds one token, chunked prefill otherwise), never from the tensors it was passed. Used
without the cache (or with a different cache), it raises.

Shapes: transformers gives K/V as [batch, kv_heads, new_tokens, head_dim]; the paged cache takes
[tokens, kv_heads, head_dim] with each sequence's tokens contiguous. Batches must be unpadded
(all sequences of one batch have the same length); a padded attention mask raises.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache import PagedKVCache, StepPlan
from ..calibration import ChannelCalibration
from ..spec import KVCacheSpec

ATTN_IMPLEMENTATION = "sawint4_paged"

__all__ = ["ATTN_IMPLEMENTATION", "SawInt4Cache", "KeyRecorderCache", "sawint4_paged_attention",
           "spec_for_config", "register", "key_bias_calibration", "model_dims", "cache_kwarg"]


@dataclass
class _Binding:
    """What `SawInt4Cache.update` hands to the attention call that follows it."""

    cache: "SawInt4Cache"
    layer_idx: int
    plan: StepPlan
    key: torch.Tensor  # the exact tensor update() returned (identity-checked)
    batch: int
    new_tokens: int


_BINDING: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar("sawint4_binding", default=None)

_NO_CACHE = (
    "attn_implementation='sawint4_paged' reads K/V from the paged SAW-INT4 cache, but {why}. Pass "
    "trtllm_sawint4.integrations.transformers.SawInt4Cache(model, ...) as the cache argument (cache= from "
    "transformers 5.25, past_key_values= before; cache_kwarg(model, cache) picks the name) and use_cache=True "
    "to the forward()/generate() call."
)


def cache_kwarg(model, cache) -> dict:
    """The keyword that hands `cache` to ``model(...)`` / ``model.generate(...)``: transformers 5.25 renamed
    ``past_key_values`` to ``cache`` (the old name warns until 5.40); earlier releases know only the old one."""
    import inspect

    accepts_cache = "cache" in inspect.signature(model.forward).parameters
    return {"cache": cache} if accepts_cache else {"past_key_values": cache}


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


@dataclass(frozen=True)
class KVGeometry:
    """What the paged cache needs from a decoder config: one pool per attention layer."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: per layer: 0 = full causal attention, W > 0 = a sliding window of W positions (itself included)
    windows: tuple[int, ...]


#: layer_types entries the paged cache can serve
_LAYER_TYPES = ("full_attention", "sliding_attention")


def kv_geometry(config) -> KVGeometry:
    """Layers, heads, head_dim and per-layer sliding windows of a (text) decoder config.

    Windows follow transformers: a config with `layer_types` gives `sliding_window` to its
    "sliding_attention" layers; one without them but with a `sliding_window` (Mistral) slides every layer."""
    cfg = _text_config(config)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    n = cfg.num_hidden_layers
    window = int(getattr(cfg, "sliding_window", None) or 0)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
        if unknown:
            raise NotImplementedError(f"the paged cache serves {_LAYER_TYPES} layers; this model also has {unknown}")
        windows = tuple(window if t == "sliding_attention" else 0 for t in layer_types[:n])
    else:
        windows = (window,) * n
    if getattr(cfg, "use_bidirectional_attention", False):
        raise NotImplementedError("the paged cache serves causal decoders; this config sets "
                                  "use_bidirectional_attention")
    return KVGeometry(n, heads, kv_heads, head_dim, windows)


def paged_windows(geometry: KVGeometry, max_seq_len: int) -> tuple[int, ...] | None:
    """The `windows` argument for PagedKVCache, or None where every layer is full attention for sequences of
    up to max_seq_len tokens (a window of W >= max_seq_len positions is full causal attention)."""
    windows = tuple(w if 0 < w < max_seq_len else 0 for w in geometry.windows)
    if not any(windows):
        return None
    if not paged_cache_has_windows():
        raise NotImplementedError(
            f"this model has sliding-window layers (windows {sorted(set(geometry.windows) - {0})}) shorter than "
            f"the longest sequence ({max_seq_len} tokens), and this PagedKVCache has no per-layer windows")
    return windows


def paged_cache_has_windows() -> bool:
    """Whether PagedKVCache takes per-layer sliding windows (`windows=`)."""
    import inspect

    return "windows" in inspect.signature(PagedKVCache.__init__).parameters


def model_dims(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config."""
    g = kv_geometry(config)
    return g.num_layers, g.num_kv_heads, g.head_dim


def default_calibration(model, spec: KVCacheSpec, key_bias_centre: bool = True) -> ChannelCalibration | None:
    """The calibration a cache for `model` in format `spec` gets when the caller gives none. Every cache built
    from a model (SawInt4Cache, the serving engine) takes it from here, so that they store the same format:
    a rotated (saw_int4) cache of a model whose K projection has a bias (Qwen2) centres K by that bias
    (`key_bias_calibration`, unless key_bias_centre=False); any other gets none."""
    if key_bias_centre and spec.rotated:
        return key_bias_calibration(model)
    return None


def spec_for_config(config, kv_format: str = "saw_int4", **options) -> KVCacheSpec:
    """The KVCacheSpec of a transformers model config (head_dim and KV heads from the config)."""
    _, kv_heads, head_dim = model_dims(config)
    return KVCacheSpec(head_dim=head_dim, num_kv_heads=kv_heads, kv_format=kv_format, **options)


class _PagedLayer(CacheLayerMixin):
    """Length bookkeeping of one layer; the data lives in the shared paged pool."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def __init__(self, owner: "SawInt4Cache", layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def offload(self):  # the pool stays where it is
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        self.length = 0

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("SawInt4Cache does not support beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SawInt4Cache cannot crop (no assisted/speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SawInt4Cache cannot repeat its batch; build it for the full batch")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("SawInt4Cache cannot select batch rows")


class SawInt4Cache(Cache):
    """A transformers `Cache` whose K/V live in a `PagedKVCache` (any kv_format: bf16, int8, int4, saw_int4).

    SawInt4Cache(model_or_config, spec=None, *, max_tokens=4096, batch_size=1, calibration=None, device=None)
    SawInt4Cache(paged=existing_paged_cache, config=model.config)

    `spec` defaults to saw_int4 with the model's head_dim/KV heads; `max_tokens` is per sequence (prompt
    plus generated tokens), `batch_size` the number of sequences the pool must hold. The first update()
    creates one paged sequence per batch row. Pass the model (or its config) so that the cache can
    check it is used with attn_implementation='sawint4_paged'.

    Without a calibration, a saw_int4 cache built from a model whose K projection has a bias (Qwen2)
    centres K by that bias in the slow rotary channels (`key_bias_calibration`; calibration-free, from
    the weights): the rotation would otherwise spread those large constant offsets over every channel
    (docs/accuracy.md). key_bias_centre=False gives the plain paper format.
    """

    def __init__(self, config=None, spec: KVCacheSpec | None = None, *, max_tokens: int = 4096, batch_size: int = 1,
                 calibration: ChannelCalibration | None = None, device: str | torch.device | None = None,
                 paged: PagedKVCache | None = None, key_bias_centre: bool = True):
        query_dtype = torch.bfloat16
        if isinstance(config, torch.nn.Module):
            first = next(config.parameters())
            device = first.device if device is None else device
            query_dtype = first.dtype
            if calibration is None and paged is None:
                calibration = default_calibration(config, spec or spec_for_config(config.config),
                                                  key_bias_centre=key_bias_centre)
            config = config.config
        self.config = config
        if paged is None:
            if config is None:
                raise ValueError("SawInt4Cache needs the model (or its config) or an existing PagedKVCache (paged=)")
            geometry = kv_geometry(config)
            num_layers, kv_heads, head_dim = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
            if spec is None:
                spec = KVCacheSpec(head_dim=head_dim, num_kv_heads=kv_heads)
            if (spec.head_dim, spec.num_kv_heads) != (head_dim, kv_heads):
                raise ValueError(f"spec has head_dim={spec.head_dim}, num_kv_heads={spec.num_kv_heads}; the model "
                                 f"has head_dim={head_dim}, num_key_value_heads={kv_heads}")
            if max_tokens < 1 or batch_size < 1:
                raise ValueError(f"max_tokens and batch_size must be >= 1, got {max_tokens}, {batch_size}")
            blocks = batch_size * math.ceil(max_tokens / spec.tokens_per_block)
            windows = paged_windows(geometry, max_tokens)
            paged = PagedKVCache(spec, num_layers, blocks, device=device or "cpu", calibration=calibration,
                                 num_query_heads=geometry.num_heads, query_dtype=query_dtype,
                                 **({} if windows is None else {"windows": list(windows)}))
        elif spec is not None and spec != paged.spec:
            raise ValueError("give either spec or paged, not both")
        elif config is not None and model_dims(config)[0] != paged.num_layers:
            raise ValueError(f"the paged cache has {paged.num_layers} layers, the model {model_dims(config)[0]}")
        self.paged = paged
        self.spec = paged.spec
        self.model_windows = kv_geometry(config).windows if config is not None else None
        self.seq_ids: list[int] = []
        self._step: tuple[StepPlan, int, int] | None = None  # (plan, batch, new tokens) of the current step
        super().__init__(layers=[_PagedLayer(self, i) for i in range(paged.num_layers)])

    # ---- transformers Cache API ---------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append this step's K/V [B, kv_heads, S, D] of `layer_idx` to the paged pool (planning the step on
        layer 0). Returns the given tensors; the `sawint4_paged` attention reads the pool instead."""
        impl = getattr(self.config, "_attn_implementation", ATTN_IMPLEMENTATION) if self.config is not None \
            else ATTN_IMPLEMENTATION
        if impl != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"SawInt4Cache keeps K/V only in its paged pool, so the model must use "
                f"attn_implementation='{ATTN_IMPLEMENTATION}' (it uses {impl!r}): load it with "
                f"attn_implementation='{ATTN_IMPLEMENTATION}' or call model.set_attn_implementation(...)")
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(f"key/value states must both be [batch, kv_heads, tokens, head_dim], got "
                             f"{list(key_states.shape)} and {list(value_states.shape)}")
        if not 0 <= layer_idx < self.paged.num_layers:
            raise IndexError(f"layer_idx {layer_idx} out of range for a {self.paged.num_layers}-layer cache")
        b, h, s, d = key_states.shape
        if (h, d) != (self.spec.num_kv_heads, self.spec.head_dim):
            raise ValueError(f"key states have {h} heads of dim {d}; the cache spec has "
                             f"{self.spec.num_kv_heads} heads of dim {self.spec.head_dim}")
        layer = self.layers[layer_idx]
        if layer_idx == 0:
            if self._step is not None and any(l.length != self.layers[0].length for l in self.layers):
                raise RuntimeError("SawInt4Cache: the previous step did not reach every layer (an interrupted "
                                   "forward?); build a new cache")
            if not self.seq_ids:
                self.seq_ids = [self.paged.add_sequence() for _ in range(b)]
            elif b != len(self.seq_ids):
                raise ValueError(f"SawInt4Cache holds {len(self.seq_ids)} sequences but got a batch of {b}")
            self._step = (self.paged.plan(self.seq_ids, [s] * b), b, s)
        elif self._step is None or self._step[1:] != (b, s) or layer.length != self.layers[0].length - s:
            raise RuntimeError(f"SawInt4Cache.update(layer_idx={layer_idx}) does not continue the step that "
                               f"layer 0 planned (layers must be updated in order 0..N-1, same batch and length)")
        plan = self._step[0]
        key = key_states.transpose(1, 2).reshape(b * s, h, d).contiguous()
        value = value_states.transpose(1, 2).reshape(b * s, h, d).contiguous()
        self.paged.append(layer_idx, plan, key, value)
        layer.length += s
        layer.is_initialized = True
        _BINDING.set(_Binding(self, layer_idx, plan, key_states, b, s))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids) if self.seq_ids else -1

    def reset(self) -> None:
        """Free every sequence; the cache can then take a new batch."""
        for seq_id in self.seq_ids:
            self.paged.free(seq_id)
        self.seq_ids = []
        self._step = None
        for layer in self.layers:
            layer.reset()

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [B, Hq, S, D] of this step -> attention output [B, S, Hq, D] read through the block table."""
        plan, b, s = self._step
        hq, d = query.shape[1], query.shape[3]
        q = query.transpose(1, 2).reshape(b * s, hq, d).contiguous()
        out = self.paged.attend(layer_idx, plan, q, scaling)
        return out.view(b, s, hq, d)


def key_bias_calibration(model, max_angle: float = 1.0) -> ChannelCalibration | None:
    """The calibration-free K centre of a model whose attention layers have a K projection bias (else None):
    ChannelCalibration.from_key_bias over the rotary pairs that turn by at most `max_angle` radians over
    the model's max_position_embeddings (read from the model's own rotary inverse frequencies)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return None
    biases = [getattr(getattr(getattr(layer, "self_attn", None), "k_proj", None), "bias", None) for layer in layers]
    if not biases or any(b is None for b in biases):
        return None
    num_layers, kv_heads, head_dim = model_dims(model.config)
    rotary = getattr(inner, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None or inv_freq.numel() != head_dim // 2:
        return None  # partial or unusual RoPE: no safe static centre
    positions = getattr(_text_config(model.config), "max_position_embeddings", None) or 4096
    return ChannelCalibration.from_key_bias(biases, kv_heads, inv_freq=inv_freq.detach().double().cpu(),
                                            max_positions=positions, max_angle=max_angle)


def layer_window(paged: PagedKVCache, layer: int) -> int:
    """The sliding window the paged cache applies to `layer` (0: full attention)."""
    windows = getattr(paged, "windows", None)
    return int(windows[layer]) if windows is not None else 0


def _check_window(module_window, cache: "SawInt4Cache", layer_idx: int, kv_len: int) -> int:
    """The window this layer attends with; raises if the paged cache cannot apply the model's window."""
    want = int(module_window or 0)
    if cache.model_windows is not None and want != cache.model_windows[layer_idx]:
        raise RuntimeError(f"layer {layer_idx} attends with sliding_window={want}, but the model config gives "
                           f"{cache.model_windows[layer_idx]} (the cache was built from another config?)")
    have = layer_window(cache.paged, layer_idx)
    if want and have != want and kv_len > want:
        raise NotImplementedError(
            f"layer {layer_idx} has a sliding window of {want} positions and the sequence has {kv_len} tokens, but "
            f"the paged cache applies window {have} to it (build the cache for this model, with max_tokens <= "
            f"{want} if its PagedKVCache has no windows)")
    return want


def _check_mask(attention_mask, q_len: int, kv_len: int, window: int = 0) -> None:
    """Accept no mask, an all-ones 2D padding mask, or a 4D mask equal to plain causal attention (within the
    sliding window, if any)."""
    if attention_mask is None:
        return
    if attention_mask.dim() == 2:
        if not bool(attention_mask.bool().all()):
            raise NotImplementedError(
                "sawint4_paged attention does not support padded batches (the attention mask has zeros): give "
                "equal-length sequences, or run the sequences one at a time")
        return
    if attention_mask.dim() == 4:
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        if visible.shape[-2:] != (q_len, kv_len):
            raise NotImplementedError(f"sawint4_paged attention got a 4D mask of shape {list(visible.shape)}; "
                                      f"only plain causal attention over [{q_len}, {kv_len}] is supported")
        pos = torch.arange(kv_len - q_len, kv_len, device=visible.device)
        kv = torch.arange(kv_len, device=visible.device)[None, :]
        causal = kv <= pos[:, None]
        if window:
            causal &= kv > pos[:, None] - window
        if not bool((visible == causal).all()):
            raise NotImplementedError(
                "sawint4_paged attention does not support padded batches or custom masks (the attention mask is "
                "not plain causal): give equal-length sequences, or run the sequences one at a time")
        return
    raise NotImplementedError(f"sawint4_paged attention cannot use a {attention_mask.dim()}-D attention mask")


def sawint4_paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (registered as 'sawint4_paged'): attention over the paged cache.

    query [B, Hq, S, D] -> ([B, S, Hq, D], None). `key`/`value` are used only to check that the
    preceding SawInt4Cache.update() belongs to this call; K/V are read from the pool."""
    binding = _BINDING.get()
    layer_idx = getattr(module, "layer_idx", None)
    if binding is None:
        raise RuntimeError(_NO_CACHE.format(why="no SawInt4Cache.update() preceded this attention call"))
    if binding.key is not key or binding.layer_idx != layer_idx:
        raise RuntimeError(_NO_CACHE.format(
            why=f"the last SawInt4Cache.update() was for layer {binding.layer_idx}, not for this module "
                f"(layer_idx={layer_idx}), or the key tensor does not come from it"))
    _BINDING.set(None)  # one attention call per update
    if dropout:
        raise NotImplementedError("sawint4_paged attention has no dropout (use model.eval())")
    if kwargs.get("softcap"):
        raise NotImplementedError("sawint4_paged attention has no logit soft-capping (softcap)")
    if query.dim() != 4 or query.shape[0] != binding.batch or query.shape[2] != binding.new_tokens:
        raise ValueError(f"query must be [batch={binding.batch}, heads, tokens={binding.new_tokens}, head_dim], "
                         f"got {list(query.shape)}")
    cache = binding.cache
    kv_len = cache.layers[layer_idx].length
    window = _check_window(kwargs.get("sliding_window"), cache, layer_idx, kv_len)
    _check_mask(attention_mask, binding.new_tokens, kv_len, window)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(layer_idx, query, float(scaling)), None


def register() -> None:
    """Register 'sawint4_paged' with transformers' AttentionInterface (done on import; idempotent).

    The mask function is sdpa's: it gives None for plain causal attention (the paged ops are causal by
    construction) and a 4D boolean mask otherwise, which the attention function rejects (padding)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sawint4_paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


register()


class KeyRecorderCache(DynamicCache):
    """A DynamicCache that also records the post-RoPE keys each layer receives, for calibration.

    keys[layer] is a list of float32 CPU tensors [tokens, kv_heads, head_dim]; `stacked()` concatenates
    them. Use with any attention implementation (sdpa, eager): it caches like DynamicCache."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.recorded: dict[int, list[torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b, h, s, d = key_states.shape
        self.recorded.setdefault(layer_idx, []).append(
            key_states.detach().transpose(1, 2).reshape(b * s, h, d).float().cpu())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def stacked(self) -> list[torch.Tensor]:
        """One [tokens, kv_heads, head_dim] tensor per layer, layers in order."""
        if not self.recorded:
            return []
        return [torch.cat(self.recorded[i]) for i in range(max(self.recorded) + 1)]


@torch.inference_mode()
def collect_keys(model, token_windows: list[torch.Tensor], progress=None) -> list[torch.Tensor]:
    """Run `model` (any attention implementation) over each 1-D token window, return post-RoPE K per layer
    ([total_tokens, kv_heads, head_dim] float32)."""
    per_layer: list[list[torch.Tensor]] = []
    device = next(model.parameters()).device
    for ids in token_windows:
        rec = KeyRecorderCache(config=model.config)
        model(input_ids=ids.view(1, -1).to(device), **cache_kwarg(model, rec), use_cache=True)
        for i, k in enumerate(rec.stacked()):
            if len(per_layer) <= i:
                per_layer.append([])
            per_layer[i].append(k)
        if progress is not None:
            progress()
    return [torch.cat(ks) for ks in per_layer]
