"""FastDVPVAE against the reference DVPVAE: same weights, same noise, same numbers."""
import copy

import pytest
import torch

import dvpvae
from dvpvae import FastDVPVAE, Noise
from dvpvae.gpucheck import perturbed_model


# Max ratio of the fast path's float32 error to the reference's own (both w.r.t. float64).
REORDER_FACTOR = 8.0


def perturbed(preset, seed=0):
    """A perturbed reference model (every parameter moved by 0.05 / sqrt(fan_in): zero-initialised
    convs would hide errors in their paths) and 8 images."""
    return perturbed_model(preset, seed)


def grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def run(model, x, draws, training):
    model.train(training)
    model.zero_grad()
    with torch.set_grad_enabled(training):
        out = model(x.to(next(model.parameters()).dtype), Noise(draws))
        if training:
            out.loss.backward()
    return out, grads(model) if training else {}


def compare_forward(ref, fast, x, training, factor):
    """Three-way check: fast and the fp32 reference against an fp64 reference.

    The fast path may reorder float32 sums (compiled kernels); it passes when its error
    w.r.t. fp64 is within ``factor`` times the fp32 reference's own error (plus a floor
    relative to the largest value, for quantities whose true value is ~0). Reordered
    float32 sums (the composed output conv, matmul upsampling, split-gradient convolutions,
    compiled kernels) round differently from the reference: ``REORDER_FACTOR`` bounds that.
    """
    recorded = Noise(generator=torch.Generator().manual_seed(3), record=True)
    ref.train(training)
    with torch.no_grad():
        ref(x, recorded)
    draws = recorded.recorded
    oracle = copy.deepcopy(ref).double()
    o64, g64 = run(oracle, x.double(), {k: v.double() for k, v in draws.items()}, training)
    o32, g32 = run(ref, x, draws, training)
    of, gf = run(fast, x, draws, training)
    pairs = [("loss", o64.loss, o32.loss, of.loss), ("rec", o64.rec, o32.rec, of.rec),
             ("kl", o64.kl, o32.kl, of.kl)]
    pairs += [(k, g64[k], g32[k], gf[k]) for k in g64]
    scale = {"grad": max((float(g.abs().max()) for g in g64.values()), default=0.0)}
    for name, exact, ours32, fast32 in pairs:
        floor = 1e-6 * (scale["grad"] if name in g64 else float(exact.abs().max())) + 1e-7
        err_ref = float((ours32.double() - exact).abs().max())
        err_fast = float((fast32.double() - exact).abs().max())
        assert err_fast <= factor * err_ref + floor, f"{name}: fast {err_fast:.3g} vs fp32 reference {err_ref:.3g}"
    torch.testing.assert_close(of.elbo, -(of.rec + of.kl.sum(-1)))


@pytest.mark.parametrize("preset", ["mnist", "omniglot", "cifar10"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_modules_match_reference_eager(preset, training):
    ref, x = perturbed(preset)
    fast = FastDVPVAE.from_reference(ref, compile=False)
    compare_forward(ref, fast, x[:2], training, factor=REORDER_FACTOR)


@pytest.fixture(scope="module")
def tiny_pair():
    ref, x = perturbed("tiny", seed=1)
    return ref, FastDVPVAE.from_reference(ref), x[:4]


def test_compiled_eval_forward_matches_reference(tiny_pair):
    # The compiled training step is checked on mnist (test_compiled_presets_match_reference):
    # tiny's takes the same kernel paths (16 channels) and would add minutes of compiling.
    ref, fast, x = tiny_pair
    compare_forward(ref, fast, x, False, factor=REORDER_FACTOR)


def test_compiled_estimate_nll_matches_reference(tiny_pair):
    ref, fast, x = tiny_pair
    a = ref.estimate_nll(x, 12, chunk_size=24, noise=Noise(generator=torch.Generator().manual_seed(1)))
    b = fast.estimate_nll(x, 12, chunk_size=24, noise=Noise(generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-3)


def test_compiled_sampling_matches_reference(tiny_pair):
    ref, fast, _ = tiny_pair
    ref.eval(), fast.eval()
    a = ref.sample(3, 0.7, noise=Noise(generator=torch.Generator().manual_seed(4)))
    b = fast.sample(3, 0.7, noise=Noise(generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.fixture
def traced_passes(monkeypatch):
    """(pass name, Dynamo graph) of every graph FastDVPVAE's passes trace while the test runs,
    each compiled by a backend that runs the graph as it is: a new backend per compile_pass
    call, as inductor's options make one."""
    traced = []

    def compile_pass(fn, mode=None):
        def backend(gm, example_inputs):
            traced.append((fn.__name__, gm))
            return gm.forward
        return torch.compile(fn, backend=backend, dynamic=False)

    monkeypatch.setattr(dvpvae.fast, "compile_pass", compile_pass)
    monkeypatch.setattr(dvpvae.fast, "_COMPILED_PASSES", {})
    torch._dynamo.reset()
    yield traced
    torch._dynamo.reset()


def test_each_compiled_pass_traces_as_one_cacheable_graph(traced_passes):
    # A graph break splits a pass into graphs that compile separately and fuse nothing across
    # the break: the prior's loss term and the native UNet calls are traced inline. A graph
    # AOTAutograd refuses to cache (an autocast region, say) is traced afresh by every process.
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    ref, x = perturbed("tiny", seed=1)
    fast = FastDVPVAE.from_reference(ref, share=False)
    fast.train()
    fast(x[:2]).loss.backward()
    fast.eval()
    with torch.no_grad():
        fast(x[:2])
    fast.estimate_nll(x[:2], 2)
    fast.sample(2)
    # The loss pass once per mode (training, evaluation), the others once.
    assert sorted(name for name, _ in traced_passes) == [
        "_decode_sample", "_log_weights", "_loss_terms", "_loss_terms"]
    for _, gm in traced_passes:
        check_cacheable(gm)  # raises BypassAOTAutogradCache naming the node


def test_models_of_one_structure_share_each_compiled_pass(traced_passes):
    # Dynamo's recompile limit is 8 per pass: a compile per model would leave the ninth
    # model's passes uncompiled. Shared, one traced graph serves every model, with its weights.
    for seed in range(10):
        ref, x = perturbed("tiny", seed=seed)
        ref.eval()
        fast = FastDVPVAE.from_reference(ref, share=False)
        draws = ref.forward_draws(2, x, Noise(generator=torch.Generator().manual_seed(seed)), full_bound=True)
        with torch.no_grad():
            want, got = ref(x[:2], Noise(draws)).loss, fast(x[:2], Noise(draws)).loss
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert [name for name, _ in traced_passes] == ["_loss_terms"]


def test_a_pass_stays_compiled_past_eight_batch_sizes(traced_passes):
    # dynamic=False: a graph per batch size; Dynamo's default limit (8) would run the ninth
    # size, and every size after it, uncompiled.
    ref, x = perturbed("tiny", seed=2)
    fast = FastDVPVAE.from_reference(ref, share=False).eval()
    x = x.repeat(2, 1, 1, 1)
    with torch.no_grad():
        for n in range(1, 11):
            fast(x[:n])
    assert len(traced_passes) == 10 < dvpvae.fast.RECOMPILE_LIMIT


def test_state_dict_and_optimizer_are_interchangeable():
    ref, x = perturbed("tiny", seed=2)
    fast = FastDVPVAE("tiny", compile=False)
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    ref.load_state_dict(fast.state_dict())
    shared = FastDVPVAE.from_reference(ref, compile=False)
    opt = torch.optim.Adamax(ref.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    shared.train()
    shared(x[:2]).loss.backward()
    opt.step()  # gradients computed by the fast model update the reference's tensors
    changed = [k for k, v in ref.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.equal(shared.state_dict()[k], ref.state_dict()[k]) for k in before)
    assert shared.num_parameters() == ref.num_parameters()


@pytest.mark.parametrize("preset", ["mnist", pytest.param("omniglot", marks=pytest.mark.slow),
                                    pytest.param("cifar10", marks=pytest.mark.slow)])
def test_compiled_presets_match_reference(preset):
    # The training step's graphs; the eval-mode graphs are checked on tiny
    # (test_compiled_eval_forward_matches_reference), each preset's eval mode eagerly.
    ref, x = perturbed(preset)
    fast = FastDVPVAE.from_reference(ref)
    compare_forward(ref, fast, x[:2], True, factor=REORDER_FACTOR)


@pytest.mark.parametrize("device,cuda_graphs,grad,expected", [
    ("cuda", True, False, "reduce-overhead"),  # evaluation / importance sampling on GPU
    ("cuda", True, True, None),  # training step: plain compiled kernels
    ("cuda", False, False, None),  # flag off
    ("cpu", True, False, None),  # never on CPU
])
def test_cuda_graphs_only_for_no_grad_passes_on_cuda(device, cuda_graphs, grad, expected):
    assert dvpvae.fast.compile_mode(torch.device(device), cuda_graphs, grad) == expected


def test_graph_replay_returns_fresh_copies_of_every_output():
    # On CPU, mode="reduce-overhead" compiles without capturing, which exercises the wrapper.
    def fn(a):
        return a * 2, {"sum": a.sum()}

    run = dvpvae.fast._graph_replay(torch.compile(fn, mode="reduce-overhead", dynamic=False))
    a = torch.arange(6.0)
    first = run(a)
    second = run(a + 1)
    torch.testing.assert_close(first[0], a * 2)
    torch.testing.assert_close(first[1]["sum"], a.sum())
    torch.testing.assert_close(second[0], (a + 1) * 2)
    assert first[0].data_ptr() != second[0].data_ptr()


@pytest.mark.parametrize("training", [True, False])
def test_everything_off_reproduces_reference_bit_for_bit(training):
    ref, x = perturbed("mnist", seed=2)
    plain = FastDVPVAE.from_reference(ref, compile=False, fused_kernels=False, extension=False,
                                      cuda_graphs=False, share=False)
    recorded = Noise(generator=torch.Generator().manual_seed(5), record=True)
    ref.train(training)
    with torch.no_grad():
        ref(x[:3], recorded)
    o_ref, g_ref = run(ref, x[:3], recorded.recorded, training)
    o_plain, g_plain = run(plain, x[:3], recorded.recorded, training)
    for a, b in [(o_ref.loss, o_plain.loss), (o_ref.rec, o_plain.rec), (o_ref.kl, o_plain.kl)]:
        assert torch.equal(a, b)
    assert g_ref.keys() == g_plain.keys()
    assert all(torch.equal(g_ref[k], g_plain[k]) for k in g_ref)


def test_active_units_match_reference_on_a_fresh_fast_model():
    ref, x = perturbed("tiny", seed=3)
    fast = FastDVPVAE.from_reference(ref, compile=False)  # never called before: provider chosen on first use
    want, got = ref.active_units(x), fast.active_units(x)
    assert want.keys() == got.keys()
    assert all(abs(want[k] - got[k]) < 1e-12 for k in want)
