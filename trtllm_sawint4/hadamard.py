"""Block-diagonal Hadamard rotation.

R = blockdiag(H_b, ..., H_b) @ diag(signs), with H_b the normalized Sylvester Hadamard
matrix of size b. R is orthogonal, so (R q) . (R k) == q . k. Without sign flips R is
also symmetric and its own inverse.
"""

from __future__ import annotations

import torch


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix of size n (a power of 2): H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


def random_signs(head_dim: int, seed: int) -> torch.Tensor:
    """Seeded +-1 vector, identical on every machine (CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (head_dim,), generator=g).to(torch.float32) * 2 - 1


def rotation_matrix(head_dim: int, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """R = blockdiag(H_block) @ diag(signs), float32 [head_dim, head_dim]; rotate x with R @ x."""
    if head_dim % block:
        raise ValueError(f"block={block} must divide head_dim={head_dim}")
    r = torch.block_diag(*[sylvester_hadamard(block, torch.float64)] * (head_dim // block))
    if signs is not None:
        r = r * signs.to(torch.float64)[None, :]
    return r.to(torch.float32)


def block_hadamard_form(matrix: torch.Tensor, block: int) -> torch.Tensor:
    """The block-Hadamard reading of `matrix` ([..., D, D]): M[i, j] = S[i, j] * matrix[(j // block) * block, j],
    S the +-1 blockdiag(Sylvester(block)), built from the first row of each block alone. A matrix is in
    block-Hadamard form when this returns it unchanged; then a kernel needs only that diagonal factor
    and makes S from indices (the ops' hadamard_block). Every transform of build_layer_transform has
    the form (R diag(c) = S diag(c / sqrt(block)))."""
    d = matrix.shape[-1]
    if block < 1 or block & (block - 1) or d % block:
        raise ValueError(f"hadamard_block must be a power of 2 dividing head_dim={d}, got {block}")
    signs = torch.block_diag(*[sylvester_hadamard(block, torch.float64) * block**0.5] * (d // block))
    first = (torch.arange(d, device=matrix.device) // block) * block
    diag = matrix[..., first, torch.arange(d, device=matrix.device)]  # [..., D]
    return signs.to(matrix.device, matrix.dtype) * diag[..., None, :]
