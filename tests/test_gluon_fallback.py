"""The Gluon decode kernel (kernels/decode_mma.py) where this Triton's Gluon cannot build it: it is switched
off with one log line and the Triton decode kernel serves the same call; decode never fails because of it.

On a CPU the Gluon kernel never runs (decode.mma_applies needs a GPU), so these tests put decode on the
Gluon path by hand and simulate the two ways a Triton release can break it: a renamed API (detected at
import) and a kernel that no longer compiles (detected at the first launch)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")
from triton.compiler.errors import CompilationError  # noqa: E402

from trtllm_sawint4 import KVCacheSpec, build_layer_transform  # noqa: E402
from trtllm_sawint4.ops import reference as ref  # noqa: E402

LOGGER = "trtllm_sawint4.kernels.decode_mma"


@pytest.fixture
def mma(monkeypatch):
    """decode_mma with its switch-off state restored after the test."""
    mod = sys.modules.get(LOGGER) or __import__(LOGGER, fromlist=["_"])
    monkeypatch.setattr(mod, "_UNAVAILABLE", mod._UNAVAILABLE)
    monkeypatch.setattr(mod, "_SWITCHED_OFF", mod._SWITCHED_OFF)
    return mod


def test_gluon_builds_on_this_triton(mma):
    """Every supported Triton (3.5-3.9) has the Gluon names the kernel uses, under one spelling or another."""
    assert mma.HAVE_GLUON, mma._UNAVAILABLE


def test_a_missing_gluon_api_is_named(mma, monkeypatch):
    from triton.experimental.gluon.language.nvidia.ampere import async_copy

    monkeypatch.delattr(async_copy, "async_load", raising=False)
    monkeypatch.delattr(async_copy, "async_copy_global_to_shared", raising=False)
    with pytest.raises(ImportError, match="async copy"):
        mma._gluon_api()


def _int4_case():
    """One decode call in the Gluon kernel's scope: INT4, head_dim 128, G = 4, fp16 metadata, 64-token blocks."""
    spec = KVCacheSpec(128, 1, 64, kv_format="saw_int4")
    tf = build_layer_transform(spec)
    g = torch.Generator().manual_seed(0)
    n = 2 * 64
    pool = torch.zeros(spec.pool_shape(2), dtype=torch.uint8)
    ref.append(pool, torch.randn(n, 1, 128, generator=g), torch.randn(n, 1, 128, generator=g), torch.arange(n),
               tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
    q = torch.randn(1, 4, 128, generator=g).to(torch.bfloat16)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    lens = torch.tensor([100], dtype=torch.int32)
    return (q, pool, table, lens, tf.q_matrix, None, 128 ** -0.5, spec.storage, spec.metadata_dtype,
            spec.rotation_block)


def _switch_off_lines(caplog):
    return [r for r in caplog.records if r.name == LOGGER and "switched off" in r.getMessage()]


def test_decode_serves_through_triton_when_the_gluon_kernel_does_not_compile(K, mma, monkeypatch, caplog,
                                                                              one_torch_thread):
    dmod = K["decode"]
    monkeypatch.setattr(mma, "_UNAVAILABLE", None)
    monkeypatch.setattr(mma, "_SWITCHED_OFF", False)
    launches = []

    class NotCompiling:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(grid)
                raise CompilationError(None, None, "simulated: this Gluon API changed")
            return launch

    monkeypatch.setattr(mma, "_decode_mma_kernel", NotCompiling(), raising=False)
    # as on a GPU, where the call is in the Gluon kernel's scope (on a CPU mma_applies says no)
    monkeypatch.setattr(dmod, "mma_applies", lambda *args: mma.available())
    args = _int4_case()
    want = ref.decode(*args[:-1], rotation_block=args[-1])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = dmod.decode(*args[:-1], rotation_block=args[-1])
        second = dmod.decode(*args[:-1], rotation_block=args[-1])
    torch.testing.assert_close(first.float(), want.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(second.float(), first.float(), atol=0, rtol=0)
    assert len(launches) == 1  # tried once; afterwards the Triton kernel serves directly
    lines = _switch_off_lines(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert triton.__version__ in lines[0].getMessage() and "simulated" in lines[0].getMessage()
    assert not mma.available()


def test_a_gluon_that_does_not_import_is_reported_once(mma, monkeypatch, caplog):
    monkeypatch.setattr(mma, "_UNAVAILABLE", "ImportError: simulated")
    monkeypatch.setattr(mma, "_SWITCHED_OFF", False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not mma.available() and not mma.available()
    assert len(_switch_off_lines(caplog)) == 1
