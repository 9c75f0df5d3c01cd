"""Paged decode attention: plan the launch (kernels/schedule.py), then run its backend.

Two backends: the Triton kernel (decode_triton.py, every format) and, for INT4 at head_dim 128, the
Gluon kernel (decode_gluon.py); both write split partials that kernels/_reduce.py merges. `decode`
takes a schedule from `schedule_for` (what PagedKVCache.plan computes once per step) and a workspace
of at least `schedule.workspace_elems` fp32 values; without them it plans here from `config`.
"""

from __future__ import annotations

import torch
from triton.compiler.errors import CompilationError

from trtllm_sawint4.spec import StorageFormat

from . import decode_gluon, decode_triton
from .config import DEFAULT, DecodeConfig
from .schedule import DecodeSchedule, DecodeShape, decode_shape, num_sms, plan_decode  # noqa: F401


def plan(shape: DecodeShape, device: torch.device, config: DecodeConfig | None = None,
         num_splits: int | None = None) -> DecodeSchedule:
    """The schedule of a decode step of `shape` on `device` (host only)."""
    return plan_decode(shape, config or DEFAULT.decode, num_sms(device), decode_gluon.available(),
                       interpreter=device.type == "cpu", num_splits=num_splits)


def schedule_for(query, pool, block_table, q_matrix, v_matrix, storage: str, meta_dtype: str,
                 hadamard_block: int = 0, window: int = 0, *, config: DecodeConfig | None = None,
                 num_splits: int | None = None) -> DecodeSchedule:
    """The schedule `decode` would plan for these arguments."""
    shape = decode_shape(pool, block_table.shape, query.shape[1], query.shape[2], query.dtype, storage, meta_dtype,
                         v_matrix is not None, q_matrix is not None and hadamard_block == 0, window)
    return plan(shape, pool.device, config, num_splits)


def workspace_views(schedule: DecodeSchedule, workspace: torch.Tensor | None, device):
    """(partial_out [B, H, S, GP, D], partial_lse [B, H, S, GP], q_prep [B, Hq, D]) inside `workspace`
    (fp32, at least schedule.workspace_elems values; None: a fresh one). Unused parts are None."""
    need = schedule.workspace_elems
    if need == 0:
        return None, None, None
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=device)
    elif workspace.dtype != torch.float32 or workspace.device != device or workspace.numel() < need \
            or not workspace.is_contiguous():
        raise ValueError(f"workspace: must be a contiguous float32 tensor on {device} of at least "
                         f"{need} values (DecodeSchedule.workspace_elems), got {workspace.dtype} "
                         f"{list(workspace.shape)} on {workspace.device}")
    s = schedule.shape
    flat = workspace.view(-1)
    n_po, n_pl = schedule.partial_out_elems, schedule.partial_lse_elems
    po = pl = qp = None
    if n_po:
        po = flat[:n_po].view(s.batch, s.kv_heads, schedule.splits, schedule.group_pad, s.head_dim)
        pl = flat[n_po:n_po + n_pl].view(s.batch, s.kv_heads, schedule.splits, schedule.group_pad)
    if schedule.q_prep_elems:
        qp = flat[n_po + n_pl:n_po + n_pl + schedule.q_prep_elems].view(s.batch, s.kv_heads * s.group, s.head_dim)
    return po, pl, qp


def decode(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale: float, storage: str, meta_dtype: str,
           hadamard_block: int = 0, window: int = 0, *, schedule: DecodeSchedule | None = None,
           workspace: torch.Tensor | None = None, config: DecodeConfig | None = None,
           num_splits: int | None = None):
    """Same signature and result as trtllm_sawint4.ops.reference.decode, plus the launch: `schedule`
    (None: planned here from `config`, DEFAULT.decode when None, and `num_splits`, an override of the
    split count) and `workspace` (None: allocated here)."""
    bsz, hq, d = query.shape
    fmt = StorageFormat(storage, meta_dtype)
    t = fmt.tokens_per_block(d, pool.shape[-1])
    out = torch.empty_like(query)
    if bsz == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    if schedule is None:
        schedule = schedule_for(query, pool, block_table, q_matrix, v_matrix, storage, meta_dtype, hadamard_block,
                                window, config=config, num_splits=num_splits)
    else:
        want = decode_shape(pool, block_table.shape, hq, d, query.dtype, storage, meta_dtype, v_matrix is not None,
                            q_matrix is not None and hadamard_block == 0, window)
        if schedule.shape != want:
            raise ValueError(f"schedule: planned for {schedule.shape}, but the call is {want}; plan the step again")
    if schedule.backend == "gluon" and not decode_gluon.available():  # switched off since it was planned
        schedule = plan(schedule.shape, query.device, config, num_splits)
        workspace = None
    po, pl, qp = workspace_views(schedule, workspace, query.device)
    if schedule.backend == "gluon":
        try:
            decode_gluon.run(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, t, hadamard_block,
                             schedule, out, po, pl, qp)
            return out
        except CompilationError as e:  # this Triton's Gluon cannot build it: the Triton kernel serves from now on
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            decode_gluon.switch_off(f"{type(e).__name__}: {lines[-1] if lines else ''}")
            schedule = plan(schedule.shape, query.device, config, num_splits)
            po, pl, qp = workspace_views(schedule, None, query.device)
    if schedule.backend == "triton":
        decode_triton.run(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, fmt, t, hadamard_block,
                          schedule, out, po, pl)
    return out
