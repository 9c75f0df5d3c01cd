import os

import torch

# The one place that switches Triton's interpreter on: on a machine without a GPU the Triton kernels
# run in it. Triton reads TRITON_INTERPRET when a kernel is decorated (its own library functions
# included), so this must happen before anything imports triton: conftest runs before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: intra-op threads only add synchronisation (and stall badly on a busy 2-core runner)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def interp_kernels():
    """The kernel modules by name ("append", "decode", "prefill", ...), run by Triton's interpreter on CPU
    tensors; skips where they were compiled for a GPU (tests/gpu has `cuda_kernels`)."""
    import importlib
    import sys

    pytest.importorskip("triton")
    names = ("_common", "_tiles", "_reduce", "decode_triton", "decode_gluon", "append", "decode", "prefill")
    mods = {name: importlib.import_module(f"trtllm_sawint4.kernels.{name}") for name in names}
    kernel = getattr(sys.modules["trtllm_sawint4.kernels.append"], "_append_kernel", None)
    if type(kernel).__name__ != "InterpretedFunction":
        pytest.skip("the kernels were compiled for the GPU in this session; run on a machine without CUDA or "
                    "with TRITON_INTERPRET=1 set before pytest starts")
    yield mods


@pytest.fixture
def kernels_on_cpu(interp_kernels, monkeypatch):
    """The ops dispatch CPU tensors to the Triton kernels under the interpreter (as CUDA tensors go to the
    compiled ones), so the cache's whole kernel path runs here: plan -> schedule -> op checks -> launch."""
    from trtllm_sawint4.ops import dispatch

    calls = []

    def decode(*args, **kwargs):
        calls.append(kwargs)
        return interp_kernels["decode"].decode(*args, **kwargs)

    table = {"append": interp_kernels["append"].append, "decode": decode, "prefill": interp_kernels["prefill"].prefill}
    monkeypatch.setattr(dispatch, "kernel", lambda name, device: table[name])
    return calls
