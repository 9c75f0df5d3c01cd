"""The append kernel divides by one reciprocal per token (kernels/append.py `_div_rn_by`):

    q = a * rcp;  r = fma(-q, b, a);  q' = fma(r, rcp, q)      (rcp = 1/b correctly rounded)

Markstein's theorem says q' is the correctly rounded a / b. The Triton interpreter has no fused
multiply-add, so the kernel tests on the CPU cannot exercise it; this test checks the identity with
an exact fma on the inputs the quantizer produces (0 <= a <= 15 b, fp16 or fp32 scales, tiny ones
scaled by 2^64 as the kernel does)."""

from fractions import Fraction

import numpy as np


def _round_f32(x: Fraction) -> np.float32:
    """Round an exact rational to the nearest float32, ties to even."""
    f = np.float32(float(x))
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    best = min(cands, key=lambda c: (abs(Fraction(float(c)) - x), int(np.float32(c).view(np.int32)) & 1))
    return np.float32(best)


def _fma(a, b, c) -> np.float32:
    return _round_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def _kernel_quotient(a: np.float32, b: np.float32) -> np.float32:
    k = np.float32(2.0 ** 64) if b < np.float32(2.0 ** -60) else np.float32(1.0)
    a, b = np.float32(a * k), np.float32(b * k)
    rcp = np.float32(1.0) / b
    q = np.float32(a * rcp)
    r = _fma(-q, b, a)
    return _fma(r, rcp, q)


def test_reciprocal_division_is_correctly_rounded():
    rng = np.random.default_rng(0)
    scales = np.concatenate([
        rng.uniform(1e-3, 10.0, 600).astype(np.float16),             # typical fp16 scales
        np.array([6e-8, 1.2e-7, 6.1e-5, 6.55e4 / 15], np.float16),  # fp16 subnormal / extreme
    ]).astype(np.float32)
    scales = np.concatenate([scales, rng.uniform(1e-3, 10.0, 300).astype(np.float32),
                             np.array([1e-40, 3e-39, 1.5e-38, 2.0 ** -70], np.float32)])  # fp32 metadata, subnormal
    checked = 0
    for b in scales:
        # a = y - min in [0, 15 b]: random, the endpoints, and values next to the rounding midpoints
        mids = (np.arange(16, dtype=np.float32) + np.float32(0.5)) * b
        a_vals = np.concatenate([rng.uniform(0, 15, 8).astype(np.float32) * b, [np.float32(0), np.float32(15) * b],
                                 mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
        for a in a_vals.astype(np.float32):
            if not (0 <= a <= np.float32(15) * b * np.float32(1.0001)):
                continue
            want = np.float32(a) / np.float32(b)
            got = _kernel_quotient(np.float32(a), np.float32(b))
            assert got == want, (float(a), float(b), float(got), float(want))
            checked += 1
    assert checked > 10000
