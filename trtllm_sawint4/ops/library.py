"""`torch.ops.sawint4.{append,decode,decode_planned,prefill}`: the public custom ops, the one entry every consumer
uses (PagedKVCache, the transformers and TensorRT-LLM integrations, the TensorRT plugins' JIT path,
the onnxruntime ops).

Each call runs the argument checks exactly once, then the implementation `dispatch` picks: the
Triton kernels on CUDA (when triton is installed), else the PyTorch reference. The checks that read
device memory (index ranges, the block-Hadamard form of the matrices; a device sync on GPU) are
skipped while a CUDA graph is being captured, and when the caller says it has validated those
tensors already with `skip_device_checks=True`: PagedKVCache does, because its plan() builds every
index on the host from the allocator and the cache builds its own transforms (a caller that passes
True for tensors it did not validate gets undefined behaviour, as with any unchecked index). Shape,
dtype and device checks always run.

`window` > 0 is sliding-window attention (a query at position p sees p - window < j <= p).

`decode` plans its own launch from the shipped config. `decode_planned` takes the launch a plan
decided: `schedule` (DecodeSchedule.to_list()) and `workspace` (fp32, at least
schedule.workspace_elems values, or None when the schedule needs none; kernels/schedule.py), so the
kernel only launches, which is what a CUDA graph of a decode step needs. They are two ops, not one
with optional arguments, because the workspace is written (a declared mutation) and torch 2.11's
custom-op wrapper looks a mutated argument up by position without filling in defaults: a mutable
argument with a default breaks every call that leaves it out. In `decode_planned` neither has a
default. The reference ignores both.

The fake implementations (shape checks, then empty outputs) make the ops traceable by torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trtllm_sawint4.kernels.schedule import DecodeSchedule, decode_shape

from . import checks, dispatch, reference


def _check_schedule(schedule, workspace, query, pool, block_table, q_matrix, v_matrix, storage, meta_dtype,
                    hadamard_block, window) -> DecodeSchedule:
    try:
        sched = DecodeSchedule.from_list(schedule)
    except ValueError as e:
        checks.fail("schedule", str(e).removeprefix("schedule: "))
    want = decode_shape(pool, block_table.shape, query.shape[1], query.shape[2], query.dtype, storage, meta_dtype,
                        v_matrix is not None, q_matrix is not None and hadamard_block == 0, window)
    if sched.shape != want:
        checks.fail("schedule", f"was planned for {sched.shape}, but the call is {want}; plan the step again")
    if sched.workspace_elems:
        if workspace is None:
            checks.fail("workspace", f"the schedule needs {sched.workspace_elems} fp32 values, none given")
        if workspace.dtype != torch.float32 or workspace.numel() < sched.workspace_elems \
                or workspace.device != pool.device or not workspace.is_contiguous():
            checks.fail("workspace", f"must be a contiguous float32 tensor on {pool.device} of at least "
                                     f"{sched.workspace_elems} values, got {workspace.dtype} {list(workspace.shape)} "
                                     f"on {workspace.device}")
    return sched


@torch.library.custom_op("sawint4::append", mutates_args=("pool",))
def append(pool: Tensor, key: Tensor, value: Tensor, slot_mapping: Tensor, k_matrix: Tensor | None,
           k_bias: Tensor | None, v_matrix: Tensor | None, storage: str, meta_dtype: str,
           hadamard_block: int = 0, skip_device_checks: bool = False) -> None:
    """Transform, quantize and write new K/V tokens into their slots (see reference.py)."""
    t = checks.check_append(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage, meta_dtype,
                            hadamard_block)
    if not skip_device_checks:
        checks.check_append_indices(pool, slot_mapping, t)
        checks.check_hadamard_form(hadamard_block, k_matrix=k_matrix, v_matrix=v_matrix)
    kernel = dispatch.kernel("append", pool.device)
    (kernel or reference.append)(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage, meta_dtype,
                                 hadamard_block)


@append.register_fake
def _(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage, meta_dtype, hadamard_block=0,
      skip_device_checks=False):
    checks.check_append(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage, meta_dtype,
                        hadamard_block)


def _decode(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype, hadamard_block,
            window, schedule, workspace, skip_device_checks) -> Tensor:
    t = checks.check_attention(query, pool, block_table, seq_lens, None, q_matrix, v_matrix, scale, storage,
                               meta_dtype, hadamard_block, window)
    sched = None if schedule is None else _check_schedule(schedule, workspace, query, pool, block_table, q_matrix,
                                                          v_matrix, storage, meta_dtype, hadamard_block, window)
    if not skip_device_checks:
        checks.check_attention_indices(pool, block_table, seq_lens, None, query.shape[0], t)
        checks.check_hadamard_form(hadamard_block, q_matrix=q_matrix, v_matrix=v_matrix)
    kernel = dispatch.kernel("decode", pool.device)
    if kernel is None:
        return reference.decode(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype,
                                hadamard_block, window)
    return kernel(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype, hadamard_block,
                  window, schedule=sched, workspace=workspace)


def _decode_fake(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype, hadamard_block,
                 window):
    checks.check_attention(query, pool, block_table, seq_lens, None, q_matrix, v_matrix, scale, storage, meta_dtype,
                           hadamard_block, window)
    return torch.empty_like(query)


@torch.library.custom_op("sawint4::decode", mutates_args=())
def decode(query: Tensor, pool: Tensor, block_table: Tensor, seq_lens: Tensor, q_matrix: Tensor | None,
           v_matrix: Tensor | None, scale: float, storage: str, meta_dtype: str, hadamard_block: int = 0,
           window: int = 0, skip_device_checks: bool = False) -> Tensor:
    """One query per sequence over its paged cache (see reference.py); the kernel plans its own launch."""
    return _decode(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype,
                   hadamard_block, window, None, None, skip_device_checks)


@decode.register_fake
def _(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype, hadamard_block=0,
      window=0, skip_device_checks=False):
    return _decode_fake(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype,
                        hadamard_block, window)


@torch.library.custom_op("sawint4::decode_planned", mutates_args=("workspace",))
def decode_planned(query: Tensor, pool: Tensor, block_table: Tensor, seq_lens: Tensor, q_matrix: Tensor | None,
                   v_matrix: Tensor | None, scale: float, storage: str, meta_dtype: str, hadamard_block: int,
                   window: int, schedule: list[int], workspace: Tensor | None,
                   skip_device_checks: bool = False) -> Tensor:
    """decode with the schedule and workspace a plan decided (PagedKVCache.plan); writes `workspace`."""
    return _decode(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype,
                   hadamard_block, window, schedule, workspace, skip_device_checks)


@decode_planned.register_fake
def _(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype, hadamard_block, window,
      schedule, workspace, skip_device_checks=False):
    return _decode_fake(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype,
                        hadamard_block, window)


@torch.library.custom_op("sawint4::prefill", mutates_args=())
def prefill(query: Tensor, pool: Tensor, block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
            q_matrix: Tensor | None, v_matrix: Tensor | None, scale: float, storage: str,
            meta_dtype: str, hadamard_block: int = 0, window: int = 0, skip_device_checks: bool = False) -> Tensor:
    """Causal attention of each sequence's last queries over its paged cache (see reference.py)."""
    t = checks.check_attention(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, scale,
                               storage, meta_dtype, hadamard_block, window)
    if not skip_device_checks:
        checks.check_attention_indices(pool, block_table, seq_lens, query_start_loc, query.shape[0], t)
        checks.check_hadamard_form(hadamard_block, q_matrix=q_matrix, v_matrix=v_matrix)
    kernel = dispatch.kernel("prefill", pool.device)
    return (kernel or reference.prefill)(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix,
                                         scale, storage, meta_dtype, hadamard_block, window)


@prefill.register_fake
def _(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, scale, storage, meta_dtype,
      hadamard_block=0, window=0, skip_device_checks=False):
    checks.check_attention(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, scale, storage,
                           meta_dtype, hadamard_block, window)
    return torch.empty_like(query)
