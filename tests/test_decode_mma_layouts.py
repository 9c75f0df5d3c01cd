"""The index algebra of the Gluon decode kernel (kernels/decode_gluon.py), in plain PyTorch on the CPU.

The kernel never moves data to match the tensor-core layouts: it relabels channels and tokens by
reshaping and permuting bit dimensions, and undoes the labels where they become visible (q's channel
order, the output store). Here the same reshapes and permutes are applied to index tensors and to
data, and the kernel's products are recomputed with them against plain attention algebra. The GPU
tests check the kernel itself; these keep the relabellings consistent with each other on every CI run.
"""

import pytest
import torch

pytest.importorskip("triton")
from trtllm_sawint4.hadamard import sylvester_hadamard  # noqa: E402
from trtllm_sawint4.kernels import decode_gluon as dm  # noqa: E402

BITS6 = [2] * 6


def _k_logical(x):  # [token, byte] -> [token, k]   (decode_gluon._k_logical)
    return x.reshape(64, *BITS6).permute(dm.K_BITS_PERM).reshape(64, 64)


def _v_logical(x):  # [token, byte] -> [m, k]   (decode_gluon._v_logical)
    return x.permute(1, 0).reshape(*BITS6, *BITS6).permute(dm.V_BITS_PERM).reshape(64, 64)


def _p_logical(p):  # [token, head] -> [k, head]   (decode_gluon._p_logical)
    return p.reshape(*BITS6, 8).permute(dm.P_BITS_PERM).reshape(64, 8)


def _q_operands(x):  # [head, 128] -> ([k, head], [k, head])   (decode_gluon._q_operands)
    x = x.reshape(8, 2, *BITS6).permute(dm.Q_BITS_PERM).reshape(64, 8, 2)
    return x[..., 0], x[..., 1]


def _v_token(k):
    """The token that product index k of V's relabelling stands for (V_BITS_PERM's doc)."""
    bit = lambda i: (k >> i) & 1  # noqa: E731
    return bit(1) | bit(2) << 1 | bit(3) << 2 | bit(0) << 3 | bit(4) << 4 | bit(5) << 5


def test_k_relabel_reads_the_bytes_q_is_loaded_in():
    idx = torch.arange(64 * 64).reshape(64, 64)  # token * 64 + byte
    got = _k_logical(idx)
    k = torch.arange(64)
    assert torch.equal(got // 64, torch.arange(64)[:, None].expand(64, 64))  # tokens stay
    assert torch.equal(got % 64, dm.k_channel_byte(k)[None, :].expand(64, 64))
    assert sorted(dm.k_channel_byte(k).tolist()) == list(range(64))  # a permutation


def test_v_relabel_and_p_relabel_agree_on_tokens():
    idx = torch.arange(64 * 64).reshape(64, 64)
    got = _v_logical(idx)  # [m, k] -> token * 64 + byte
    m, k = torch.arange(64), torch.arange(64)
    assert torch.equal(got % 64, dm.v_channel_byte(m)[:, None].expand(64, 64))
    assert torch.equal(got // 64, _v_token(k)[None, :].expand(64, 64))
    p = _p_logical(torch.arange(64)[:, None].expand(64, 8) * 8 + torch.arange(8))
    assert torch.equal(p // 8, _v_token(k)[:, None].expand(64, 8))
    assert sorted(dm.v_channel_byte(m).tolist()) == list(range(64))


def test_q_operands_follow_the_k_channel_order():
    x = torch.arange(8)[:, None] * 1000 + torch.arange(128)  # head * 1000 + channel
    q_lo, q_hi = _q_operands(x)
    kb = dm.k_channel_byte(torch.arange(64))
    assert torch.equal(q_lo, torch.arange(8)[None, :] * 1000 + kb[:, None])
    assert torch.equal(q_hi, torch.arange(8)[None, :] * 1000 + 64 + kb[:, None])


def test_the_relabelled_products_are_attention():
    """S^T = K_lo' q_lo'^T + K_hi' q_hi'^T and O^T = V' P'^T with the relabels equal q K^T and P V."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(64, 128, generator=g, dtype=torch.float64)  # [token, channel]
    v = torch.randn(64, 128, generator=g, dtype=torch.float64)
    q = torch.randn(8, 128, generator=g, dtype=torch.float64)
    q_lo, q_hi = _q_operands(q)
    s_t = _k_logical(k[:, :64]) @ q_lo + _k_logical(k[:, 64:]) @ q_hi
    torch.testing.assert_close(s_t, k @ q.T)
    p = torch.softmax(s_t, 0)  # [token, head]
    o_lo = _v_logical(v[:, :64]) @ _p_logical(p)  # [m, head]
    o_hi = _v_logical(v[:, 64:]) @ _p_logical(p)
    out = torch.empty(8, 128, dtype=torch.float64)
    ch = dm.v_channel_byte(torch.arange(64))
    out[:, ch], out[:, 64 + ch] = o_lo.T, o_hi.T  # the kernel's store
    torch.testing.assert_close(out, p.T @ v)


def _butterfly(x, b):  # decode_gluon._butterfly
    x = x.reshape(8, 128 >> (b + 1), 2, 1 << b).permute(0, 1, 3, 2)
    a, c = x[..., 0], x[..., 1]
    return torch.stack([a + c, a - c], -1).permute(0, 1, 3, 2).reshape(8, 128)


@pytest.mark.parametrize("block", [1, 2, 16, 32, 64, 128])
def test_butterflies_are_the_block_sylvester_product(block):
    """_rotated_q: log2(block) stages over (q * d) = (q * d) @ blockdiag(S_block), S unnormalised."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 128, generator=g, dtype=torch.float64)
    y = x
    for b in range(7):
        if (1 << b) < block:
            y = _butterfly(y, b)
    s = torch.block_diag(*[sylvester_hadamard(block, torch.float64) * block ** 0.5] * (128 // block))
    torch.testing.assert_close(y, x @ s)
