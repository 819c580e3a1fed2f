"""The prior loop that CUDA graphs capture (dvpvae.cuda_graphs.PriorLoop), run eagerly on CPU:
it is the reference loop, reads no host value, and is what the triton provider samples with.
Capture and replay themselves need a GPU (python -m dvpvae.gpucheck checks them there)."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dvpvae import DVPVAE, FastDVPVAE, Noise, cuda_graphs
from dvpvae.cuda_graphs import GraphSampler, PriorLoop, cached_prior_loop, prior_graphs, sample_prior_loop
from dvpvae.kernels import triton_runs_on
from dvpvae.ops import REFERENCE, TritonOps
from test_fast import perturbed

needs_interpreter = pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")),
    reason="needs triton with TRITON_INTERPRET=1 set before it is imported")

# Ops that read a tensor's value on the host: any of them inside the loop would stall a
# captured graph (and cannot be captured at all).
HOST_READS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero", "aten.equal",
              "aten.allclose", "aten.masked_select", "aten.unique", "aten._unique2"}


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def prior_and_noise(preset, n, seed=1):
    model, _ = perturbed(preset, seed=seed)
    prior = model.prior.eval()
    z, eps = prior.sampling_noise(n, Noise(generator=torch.Generator().manual_seed(seed)))
    return prior, z, eps


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_loop_with_reference_ops_is_the_reference_loop_bit_for_bit(temperature):
    # The temperature scales the table's noise column once instead of each step's product:
    # the same float32 product, so not a bit differs.
    prior, z, eps = prior_and_noise("mnist", 3)
    with torch.no_grad():
        want = prior.sample_loop(z, eps, temperature, REFERENCE)
    got = PriorLoop(prior, 3, REFERENCE).run(z, eps, temperature)
    assert torch.equal(got, want)


@needs_interpreter
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loop_with_triton_kernels_matches_reference_loop(temperature):
    prior, z, eps = prior_and_noise("tiny", 4)
    with torch.no_grad():
        want = prior.sample_loop(z, eps, temperature, REFERENCE)
    got = PriorLoop(prior, 4, TritonOps()).run(z, eps, temperature)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ops", [REFERENCE, pytest.param(TritonOps(), marks=needs_interpreter)],
                         ids=["reference", "triton"])
def test_loop_reads_no_host_value(ops):
    prior, z, eps = prior_and_noise("tiny", 2)
    loop = PriorLoop(prior, 2, ops)
    with OpNames() as seen:
        loop.run(z, eps, 0.7)
    assert "aten.convolution" in seen.names  # the mode sees the loop's ops
    assert not seen.names & HOST_READS, seen.names & HOST_READS
    with OpNames() as probe:  # and it would see a host read
        z.sum().item()
    assert probe.names & HOST_READS


@needs_interpreter
def test_triton_provider_samples_through_the_prior_loop(monkeypatch):
    prior, _, _ = prior_and_noise("tiny", 3)
    calls = []
    original = PriorLoop.loop

    def counting(self, *args):
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(PriorLoop, "loop", counting)
    got = prior.sample(3, 0.7, Noise(generator=torch.Generator().manual_seed(2)), TritonOps())
    assert len(calls) == 1
    want = prior.sample(3, 0.7, Noise(generator=torch.Generator().manual_seed(2)), REFERENCE)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_loops_are_cached_per_batch_size_and_stay_eager_off_cuda():
    prior, z, eps = prior_and_noise("tiny", 2)
    a = cached_prior_loop(prior, 2, REFERENCE)
    assert cached_prior_loop(prior, 2, REFERENCE) is a
    assert cached_prior_loop(prior, 3, REFERENCE) is not a
    for n in range(4, 4 + cuda_graphs.MAX_LOOPS_PER_PRIOR):
        cached_prior_loop(prior, n, REFERENCE)
    assert len(cuda_graphs._LOOPS[prior]) == cuda_graphs.MAX_LOOPS_PER_PRIOR
    with prior_graphs(True):
        out = sample_prior_loop(prior, z, eps, 1.0, REFERENCE)
    assert cached_prior_loop(prior, 2, REFERENCE).graph is None  # never captured on CPU
    with torch.no_grad():
        assert torch.equal(out, prior.sample_loop(z, eps, 1.0, REFERENCE))


def test_graph_policy_context_nests_and_restores():
    assert cuda_graphs._PRIOR_GRAPHS.get() is True
    with prior_graphs(False):
        assert cuda_graphs._PRIOR_GRAPHS.get() is False
        with prior_graphs(True):
            assert cuda_graphs._PRIOR_GRAPHS.get() is True
        assert cuda_graphs._PRIOR_GRAPHS.get() is False
    assert cuda_graphs._PRIOR_GRAPHS.get() is True


def test_capture_needs_cuda_and_graph_sampler_too():
    prior, _, _ = prior_and_noise("tiny", 2)
    with pytest.raises(RuntimeError, match="CUDA device"):
        PriorLoop(prior, 2, REFERENCE).capture()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            GraphSampler(lambda: torch.zeros(1))


def test_a_capture_goes_stale_when_the_prior_tensors_move():
    prior, _, _ = prior_and_noise("tiny", 2)
    loop = PriorLoop(prior, 2, REFERENCE)
    assert not loop.stale()  # nothing captured
    loop._captured_signature = loop.signature()  # as capture() records it
    with torch.no_grad():
        prior.unet.input_conv.weight.add_(1.0)  # in place: the graph reads the new values
    assert not loop.stale()
    prior.unet.input_conv.weight = nn.Parameter(prior.unet.input_conv.weight.detach().clone())
    assert loop.stale()
    loop._captured_signature = loop.signature()
    prior.train()
    assert loop.stale()
    prior.eval()
    assert not loop.stale()
    # the cache replaces a loop whose UNet or table is no longer the prior's
    cached = cached_prior_loop(prior, 2, REFERENCE)
    prior.unet = type(prior.unet)(prior.in_ch, prior.unet.channels, len(prior.unet.down), 0.0)
    assert cached_prior_loop(prior, 2, REFERENCE) is not cached


def test_bad_shapes_and_sizes_raise():
    prior, z, eps = prior_and_noise("tiny", 2)
    loop = PriorLoop(prior, 2, REFERENCE)
    with pytest.raises(ValueError, match="expected z_T"):
        loop.run(z[:1], eps[:, :1])
    with pytest.raises(ValueError, match="expected z_T"):
        loop.run(z, eps[1:])
    with pytest.raises(ValueError, match="positive"):
        PriorLoop(prior, 0, REFERENCE)


def test_fast_model_samples_the_reference_numbers_without_graphs_on_cpu():
    ref, _ = perturbed("tiny", seed=7)
    ref.eval()
    for flags in (dict(ops="triton"), dict()) if triton_runs_on(torch.device("cpu")) else (dict(),):
        fast = FastDVPVAE.from_reference(ref, compile=False, **flags)
        a = ref.sample(2, 0.8, noise=Noise(generator=torch.Generator().manual_seed(3)), prior_temperature=0.6)
        b = fast.sample(2, 0.8, noise=Noise(generator=torch.Generator().manual_seed(3)), prior_temperature=0.6)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert fast.sample(2).shape == (2,) + ref.config.image_shape  # noise=None: eager off CUDA
        assert not fast._graph_samplers


def test_reference_model_never_uses_the_loop(monkeypatch):
    monkeypatch.setattr(PriorLoop, "loop", lambda *a: pytest.fail("reference provider ran PriorLoop"))
    ref = DVPVAE("tiny")
    ref.eval()
    ref.sample(2)
