"""onnxruntime Python implementations of the saw_int4 plugin ops (onnxruntime-extensions).

`sawint4 insert --ort` writes the plugin nodes in the domain `ai.onnx.contrib` (the only one in
which onnxruntime-extensions runs Python ops); importing `register()` here makes onnxruntime run
them with `torch.ops.sawint4.*` (the PyTorch reference on CPU), through plugins.contract, so the
ONNX graph runs with exactly the semantics the TensorRT plugins promise.

Limits of this CPU path: activations are float32 only (an onnxruntime-extensions Python op has
one fixed signature per op name), and the updated pool comes back as a new output buffer
(onnxruntime has no aliasing): feed `kv_pool_<i>_out` back as `kv_pool_<i>` for the next step.
"""

from __future__ import annotations

import numpy as np

from trtllm_sawint4.plugins import contract

_registered = False


def _types():
    from onnxruntime_extensions import PyCustomOpDef as P

    dt = {"act": P.dt_float, "float32": P.dt_float, "int32": P.dt_int32, "uint8": P.dt_uint8}
    at = {int: P.dt_int64, float: P.dt_float, str: P.dt_string}
    return dt, at


def _make(op: contract.OpDef):
    def run(*arrays, **attrs):
        import torch

        inputs = []
        for arg, a in zip(op.inputs, arrays):
            a = np.array(a, copy=True) if arg.name == "pool" else np.ascontiguousarray(a)
            inputs.append(torch.from_numpy(a))
        out = contract.torch_call(op, inputs, attrs)
        return out.numpy()

    run.__name__ = f"saw_int4_{op.name}"
    return run


def register() -> None:
    """Register the Python ops with onnxruntime-extensions (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from onnxruntime_extensions import onnx_op
    except ImportError as e:
        raise ImportError(f"running saw_int4 nodes in onnxruntime needs `onnxruntime-extensions` ({e})") from e
    dt, at = _types()
    for op in contract.OPS.values():
        onnx_op(op_type=op.name, inputs=[dt[t.dtype] for t in op.inputs], outputs=[dt[t.dtype] for t in op.outputs],
                attrs={a.name: at[a.type] for a in op.attrs})(_make(op))
    _registered = True


def session_options():
    """onnxruntime.SessionOptions with the Python ops registered."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    register()
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return so


def session(model_path_or_bytes, **kwargs):
    """An onnxruntime InferenceSession (CPU) that runs saw_int4 nodes in the ai.onnx.contrib domain."""
    import onnxruntime as ort

    return ort.InferenceSession(model_path_or_bytes, session_options(), providers=["CPUExecutionProvider"], **kwargs)


class PagedSession:
    """Drives a graph rewritten by `sawint4 insert --ort` in onnxruntime: owns the per-layer pools
    and a block allocator, and builds block_table / seq_lens / slot_mapping / query_start_loc for
    each step (the work a serving runtime does around a TensorRT engine).

    step({seq_id: new_token_ids}) runs all the sequences' new tokens in one call, packed as one
    row (batch 1, continuous batching) and returns {seq_id: logits [num_new, vocab]}. With
    `rows=True` each sequence is its own batch row (all must add the same number of tokens).
    """

    def __init__(self, model_path, num_blocks: int = 64, extra_feeds: dict | None = None):
        import onnx

        from trtllm_sawint4.allocator import BlockAllocator
        from trtllm_sawint4.build_scripts.insert import read_metadata

        model = onnx.load(str(model_path))
        self.meta = read_metadata(model)
        if not self.meta:
            raise ValueError(f"{model_path}: not a model rewritten by `sawint4 insert` (no cache metadata)")
        if self.meta["plugin_domain"] != contract.ORT_DOMAIN:
            raise ValueError(f"{model_path}: plugin nodes are in {self.meta['plugin_domain']!r}; rewrite with "
                             f"`sawint4 insert --ort` to run them in onnxruntime")
        self.session = session(model.SerializeToString())
        self.tokens_per_block = self.meta["spec"]["tokens_per_block"]
        shape = [num_blocks, *self.meta["pool_shape"][1:]]
        self.pools = [np.zeros(shape, np.uint8) for _ in range(self.meta["num_layers"])]
        self.allocator = BlockAllocator(num_blocks, self.tokens_per_block)
        self.extra_feeds = dict(extra_feeds or {})
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def add_sequence(self) -> int:
        return self.allocator.add_sequence()

    def length(self, seq_id: int) -> int:
        return self.allocator.length(seq_id)

    def step(self, new_tokens: dict, rows: bool = False) -> dict:
        seq_ids = list(new_tokens)
        counts = [len(new_tokens[s]) for s in seq_ids]
        starts = [self.length(s) for s in seq_ids]
        step = self.allocator.step_metadata(seq_ids, counts)
        ids = [np.asarray(new_tokens[s], np.int64) for s in seq_ids]
        pos = [np.arange(p, p + n, dtype=np.int64) for p, n in zip(starts, counts)]
        if rows:
            if len(set(counts)) != 1:
                raise ValueError(f"rows=True needs the same number of new tokens per sequence, got {counts}")
            input_ids, position_ids = np.stack(ids), np.stack(pos)
        else:
            input_ids, position_ids = np.concatenate(ids)[None], np.concatenate(pos)[None]
        feeds = dict(self.extra_feeds, input_ids=input_ids, position_ids=position_ids,
                     block_table=np.array(step.block_table, np.int32), seq_lens=np.array(step.seq_lens, np.int32),
                     slot_mapping=np.array(step.slot_mapping, np.int32),
                     query_start_loc=np.array(step.query_start_loc, np.int32))
        feeds.update({f"kv_pool_{i}": p for i, p in enumerate(self.pools)})
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        outs = dict(zip(self.output_names, self.session.run(None, feeds)))
        self.pools = [outs[f"kv_pool_{i}_out"] for i in range(len(self.pools))]
        logits = outs[self.output_names[0]].reshape(-1, outs[self.output_names[0]].shape[-1])
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return {s: logits[bounds[r]:bounds[r + 1]] for r, s in enumerate(seq_ids)}
