import os

# Triton kernels run on CPU tensors only in the interpreter, which `@triton.jit` picks when
# the module is decorated: set it before anything imports triton. setdefault keeps an
# explicit TRITON_INTERPRET=0 (a GPU runner) in force. FP fusion pinned to today's default.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
