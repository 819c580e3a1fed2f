"""Op providers: the reference runs plain PyTorch only; the triton provider (CPU tensors in
the Triton interpreter) and the cpu provider compute the reference's numbers."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dvpvae import DVPVAE, FastDVPVAE, Noise
from dvpvae.kernels import triton_runs_on
from dvpvae.ops import PROVIDERS, REFERENCE, CpuOps, TritonOps, best_ops, get_ops
from test_fast import REORDER_FACTOR, compare_forward, perturbed

needs_interpreter = pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")),
    reason="needs triton with TRITON_INTERPRET=1 set before it is imported")


class OpNamespaces(TorchDispatchMode):
    """Records the namespace of every op dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.namespaces = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def test_reference_model_runs_plain_pytorch_only():
    model, x = perturbed("tiny", seed=4)
    seen = OpNamespaces()
    with seen:
        model.train()
        model(x[:2]).loss.backward()
        model.eval()
        with torch.no_grad():
            model(x[:2])
        model.estimate_nll(x[:2], 3)
        model.sample(2)
        model.prior.sample(2)
    assert seen.namespaces <= {"aten", "prim", "prims"}, seen.namespaces


def test_cpu_provider_computes_with_its_custom_ops():
    model, x = perturbed("tiny", seed=4)
    fast = FastDVPVAE.from_reference(model, compile=False)
    assert isinstance(fast.ops_for(x.device), CpuOps)
    seen = OpNamespaces()
    with seen:
        fast.train()
        fast(x[:2]).loss.backward()
    assert "dvpvae" in seen.namespaces


@pytest.mark.parametrize("training", [True, False])
@needs_interpreter
def test_triton_provider_matches_reference_end_to_end(training):
    ref, x = perturbed("tiny", seed=5)
    fast = FastDVPVAE.from_reference(ref, compile=False, ops="triton")
    assert fast.ops_for(x.device).name == "triton"
    compare_forward(ref, fast, x[:2], training, factor=REORDER_FACTOR)


@needs_interpreter
def test_triton_provider_samples_like_reference():
    ref, _ = perturbed("tiny", seed=6)
    fast = FastDVPVAE.from_reference(ref, compile=False, ops="triton")
    ref.eval()
    a = ref.sample(2, 0.7, noise=Noise(generator=torch.Generator().manual_seed(4)))
    b = fast.sample(2, 0.7, noise=Noise(generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_provider_names_resolve_in_one_place():
    assert PROVIDERS == ("reference", "cpu", "triton")
    assert get_ops("reference") is REFERENCE
    assert isinstance(get_ops("cpu"), CpuOps) and get_ops("cpu", extension=False).extension is False
    assert isinstance(get_ops("triton"), TritonOps)
    with pytest.raises(ValueError, match="unknown op provider 'cudnn'"):
        get_ops("cudnn")
    with pytest.raises(ValueError, match="unknown op provider"):
        DVPVAE("tiny", ops="fast")


def test_best_provider_per_device():
    assert isinstance(best_ops(torch.device("cpu")), CpuOps)
    assert best_ops(torch.device("cpu"), fused_kernels=False) is REFERENCE
    assert best_ops(torch.device("meta")) is REFERENCE
    fast = FastDVPVAE("tiny", compile=False)
    assert fast.ops is None and isinstance(fast.ops_for(torch.device("cpu")), CpuOps)
    assert FastDVPVAE("tiny", compile=False, fused_kernels=False).ops_for(torch.device("cpu")) is REFERENCE


def test_interpreter_is_on_for_the_test_suite():
    # The triton tests above skip rather than fail without it; CI must not skip them.
    if os.environ.get("CI"):
        assert triton_runs_on(torch.device("cpu"))
