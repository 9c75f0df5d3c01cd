"""Bad input to the public ops raises a ValueError naming the argument, before anything is written."""

import pytest
import torch

import trtllm_sawint4.ops  # noqa: F401
from trtllm_sawint4 import KVCacheSpec, build_layer_transform

ops = torch.ops.sawint4
SPEC = KVCacheSpec(64, 2, 16, kv_format="saw_int4")
TF = build_layer_transform(SPEC)


def _pool(nb=4):
    return torch.zeros(SPEC.pool_shape(nb), dtype=torch.uint8)


def _append_args(**over):
    args = dict(pool=_pool(), key=torch.randn(3, 2, 64), value=torch.randn(3, 2, 64),
                slot_mapping=torch.tensor([0, 1, 17]), k_matrix=TF.k_matrix, k_bias=None, v_matrix=None,
                storage="int4", meta_dtype="fp16")
    args.update(over)
    return args


def _decode_args(**over):
    args = dict(query=torch.randn(2, 4, 64), pool=_pool(), block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                seq_lens=torch.tensor([20, 3], dtype=torch.int32), q_matrix=TF.q_matrix, v_matrix=None, scale=0.125,
                storage="int4", meta_dtype="fp16")
    args.update(over)
    return args


APPEND_CASES = [
    (dict(key=torch.randn(3, 2, 64).to(torch.int32)), "key"),
    (dict(key=torch.randn(3, 64)), "key"),
    (dict(value=torch.randn(3, 2, 64, dtype=torch.float64)), "value"),
    (dict(value=torch.randn(4, 2, 64)), "value"),
    (dict(key=torch.randn(3, 3, 64), value=torch.randn(3, 3, 64)), "KV heads"),
    (dict(key=torch.randn(3, 2, 48), value=torch.randn(3, 2, 48)), "head_dim"),
    (dict(slot_mapping=torch.tensor([0, 1, 64])), "slot_mapping"),
    (dict(slot_mapping=torch.tensor([0, -1, 2])), "slot_mapping"),
    (dict(slot_mapping=torch.tensor([5, 5, 2])), "slot_mapping"),
    (dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), "slot_mapping"),
    (dict(slot_mapping=torch.tensor([0, 1])), "slot_mapping"),
    (dict(pool=torch.zeros(4, 2, 2, 100, dtype=torch.uint8)), "pool"),
    (dict(pool=_pool().float()), "pool"),
    (dict(storage="int2"), "storage"),
    (dict(meta_dtype="bf16"), "meta_dtype"),
    (dict(k_matrix=torch.randn(2, 64, 32)), "k_matrix"),
    (dict(k_matrix=TF.k_matrix.double()), "k_matrix"),
    (dict(hadamard_block=48), "hadamard_block"),
    (dict(hadamard_block=128), "hadamard_block"),
    (dict(hadamard_block=-2), "hadamard_block"),
    (dict(k_matrix=TF.k_matrix, storage="bf16", pool=torch.zeros(KVCacheSpec(64, 2, 16, "bf16").pool_shape(4),
                                                                 dtype=torch.uint8)), "k_matrix"),
]


@pytest.mark.parametrize("over, name", APPEND_CASES)
def test_append_rejects(over, name):
    args = _append_args(**over)
    before = args["pool"].clone()
    with pytest.raises(ValueError, match=name):
        ops.append(**args)
    assert torch.equal(args["pool"], before)


DECODE_CASES = [
    (dict(query=torch.randn(2, 3, 64)), "num_heads"),
    (dict(query=torch.randn(3, 4, 64)), "query"),
    (dict(query=torch.randn(2, 4, 64).to(torch.int8)), "query"),
    (dict(block_table=torch.tensor([[0, 1], [2, 3]])), "block_table"),
    (dict(block_table=torch.tensor([[0, 9], [2, 3]], dtype=torch.int32)), "block_table"),
    (dict(block_table=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32)), "block_table"),
    (dict(seq_lens=torch.tensor([33, 3], dtype=torch.int32)), "seq_lens"),
    (dict(seq_lens=torch.tensor([-1, 3], dtype=torch.int32)), "seq_lens"),
    (dict(seq_lens=torch.tensor([1, 2, 3], dtype=torch.int32)), "seq_lens"),
    (dict(scale=0.0), "scale"),
    (dict(scale=float("nan")), "scale"),
    (dict(q_matrix=torch.randn(1, 64, 64)), "q_matrix"),
    (dict(v_matrix=torch.randn(64, 64, 1)), "v_matrix"),
    (dict(hadamard_block=3), "hadamard_block"),
    (dict(window=-1), "window"),
]


@pytest.mark.parametrize("over, name", DECODE_CASES)
def test_decode_rejects(over, name):
    with pytest.raises(ValueError, match=name):
        ops.decode(**_decode_args(**over))


def test_unused_block_table_entries_are_not_checked():
    # a table padded with -1 past each sequence's blocks is fine
    out = ops.decode(**_decode_args(block_table=torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)))
    assert out.shape == (2, 4, 64)


@pytest.mark.parametrize("starts, msg", [([0, 1, 5], "query_start_loc"), ([1, 2, 3], "query_start_loc"),
                                         ([0, 3, 2], "query_start_loc"), ([0, 0, 5], "query_start_loc")])
def test_prefill_rejects_bad_query_offsets(starts, msg):
    args = _decode_args(query=torch.randn(5, 4, 64), seq_lens=torch.tensor([2, 3], dtype=torch.int32))
    args["query_start_loc"] = torch.tensor(starts, dtype=torch.int32)
    with pytest.raises(ValueError, match=msg):
        ops.prefill(**args)


def test_sequence_longer_than_its_blocks_is_rejected():
    args = _decode_args(block_table=torch.tensor([[0], [2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_lens"):
        ops.decode(**args)


def test_calibration_shape_and_values_are_checked():
    with pytest.raises(ValueError, match="channel_scale"):
        build_layer_transform(SPEC, None, torch.zeros(2, 64))
    with pytest.raises(ValueError, match="channel_mean"):
        build_layer_transform(SPEC, torch.zeros(3, 64), None)
    with pytest.raises(ValueError, match="quantized"):
        build_layer_transform(KVCacheSpec(64, 2, kv_format="bf16"), torch.zeros(2, 64), None)


def test_tensors_on_another_device_are_rejected():
    with pytest.raises(ValueError, match="query.*must be on cpu"):
        ops.decode(**_decode_args(query=torch.randn(2, 4, 64, device="meta")))
    with pytest.raises(ValueError, match="slot_mapping.*must be on cpu"):
        ops.append(**_append_args(slot_mapping=torch.tensor([0, 1, 17], device="meta")))


def _planned(**over):
    """A decode call's arguments with the schedule and workspace planned for it (as PagedKVCache does)."""
    from trtllm_sawint4.kernels.config import DEFAULT
    from trtllm_sawint4.kernels.schedule import decode_shape, plan_decode

    args = dict(_decode_args(**over), hadamard_block=0, window=0)
    shape = decode_shape(args["pool"], args["block_table"].shape, 4, 64, args["query"].dtype, "int4", "fp16",
                         False, True)
    sched = plan_decode(shape, DEFAULT.decode, 132, gluon_available=False)
    return args, sched


def test_a_schedule_planned_for_another_call_is_rejected():
    args, sched = _planned()
    ops.decode_planned(**args, schedule=sched.to_list(), workspace=sched.workspace("cpu"))  # the right one runs
    with pytest.raises(ValueError, match="schedule: was planned for"):
        ops.decode_planned(**dict(args, block_table=torch.tensor([[0, 1, 2], [3, 0, 0]], dtype=torch.int32)),
                   schedule=sched.to_list(), workspace=sched.workspace("cpu"))
    with pytest.raises(ValueError, match="schedule: was planned for"):
        ops.decode_planned(**dict(args, query=args["query"].half()), schedule=sched.to_list(), workspace=sched.workspace("cpu"))
    with pytest.raises(ValueError, match="schedule"):
        ops.decode_planned(**args, schedule=[7, 1, 2], workspace=sched.workspace("cpu"))
    if sched.workspace_elems:
        with pytest.raises(ValueError, match="workspace"):
            ops.decode_planned(**args, schedule=sched.to_list(), workspace=torch.empty(1))
        with pytest.raises(ValueError, match="workspace"):
            ops.decode_planned(**args, schedule=sched.to_list(), workspace=None)


def test_no_op_has_a_mutated_argument_with_a_default():
    """torch 2.11's custom-op wrapper finds a mutated argument by position without filling in defaults, so
    one with a default breaks every call that leaves it out (IndexError before the op runs)."""
    import trtllm_sawint4.integrations.tensorrt_llm.ops  # noqa: F401  (registers the TensorRT-LLM ops)
    names = [n for n in dir(torch.ops.sawint4) if not n.startswith("_")]
    ops_seen = 0
    for name in names:
        packet = getattr(torch.ops.sawint4, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        ops_seen += 1
        for arg in packet.default._schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write:
                assert not arg.has_default_value(), f"sawint4::{name}: mutated argument {arg.name} has a default"
    assert ops_seen >= 6
