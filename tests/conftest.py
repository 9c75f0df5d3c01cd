import os

import torch

# On a machine without a GPU the Triton kernels run in Triton's interpreter. This must be decided
# before anything imports triton (test modules are collected in any order).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
