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


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after: the tiny models are loops of small
    ops, where a second OpenMP thread only waits at barriers on a shared 2-core machine; the
    thread count does not change what is checked."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """A tiny training .npz (``datafiles.tiny_training_npz``), one per test module."""
    import datafiles

    return datafiles.tiny_training_npz(tmp_path_factory.mktemp("npz") / "d.npz")
