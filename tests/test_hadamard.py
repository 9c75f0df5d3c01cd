import pytest
import scipy.linalg
import torch

from trtllm_sawint4 import KVCacheSpec, build_layer_transform
from trtllm_sawint4.hadamard import block_hadamard_form, random_signs, rotation_matrix, sylvester_hadamard


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64, 128, 256])
def test_sylvester_matches_scipy(n):
    expected = torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float64) / n**0.5
    torch.testing.assert_close(sylvester_hadamard(n, torch.float64), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("head_dim, block", [(64, 16), (64, 64), (128, 32), (128, 128), (256, 128)])
def test_block_rotation_is_orthonormal_involutory_block_diagonal(head_dim, block):
    r = rotation_matrix(head_dim, block).double()
    eye = torch.eye(head_dim, dtype=torch.float64)
    torch.testing.assert_close(r @ r.T, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(r @ r, eye, atol=1e-6, rtol=0)  # symmetric: its own inverse
    h = torch.tensor(scipy.linalg.hadamard(block), dtype=torch.float64) / block**0.5
    for i in range(head_dim // block):
        for j in range(head_dim // block):
            tile = r[i * block:(i + 1) * block, j * block:(j + 1) * block]
            torch.testing.assert_close(tile, h if i == j else torch.zeros_like(h), atol=1e-6, rtol=0)


def test_sign_flips_keep_orthogonality_and_are_seeded():
    s = random_signs(128, seed=7)
    assert set(s.tolist()) == {-1.0, 1.0}
    assert torch.equal(s, random_signs(128, seed=7)) and not torch.equal(s, random_signs(128, seed=8))
    r = rotation_matrix(128, 64, s).double()
    torch.testing.assert_close(r @ r.T, torch.eye(128, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rotate_v", [False, True])
@pytest.mark.parametrize("calibrated", [False, True])
def test_layer_transform_preserves_attention_logits_up_to_a_constant(rotate_v, calibrated):
    h, d = 2, 64
    spec = KVCacheSpec(d, h, kv_format="saw_int4", rotation_block=32, rotate_v=rotate_v, sign_seed=3)
    mean = torch.randn(h, d) if calibrated else None
    scale = torch.rand(h, d) + 0.5 if calibrated else None
    tf = build_layer_transform(spec, mean, scale)
    q, k, v = torch.randn(h, d, dtype=torch.float64), torch.randn(5, h, d, dtype=torch.float64), torch.randn(h, d)
    q2 = torch.einsum("hij,hj->hi", tf.q_matrix.double(), q)
    k2 = torch.einsum("hij,nhj->nhi", tf.k_matrix.double(), k)
    if tf.k_bias is not None:
        k2 = k2 + tf.k_bias.double()
    logits, logits2 = torch.einsum("hd,nhd->hn", q, k), torch.einsum("hd,nhd->hn", q2, k2)
    shift = logits2 - logits  # the same constant (-q . mean) for every key
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-5, rtol=0)
    if rotate_v:
        torch.testing.assert_close(tf.v_matrix.T @ (tf.v_matrix @ v.T), v.T, atol=1e-5, rtol=0)
    else:
        assert tf.v_matrix is None


def test_unrotated_uncalibrated_transform_is_identity():
    tf = build_layer_transform(KVCacheSpec(64, 2, kv_format="int4"))
    assert (tf.k_matrix, tf.k_bias, tf.q_matrix, tf.v_matrix) == (None, None, None, None)


@pytest.mark.parametrize("head_dim, block", [(64, 2), (64, 16), (64, 64), (128, 32), (128, 128), (256, 64), (256, 256)])
@pytest.mark.parametrize("calibrated", [False, True])
def test_layer_transforms_are_in_block_hadamard_form(head_dim, block, calibrated):
    """Every matrix build_layer_transform makes equals its block-Hadamard reading bit for bit, so the
    kernels' diagonal-only path (hadamard_block > 0) computes exactly the transform the spec defines."""
    h = 2
    spec = KVCacheSpec(head_dim, h, kv_format="saw_int4", rotation_block=block, rotate_v=True, sign_seed=5)
    mean = torch.randn(h, head_dim) if calibrated else None
    scale = torch.rand(h, head_dim) + 0.5 if calibrated else None
    tf = build_layer_transform(spec, mean, scale)
    assert tf.hadamard_block == block
    for m in (tf.k_matrix, tf.q_matrix, tf.v_matrix):
        assert torch.equal(block_hadamard_form(m, block), m)


def test_calibrated_unrotated_transform_is_diagonal_form():
    h, d = 2, 64
    tf = build_layer_transform(KVCacheSpec(d, h, kv_format="int4"), torch.randn(h, d), torch.rand(h, d) + 0.5)
    assert tf.hadamard_block == 1
    assert torch.equal(block_hadamard_form(tf.q_matrix, 1), tf.q_matrix)
    assert build_layer_transform(KVCacheSpec(d, h, kv_format="int4")).hadamard_block == 0


def test_block_hadamard_form_reads_only_the_first_row_of_each_block():
    d, block = 32, 8
    m = torch.randn(3, d, d)
    want = block_hadamard_form(m, block)
    first = (torch.arange(d) // block) * block
    noisy = torch.randn(3, d, d)
    noisy[:, first, torch.arange(d)] = m[:, first, torch.arange(d)]
    assert torch.equal(block_hadamard_form(noisy, block), want)
    signs = torch.tensor(scipy.linalg.hadamard(block), dtype=torch.float32)
    torch.testing.assert_close(want[1, :block, :block], signs * m[1, 0, :block][None, :])
    assert torch.count_nonzero(want[:, :block, block:]) == 0  # off-diagonal blocks
    with pytest.raises(ValueError, match="hadamard_block"):
        block_hadamard_form(m, 3)
