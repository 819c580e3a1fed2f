"""FastDVPVAE: the reference model's parameters and numbers, computed faster.

Same constructor, presets, parameter names and noise interface as ``DVPVAE`` (it is a
subclass; ``load_state_dict`` works both ways). What changes is how the numbers are
computed:

* fused ops (``kernels/``): DCT pseudoinputs, the 1x1 convolutions of every ResBlock with
  bias + activation and the residual combine in the epilogue, reparameterization + KL,
  the DDPM step. On CUDA these are the Triton kernels; on CPU their PyTorch references,
  which torch.compile then fuses.
* torch.compile of the training/evaluation forward, the importance-sampling pass and the
  sample decoder (inductor's C++ backend on CPU). All noise is drawn eagerly in the
  reference order and passed in, so the compiled graphs hold no RNG and replay exactly.
* on the CPU, the ResNet blocks' convolutions run channels-last with oneDNN's forward and
  input gradient; their weight and bias gradients come from the C++ extension's AVX2
  kernel where it is faster than oneDNN (``dvpvae.cpu_conv``).
* ``estimate_nll`` runs the deterministic encoder once per image, not once per sample.
* sampling of u through the C++ extension's T-step loop (``dvpvae.sampling``); on CUDA the
  whole sampler is captured in a CUDA graph per batch size (``dvpvae.cuda_graphs``), and the
  no-grad compiled passes (evaluation, importance sampling, decoding) run as CUDA graphs
  (``compile_mode``).

Each piece can be switched off for debugging: ``FastDVPVAE(..., compile=False,
fused_kernels=False, extension=False, cuda_graphs=False)``; with all four off the model
computes exactly what DVPVAE computes, bit for bit (tested).
"""
from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

import torch

from dvpvae.blocks import ResBlock
from dvpvae.cpu_conv import channels_last, conv_cl
from dvpvae.config import Config
from dvpvae.decoder import LadderBlock, PseudoinputBlock, TopDownDecoder
from dvpvae.decoder import upsample_bilinear as decoder_upsample
from dvpvae.fast_layers import composed_head, pointwise_conv, upsample_bilinear
from dvpvae.dct import safe_scale
from dvpvae.diffusion import DiffusionPrior
from dvpvae.encoder import Encoder
from dvpvae.model import DVPVAE, DVPVAEOutput
from dvpvae.noise import Noise
from kernels.conv1x1_act import apply_activation

# Dynamo traces through the lru_cache of the DCT basis builder; the basis is a pure
# function of (size, rows, dtype, device), so tracing the builder gives the same constant.
warnings.filterwarnings("ignore", message=r".*functools.lru_cache.*", module=r"torch\._dynamo.*")


def _op_table(device: torch.device, fused: bool, extension: bool) -> SimpleNamespace:
    """The functions the fast modules call: Triton kernels on CUDA, split-gradient
    channels-last convolutions (``dvpvae.cpu_conv``; weight gradients from the C++
    extension when ``extension`` and faster) and references on the CPU, and the exact layer
    rewrites of ``dvpvae.fast_layers``. With ``fused=False`` every entry is the reference's
    own computation, so the uncompiled model reproduces DVPVAE bit for bit.

    References are bound directly (not through ``kernels``' dispatch) so that compiled CPU
    graphs trace plain tensor code with no Python-side backend lookups.
    """
    from kernels import available_backends
    from kernels.conv1x1_act import conv1x1_act, conv1x1_act_ref
    from kernels.conv1x1_residual import conv1x1_residual, conv1x1_residual_ref
    from kernels.dct_pseudoinput import (dct_pseudoinput, dct_pseudoinput_ref, idct_pseudoinput,
                                         idct_pseudoinput_ref)
    from kernels.reparam_kl import reparam_kl, reparam_kl_ref, reparam_sample, reparam_sample_ref

    layers = (dict(upsample=upsample_bilinear, project=pointwise_conv, head=composed_head) if fused else
              dict(upsample=decoder_upsample, project=_apply_conv, head=_reference_head))
    layers.update(conv3x3=_apply_conv, stem=_apply_conv, channels_last=_identity)
    if fused and device.type == "cuda" and "triton" in available_backends(device):
        return SimpleNamespace(conv1x1_act=conv1x1_act, conv1x1_residual=conv1x1_residual,
                               conv1x1=functools.partial(conv1x1_act, activation="none"),
                               dct=dct_pseudoinput, idct=idct_pseudoinput,
                               reparam_kl=reparam_kl, reparam_sample=reparam_sample, **layers)
    ops = SimpleNamespace(conv1x1_act=conv1x1_act_ref, conv1x1_residual=conv1x1_residual_ref,
                          conv1x1=torch.nn.functional.conv2d,
                          dct=dct_pseudoinput_ref, idct=idct_pseudoinput_ref,
                          reparam_kl=reparam_kl_ref, reparam_sample=reparam_sample_ref, **layers)
    if fused and device.type == "cpu":
        conv = functools.partial(conv_cl, weight_grad_backend="auto" if extension else "onednn")
        ops.conv1x1 = conv
        ops.conv1x1_act = functools.partial(_conv1x1_act_cpu, conv=conv)
        ops.conv1x1_residual = functools.partial(_conv1x1_residual_cpu, conv=conv)
        ops.conv3x3 = functools.partial(_conv3x3_cpu, conv=conv)
        # Every activation channels-last: a kernel that mixes NCHW and channels-last
        # operands is not vectorized by inductor (67 ms for one encoder gradient kernel).
        ops.channels_last = channels_last
        ops.stem = _channels_last_stem
    return ops


def _apply_conv(x, conv):
    return conv(x)


def _identity(x):
    return x


def _channels_last_stem(x, conv):
    return channels_last(pointwise_conv(x, conv))


def _conv3x3_cpu(x, layer, conv):
    return conv(x, layer.weight, layer.bias)


def _reference_head(a, pointwise, conv3x3):
    return conv3x3(pointwise(a))


def _conv1x1_act_cpu(x, weight, bias, activation, conv):
    return apply_activation(conv(x, weight, bias), activation)


def _conv1x1_residual_cpu(h, weight, bias, skip, gate, conv):
    return skip + gate.reshape(()).to(h.dtype) * conv(h, weight, bias)


class FastResBlock(ResBlock):
    """ResBlock whose 1x1 convs run with fused epilogues and whose 3x3 convs use the fast
    path's split-gradient convolution.

    Both block kinds reduce to a1 = act(conv_in(x')), a2 = act(conv_mid1(a1)),
    a3 = act(conv_mid2(a2)), out = skip(x) + gate * conv_out(a3), with x' = act(x) for the
    pre-activation (encoder) block and x' = x for the decoder block.
    """

    ops: SimpleNamespace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops, act = self.ops, self.act
        first = act(x) if self.pre_activation else x
        h = ops.conv1x1_act(first, self.conv_in.weight, self.conv_in.bias, self.activation)
        h = act(ops.conv3x3(h, self.conv_mid1))
        h = act(ops.conv3x3(h, self.conv_mid2))
        skip = x if isinstance(self.skip, torch.nn.Identity) else ops.conv1x1(x, self.skip.weight, self.skip.bias)
        return ops.conv1x1_residual(h, self.conv_out.weight, self.conv_out.bias, skip, self.gate)


class FastEncoder(Encoder):
    """Encoder whose activations stay channels-last from the input convolution on."""

    ops: SimpleNamespace

    def stem(self, x):
        return self.ops.stem(x, self.input_conv)

    def run_scale(self, scale, d):
        return self.ops.channels_last(scale(d))


class FastPseudoinputBlock(PseudoinputBlock):
    """DCT pseudoinput transforms as single fused ops."""

    ops: SimpleNamespace

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.dct(x, safe_scale(self.dct_scale), self.ctx_size)

    def to_image(self, u: torch.Tensor) -> torch.Tensor:
        return self.ops.idct(u, safe_scale(self.dct_scale), self.image_size)


class FastLadderBlock(LadderBlock):
    """Clamps, reparameterization and the per-example KL in one fused op; cheaper z
    projection and upsampling (``dvpvae.fast_layers``)."""

    ops: SimpleNamespace

    def upsample(self, s, size):
        return self.ops.upsample(s, size)

    def project(self, z):
        return self.ops.project(z, self.z_proj)

    def reparam_kl(self, q_mu, q_lv, p_mu, p_lv, eps):
        return self.ops.reparam_kl(q_mu, q_lv, p_mu, p_lv, eps, self.min_logvar)

    def reparam_sample(self, p_mu, p_lv, eps, temperature):
        return self.ops.reparam_sample(p_mu, p_lv, eps, self.min_logvar, temperature)


class FastTopDownDecoder(TopDownDecoder):
    """Latent aggregation with matmul upsampling and a single composed output convolution."""

    ops: SimpleNamespace

    def upsample(self, z, size):
        return self.ops.upsample(z, size)

    def head(self, a):
        return self.ops.head(a, self.z_to_features, self.out_conv)


class FastDiffusionPrior(DiffusionPrior):
    """The UNet loss term compiled as its own graph.

    Compiled inside the same graph as the ladder, inductor (torch 2.13, CPU) drops the
    gradient of an unrelated path (the top block's ResNet got exactly zero gradient; the
    eager, aot_eager and separately compiled versions all agree with float64). A graph
    break around this term avoids the miscompile at no measurable cost.
    """

    use_compile: bool = True

    @torch.compiler.disable
    def _weighted_mse(self, u, t, eps, keep=None):
        fn = DiffusionPrior._weighted_mse
        if self.use_compile:
            fn = _compiled_unet_loss()
        return fn(self, u, t, eps, keep)


@functools.lru_cache(maxsize=1)
def _compiled_unet_loss():
    return torch.compile(DiffusionPrior._weighted_mse, dynamic=False)


def compile_mode(device: torch.device, cuda_graphs: bool, grad_enabled: bool) -> str | None:
    """torch.compile mode of a fast path: CUDA graphs ("reduce-overhead") for the no-grad
    passes (evaluation, importance sampling, decoding) on CUDA, the default elsewhere.

    Training stays on plain compiled kernels: its graphs would pin every saved activation
    in the CUDA-graph memory pool, and a training step is long enough that launches do not
    dominate.
    """
    return "reduce-overhead" if cuda_graphs and device.type == "cuda" and not grad_enabled else None


def _graph_replay(compiled):
    """Call a CUDA-graph-compiled function as a new step each time and return copies:
    a later replay overwrites the graph's output buffers, which callers may still hold."""
    @functools.wraps(compiled)
    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, compiled(*args))
    return run


_FAST_CLASSES = {ResBlock: FastResBlock, Encoder: FastEncoder, PseudoinputBlock: FastPseudoinputBlock,
                 LadderBlock: FastLadderBlock, TopDownDecoder: FastTopDownDecoder,
                 DiffusionPrior: FastDiffusionPrior}


class FastDVPVAE(DVPVAE):
    """Drop-in ``DVPVAE`` with fused kernels, torch.compile and compiled sampling loops."""

    def __init__(self, config: Config | str = "mnist", *, compile: bool = True, fused_kernels: bool = True,
                 extension: bool = True, cuda_graphs: bool = True, **overrides):
        super().__init__(config, **overrides)
        self.use_compile, self.use_fused = compile, fused_kernels
        self.use_extension, self.use_cuda_graphs = extension, cuda_graphs
        for module in self.modules():
            if type(module) in _FAST_CLASSES:
                module.__class__ = _FAST_CLASSES[type(module)]
        self.prior.use_compile = compile
        self._ops_device: torch.device | None = None
        self._compiled: dict[tuple[str, str | None], object] = {}
        self._graph_samplers: dict = {}

    @classmethod
    def from_reference(cls, model: DVPVAE, share: bool = True, **flags) -> "FastDVPVAE":
        """A FastDVPVAE on ``model``'s weights: shared tensors (``share``) or a copy."""
        fast = cls(model.config, **flags)
        fast.to(next(model.parameters()).device)
        if not share:
            fast.load_state_dict(model.state_dict())
            return fast
        for (_, mine), (_, theirs) in zip(fast.named_modules(), model.named_modules()):
            mine._parameters = theirs._parameters
            mine._buffers = theirs._buffers
        fast.validate_inputs = model.validate_inputs
        return fast

    # ------------------------------------------------------------------ plumbing
    def _bind_ops(self, device: torch.device) -> None:
        if self._ops_device == device:
            return
        ops = _op_table(device, self.use_fused, self.use_extension)
        for module in self.modules():
            if isinstance(module, tuple(_FAST_CLASSES.values())):
                module.ops = ops
        self._ops_device = device

    def _maybe_compiled(self, name: str, fn, device: torch.device):
        if not self.use_compile:
            return fn
        mode = compile_mode(device, self.use_cuda_graphs, torch.is_grad_enabled())
        if (name, mode) not in self._compiled:
            # dynamic=False: a new batch size recompiles once instead of generating slower
            # shape-generic code for every size.
            compiled = torch.compile(fn, dynamic=False, mode=mode)
            self._compiled[name, mode] = compiled if mode is None else _graph_replay(compiled)
        return self._compiled[name, mode]

    # ------------------------------------------------------------------ forward
    def _loss_terms(self, x: torch.Tensor, draws: dict):
        out = DVPVAE._forward_given_draws(self, x, draws)
        return out.loss, out.rec, out.kl

    def _forward_given_draws(self, x: torch.Tensor, draws: dict) -> DVPVAEOutput:
        self._bind_ops(x.device)
        loss, rec, kl = self._maybe_compiled("loss", self._loss_terms, x.device)(x, draws)
        return DVPVAEOutput(loss, rec, kl, -(rec + kl.sum(-1)))

    # ------------------------------------------------------------------ importance sampling
    def _log_weights_batched(self, x, feats, target, draws, kk: int):
        """log weights of kk samples per image, reusing the encoder features of x."""
        def rep(t):  # sample-major rows, as in the reference
            return t.repeat(kk, 1, 1, 1)

        params, layers, _ = self.decoder(rep(x), [rep(f) for f in feats], Noise(draws), full_bound=True)
        return self._log_weights_from(params, layers, rep(target))

    def _log_weights(self, x: torch.Tensor, target: torch.Tensor, kk: int, draws: dict) -> torch.Tensor:
        self._bind_ops(x.device)
        # The encoder is deterministic: one pass per image serves all kk samples.
        feats = self.encoder(x)
        fn = self._maybe_compiled("log_weights", self._log_weights_batched, x.device)
        return fn(x, feats, target, draws, kk)

    @torch.no_grad()
    def active_units(self, x: torch.Tensor, thresholds=(0.01, 0.001), batch_size: int = 500) -> dict[float, float]:
        self._bind_ops(x.device)
        return super().active_units(x, thresholds, batch_size)

    # ------------------------------------------------------------------ sampling
    def sample_pseudoinputs(self, n: int, temperature: float, noise: Noise) -> torch.Tensor:
        from dvpvae import _ext
        from dvpvae.sampling import compile_prior, sample_prior

        prior = self.prior
        if not self.use_extension:
            return sample_prior(prior, n, temperature, noise, backend="reference")
        # compile_prior compiles (once per machine and architecture, cached on disk) only
        # where the native forward does not serve the prior; with the native forward the
        # automatic choice already picks the extension.
        backend = None
        if (prior.coefficients.device.type == "cpu" and not prior.training and _ext.available()
                and compile_prior(prior) is not None):
            backend = "extension"
        return sample_prior(prior, n, temperature, noise, backend=backend)

    def _decode_sample(self, u: torch.Tensor, draws: dict, temperature: float) -> torch.Tensor:
        self._bind_ops(u.device)
        return self._maybe_compiled("decode", super()._decode_sample, u.device)(u, draws, temperature)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, noise=None, prior_temperature: float = 1.0):
        if n <= 0:
            raise ValueError(f"number of samples must be positive, got {n}")
        device = self.prior.coefficients.device
        if self.use_cuda_graphs and device.type == "cuda" and noise is None:
            from dvpvae.cuda_graphs import GraphSampler

            key = (n, float(temperature), float(prior_temperature))
            if key not in self._graph_samplers:
                self._graph_samplers[key] = GraphSampler(self, n, temperature, prior_temperature)
            return self._graph_samplers[key].run()
        return super().sample(n, temperature, noise, prior_temperature)
