"""AutoDeploy's per-step sequence info -> our block table, lengths, query offsets and slots (plain torch)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trtllm_sawint4.integrations.tensorrt_llm import metadata
from trtllm_steps import ADSteps


def test_hand_worked_step():
    # T = 4. A: prefill of 5 tokens; B: extend (chunked prefill) of 3 tokens after 8 cached; C: one decode
    # token after 20 cached. Pages: A [7, 2], B [5, 0, 9], C [1, 3, 8, 6, 4, 10].
    t = 4
    info = torch.tensor([1, 5, 1, 3, 1, 1, 64, 16, 2, 8, 0, 0], dtype=torch.int32)
    cu_seqlen = torch.tensor([0, 5, 8, 9, 0, 0], dtype=torch.int32)  # capacity 5 sequences
    swc = torch.tensor([5, 11, 21, 0, 0], dtype=torch.int32)
    cache_loc = torch.tensor([7, 2, 5, 0, 9, 1, 3, 8, 6, 4, 10] + [0] * 9, dtype=torch.int32)
    cu_pages = torch.tensor([0, 2, 5, 11, 0, 0], dtype=torch.int32)
    m = metadata.map_step(info, cu_seqlen, cu_pages, cache_loc, swc, t)
    assert m.split == metadata.BatchSplit(num_prefill=2, num_prefill_tokens=8, num_decode=1)
    assert m.block_table.dtype == torch.int32 and m.block_table.shape == (3, 16)
    assert m.block_table[0, :3].tolist() == [7, 2, 0]
    assert m.block_table[1, :4].tolist() == [5, 0, 9, 0]
    assert m.block_table[2, :7].tolist() == [1, 3, 8, 6, 4, 10, 0]
    assert int(m.block_table[:, 7:].abs().sum()) == 0
    assert m.seq_lens.tolist() == [5, 11, 21]
    assert m.query_start_loc.tolist() == [0, 5, 8, 9]
    # A: positions 0..4 -> pages 7,7,7,7,2; B: positions 8,9,10 -> page 9; C: position 20 -> page 10
    assert m.slot_mapping.dtype == torch.int64
    assert m.slot_mapping.tolist() == [28, 29, 30, 31, 8, 36, 37, 38, 40]


def _oracle(entries, steps: ADSteps):
    table, slots = [], []
    for seq_id, pos, new, _ in entries:
        pages = steps.table_of(seq_id)
        table.append(pages + [0] * (steps.max_blocks - len(pages)))
        slots += [pages[p // steps.t] * steps.t + p % steps.t for p in range(pos, pos + new)]
    return table, slots


@st.composite
def _batches(draw):
    t = draw(st.sampled_from([8, 16]))
    max_seq_len = 96
    n_pre, n_ext, n_dec = draw(st.integers(0, 3)), draw(st.integers(0, 2)), draw(st.integers(0, 4))
    entries, sid = [], 0
    for kind, count in (("prefill", n_pre), ("extend", n_ext), ("decode", n_dec)):
        for _ in range(count):
            pos = 0 if kind == "prefill" else draw(st.integers(1 if kind == "extend" else 0, max_seq_len - 12))
            new = 1 if kind == "decode" else draw(st.integers(1, 10))
            entries.append((sid, pos, new, kind))
            sid += 1
    return t, max_seq_len, entries, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(_batches())
def test_mapping_matches_a_per_token_oracle(batch):
    t, max_seq_len, entries, seed = batch
    steps = ADSteps(max_batch=12, max_seq_len=max_seq_len, tokens_per_block=t, num_blocks=200, seed=seed)
    md = steps.step(entries)
    m = metadata.map_step(md["batch_info_host"], md["cu_seqlen"], md["cu_num_pages"], md["cache_loc"],
                          md["seq_len_with_cache"], t)
    table, slots = _oracle(entries, steps)
    assert m.split.num_seqs == len(entries) and m.split.num_tokens == len(slots)
    assert m.block_table.tolist() == table
    assert m.slot_mapping.tolist() == slots
    assert m.seq_lens.tolist() == [pos + new for _, pos, new, _ in entries]
    # per-token positions are AutoDeploy's position_ids
    seq, pos = metadata.token_seq_and_pos(md["cu_seqlen"], md["seq_len_with_cache"], len(entries), len(slots))
    assert pos.tolist() == md["position_ids"].flatten().tolist()
    assert seq.tolist() == [i for i, (_, _, new, _) in enumerate(entries) for _ in range(new)]


def test_token_rows_past_the_step_are_harmless():
    steps = ADSteps(max_batch=4, max_seq_len=64, tokens_per_block=8, num_blocks=40)
    md = steps.step([(0, 0, 3, "prefill"), (1, 9, 1, "decode")])
    seq, pos = metadata.token_seq_and_pos(md["cu_seqlen"], md["seq_len_with_cache"], 2, 7)  # 4 real + 3 padding
    assert seq.tolist()[:4] == [0, 0, 0, 1] and pos.tolist()[:4] == [0, 1, 2, 9]
    assert seq.shape == pos.shape == (7,)
    z_seq, z_pos = metadata.token_seq_and_pos(md["cu_seqlen"], md["seq_len_with_cache"], 0, 5)
    assert z_seq.tolist() == [0] * 5 and z_pos.tolist() == [0] * 5


def test_bad_batch_info_is_named():
    with pytest.raises(ValueError, match="batch_info_host: expected the 12-slot"):
        metadata.batch_split(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="batch_info_host: must be AutoDeploy's host"):
        metadata.batch_split(torch.zeros(12, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="negative"):
        metadata.batch_split(torch.tensor([-1, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        metadata.batch_split(torch.tensor([0, 0, 0, 0, 2, 6, 64, 4, 2, 8, 0, 0]))
    with pytest.raises(ValueError, match="max_blocks_per_seq is 0"):
        metadata.max_blocks_per_seq(torch.zeros(12, dtype=torch.int32))
