"""Sampling the diffusion prior with S ancestral steps on the grid t_i = i/S (MODEL.md
section 5): S = T is the sampler the prior always had, bit for bit; S < T follows the same
step formula on the coarser grid with every provider."""
import copy

import pytest
import torch

import dvpvae.ops
from dvpvae import DVPVAE, FastDVPVAE, Noise, _ext
from dvpvae.cuda_graphs import PriorLoop, cached_prior_loop
from dvpvae.gpucheck import perturbed_model
from dvpvae.kernels import triton_runs_on
from dvpvae.kernels.ddpm_step import ddpm_step_ref
from dvpvae.ops import REFERENCE, CpuOps, TritonOps

T = 10  # the tiny preset with 10 steps, so that T/2 and T/5 are whole numbers
SAMPLE_ATOL = 5e-5  # native against the Python loop (tests/test_ext_sampling.py says why)

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension not built: {_ext.missing_reason()}")
needs_interpreter = pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")),
    reason="needs triton with TRITON_INTERPRET=1 set before it is imported")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """The tiny preset with T = 10 and perturbed weights (eps_hat != 0), in eval mode."""
    ref, _ = perturbed_model("tiny", seed=5)
    m = DVPVAE("tiny", diffusion_steps=T)
    m.load_state_dict(ref.state_dict())
    return m.eval()


def seeded(seed):
    return Noise(generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def todays_loop(prior, z, eps, temperature):
    """The T-step sampler as it was before the number of steps became a choice: row i of the
    prior's own table at t = (i+1)/T, through the reference step."""
    for k, i in enumerate(range(prior.T - 1, -1, -1)):
        t = torch.full((z.shape[0],), (i + 1) / prior.T)
        z = ddpm_step_ref(z, prior.unet(z, t), eps[k], prior.coefficients, i, temperature)
    return z


@torch.no_grad()
def formula_loop(prior, z, eps, temperature, S):
    """MODEL.md section 5 on the grid t_i = i/S, written out in float64 from gamma."""
    z, eps = z.double(), eps.double()
    unet = copy.deepcopy(prior.unet).double()
    for k, i in enumerate(range(S, 0, -1)):
        g_t, g_s = (torch.tensor(prior.gamma_min + (prior.gamma_max - prior.gamma_min) * j / S,
                                 dtype=torch.float64) for j in (i, i - 1))
        a_t, s2_t = torch.sigmoid(-g_t).sqrt(), torch.sigmoid(g_t)
        a_s, s2_s = torch.sigmoid(-g_s).sqrt(), torch.sigmoid(g_s)
        eps_hat = unet(z, torch.full((z.shape[0],), i / S, dtype=torch.float64))
        x_hat = ((z - s2_t.sqrt() * eps_hat) / a_t).clamp(-1, 1)
        a_ts = a_t / a_s
        s2_ts = s2_t - a_ts ** 2 * s2_s
        mean = a_ts * s2_s / s2_t * z + a_s * s2_ts / s2_t * x_hat
        z = mean + temperature * (s2_ts * s2_s / s2_t).sqrt() * eps[k]
    return z


def test_default_is_todays_sampler_bit_for_bit(model):
    prior = model.prior
    z, eps = prior.sampling_noise(4, seeded(1))
    assert eps.shape == (T, 4) + prior.shape
    want = todays_loop(prior, z, eps, 0.8)
    draws = {"prior_zT": z, "prior_eps": eps}
    assert torch.equal(prior.sample(4, 0.8, Noise(draws)), want)
    assert torch.equal(prior.sample(4, 0.8, Noise(draws), steps=T), want)
    assert prior.step_table(T) is prior.coefficients
    # the model's sampler too: prior_steps=T is the default
    a = model.sample(3, 0.7, noise=seeded(2), prior_temperature=0.9)
    b = model.sample(3, 0.7, noise=seeded(2), prior_temperature=0.9, prior_steps=T)
    assert torch.equal(a, b)


@pytest.mark.parametrize("S", [T, T // 2, T // 5, 1, 2 * T])
def test_steps_follow_the_formula_on_their_grid(model, S):
    prior = model.prior
    z, eps = prior.sampling_noise(5, seeded(S), steps=S)
    assert eps.shape == (S, 5) + prior.shape
    got = prior.sample(5, 0.9, Noise({"prior_zT": z, "prior_eps": eps}), steps=S)
    want = formula_loop(prior, z, eps, 0.9, S)
    assert want.abs().max() > 0.1  # a real sample
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("S", [T // 2, T // 5])
def test_fewer_steps_give_finite_u_in_the_dct_range(model, S):
    prior = model.prior
    u = model.sample_pseudoinputs(64, 1.0, seeded(3), S)
    assert u.shape == (64,) + prior.shape and bool(torch.isfinite(u).all())
    # x_hat is clamped to [-1, 1]; the last step (s = 0) adds noise of std c_noise of row 0.
    table = prior.step_table(S)
    assert float(u.abs().max()) <= 1.0 + 6 * float(table[0, 4]) + 1e-3
    assert float(u.std()) > 0.05  # not collapsed


@pytest.mark.parametrize("S", [T, T // 2, T // 5])
@pytest.mark.parametrize("provider", [pytest.param("cpu", marks=needs_ext),
                                      pytest.param("triton", marks=needs_interpreter)])
def test_providers_sample_the_same_steps(model, provider, S, monkeypatch):
    prior = model.prior
    calls = []
    if provider == "cpu":
        ops, tol = CpuOps(), SAMPLE_ATOL
        native = dvpvae.ops.sample_native
        monkeypatch.setattr(dvpvae.ops, "sample_native", lambda *a: calls.append(a[2].shape[0]) or native(*a))
    else:
        ops, tol = TritonOps(), 1e-6
        loop = PriorLoop.loop
        monkeypatch.setattr(PriorLoop, "loop", lambda self, *a: calls.append(self.S) or loop(self, *a))
    want = prior.sample(3, 0.8, seeded(4), REFERENCE, steps=S)
    got = prior.sample(3, 0.8, seeded(4), ops, steps=S)
    assert calls == [S]  # the provider's own sampler ran, with S steps
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_fast_model_samples_the_reference_numbers_with_fewer_steps(model):
    fast = FastDVPVAE.from_reference(model, compile=False)
    a = model.sample(3, 0.8, noise=seeded(6), prior_steps=T // 5)
    b = fast.sample(3, 0.8, noise=seeded(6), prior_steps=T // 5)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not torch.equal(a, model.sample(3, 0.8, noise=seeded(6)))


def test_loops_are_kept_per_number_of_steps(model):
    prior = model.prior
    a = cached_prior_loop(prior, 2, REFERENCE, T // 2)
    assert cached_prior_loop(prior, 2, REFERENCE, T // 2) is a
    assert cached_prior_loop(prior, 2, REFERENCE) is not a
    assert a.S == T // 2 and a.coefficients is prior.step_table(T // 2)
    z, eps = prior.sampling_noise(2, seeded(7), steps=T // 2)
    with torch.no_grad():
        assert torch.equal(a.run(z, eps, 0.7), prior.sample_loop(z, eps, 0.7, REFERENCE))
    with pytest.raises(ValueError, match="5 steps: expected"):
        a.run(z, eps[1:])


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "5", None])
def test_bad_numbers_of_steps_raise(model, bad):
    fast = FastDVPVAE.from_reference(model, compile=False)
    with pytest.raises(ValueError, match="number of prior sampling steps must be a positive integer"):
        model.prior.step_table(bad)
    if bad is None:  # None means the default everywhere else
        return
    for call in (lambda: model.sample(2, prior_steps=bad), lambda: fast.sample(2, prior_steps=bad),
                 lambda: model.prior.sample(2, steps=bad), lambda: model.prior.sampling_noise(2, steps=bad)):
        with pytest.raises(ValueError, match="number of prior sampling steps must be a positive integer"):
            call()


def test_supplied_step_noise_must_have_s_rows(model):
    _, eps = model.prior.sampling_noise(2, seeded(8))
    with pytest.raises(ValueError, match="noise draw 'prior_eps' has shape"):
        model.sample(2, noise={"prior_eps": eps}, prior_steps=T // 2)
