"""A miniature checkout of the authors' research code (AKuzina/dvp_vae), for loader tests.

``write_checkout(root)`` writes a tree with the real checkout's package layout (``model/`` and
``utils/`` as namespace packages, ``datasets/`` with an ``__init__``) and the same module-level
imports (wandb, hydra, omegaconf, torchvision, torchmetrics, matplotlib, tqdm, six, scipy,
PIL, and ``model.context_decoder`` importing ``datasets``, which imports every dataset module).
The classes have the constructor signatures ``benchmarks/throughput.py: build_official``
calls and a small ladder VAE of their own behind ``train_step`` / ``estimate_nll`` /
``generate_x``, with three behaviours of the real code the loader must handle: the decoder
reverses ``latent_scales`` and ``latent_width`` in place, the diffusion sampler's device is
``'cuda'``, and the logistic-mixture sampler calls a ``one_hot`` that is never defined.
"""
from __future__ import annotations

import ast
import os
import sys

FILES = {
    "datasets/__init__.py": """
from .mnists import MNIST
from .omniglot import OMNIGLOT
from .cifar10 import CIFAR10
""",
    "datasets/mnists.py": """
import numpy as np
import torch
from torchvision import transforms
from torchvision import datasets
import hydra
import os
from utils.distributed_training import get_rank
from datasets.dct import DCT_dataset
from six.moves import urllib


class MNIST:
    transform = transforms.ToTensor()
""",
    "datasets/omniglot.py": """
import torch
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file
from PIL import Image
import os
import urllib
from scipy.io import loadmat
from datasets.mnists import MNIST


class OMNIGLOT(MNIST):
    pass
""",
    "datasets/cifar10.py": """
import numpy as np
import torch
from torchvision import transforms
import hydra
from datasets.mnists import MNIST
from datasets.dct import DCT_dataset


class CIFAR10(MNIST):
    pass
""",
    "datasets/dct.py": """
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms


class DCT(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.size)


class DCT_dataset:
    pass
""",
    "utils/distributed_training.py": """
import os
import torch
import omegaconf


def get_rank():
    return 0
""",
    "utils/nn.py": """
import torch.nn as nn


def conv_nd(dims, *args, **kwargs):
    return nn.Conv2d(*args, **kwargs)
""",
    "utils/vae_layers.py": """
import torch.nn as nn
from utils.nn import conv_nd


def conv3x3(c_in, c_out):
    return conv_nd(2, c_in, c_out, 3, padding=1)
""",
    "utils/distribution.py": """
import math
import torch
import torch.nn.functional as F


class Normal:
    def __init__(self, mu, log_var):
        self.mu, self.log_var = mu, log_var

    def log_prob(self, z):
        lp = -0.5 * (math.log(2 * math.pi) + self.log_var + (z - self.mu) ** 2 * torch.exp(-self.log_var))
        return lp.reshape(z.shape[0], -1).sum(1)

    def sample(self, t=1.0):
        return self.mu + t * torch.exp(0.5 * self.log_var) * torch.randn_like(self.mu)


class Bernoulli:
    def __init__(self, logits):
        self.logits = logits

    def log_prob(self, x):
        lp = -F.binary_cross_entropy_with_logits(self.logits, x, reduction="none")
        return lp.reshape(x.shape[0], -1).sum(1)

    def get_E(self):
        return torch.sigmoid(self.logits)


class MixtureLogistic256:
    # Per pixel: mixture weights over the first num_mix channels, then one mean per component.
    def __init__(self, params, num_mix):
        self.logits, self.means = params[:, :num_mix], params[:, num_mix:]

    def log_prob(self, x):
        lp = torch.logsumexp(F.log_softmax(self.logits, 1) - (x - self.means) ** 2, 1)
        return lp.reshape(x.shape[0], -1).sum(1)

    def sample(self):
        gumbel = -torch.log(-torch.log(torch.rand_like(self.logits)))
        sel = one_hot(torch.argmax(self.logits + gumbel, 1), self.logits.shape[1], dim=1)
        return (sel * self.means).sum(1, keepdim=True).clamp(-1, 1)
""",
    "utils/thirdparty/unet.py": """
import torch
import torch.nn as nn
import torch.nn.functional as F
from utils.nn import conv_nd


class UNetModel(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True,
                 dims=2, num_classes=None, use_checkpoint=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False):
        super().__init__()
        self.inp = conv_nd(dims, in_channels + 1, model_channels, 3, padding=1)
        self.out = conv_nd(dims, model_channels, out_channels, 3, padding=1)

    def forward(self, x, t):
        tt = t.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, x.shape[2], x.shape[3])
        return self.out(F.silu(self.inp(torch.cat([x, tt], 1))))
""",
    "model/ddgm.py": """
import math
import torch
import torch.nn as nn
from utils.distribution import Normal


class LinearNoiseSchedule(nn.Module):
    def __init__(self, gamma_min, gamma_max, train=True):
        super().__init__()
        self.gamma_min, self.gamma_max = gamma_min, gamma_max

    def forward(self, t):
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class DiffusionPrior(nn.Module):
    def __init__(self, model, T, noise_schedule, t_sample='uniform', parametrization='x',
                 ll='discretized_gaussian', cont_time=True):
        super().__init__()
        self.model, self.T, self.noise_schedule = model, T, noise_schedule
        self.device = 'cuda'

    def log_prob(self, u):
        t = torch.rand(u.shape[0], device=u.device)
        alpha2 = torch.sigmoid(-self.noise_schedule(t)).reshape(-1, 1, 1, 1)
        eps = torch.randn_like(u)
        u_t = alpha2.sqrt() * u + (1 - alpha2).sqrt() * eps
        err = (self.model(u_t, t) - eps) ** 2
        return -0.5 * self.T * err.reshape(u.shape[0], -1).sum(1)

    def sample(self, N, shape):
        u = torch.randn((N,) + tuple(shape), device=self.device)
        for i in reversed(range(self.T)):
            t = torch.full((N,), (i + 1) / self.T, device=self.device)
            u = u - self.model(u, t) / self.T
        return u
""",
    "model/encoder.py": """
import torch.nn as nn
import torch.nn.functional as F
from utils.vae_layers import conv3x3


class SmallLadderEncoder(nn.Module):
    def __init__(self, num_ch: int, scale_ch_mult: float, block_ch_mult: float, data_ch: int,
                 num_init_blocks: int, data_dim: int, weight_norm: bool, batch_norm: bool,
                 latent_scales: list, latent_width: list, num_blocks_per_scale: int, activation: str,
                 dset: str = 'mnist', start_scale_at_x: bool = False):
        super().__init__()
        self.latent_scales, self.latent_width = latent_scales, latent_width
        self.pool_first = not start_scale_at_x
        self.inp = conv3x3(data_ch, num_ch)
        self.blocks = nn.ModuleList(conv3x3(num_ch, num_ch) for _ in latent_scales)

    def forward(self, x) -> list:
        d = self.inp(x)
        s_enc = []
        for i, block in enumerate(self.blocks):
            d = F.silu(block(d))
            if i > 0 or self.pool_first:
                d = F.avg_pool2d(d, 2)
            s_enc += [d] * self.latent_scales[i]
        return s_enc
""",
    "model/decoder.py": """
import torch
import torch.nn as nn
import torch.nn.functional as F
from utils.vae_layers import conv3x3
from utils.distribution import Normal
from model.ddgm import DiffusionPrior


class LadderDecoder(nn.Module):
    def __init__(self, num_ch: int, scale_ch_mult: float, block_ch_mult: float, data_ch: int,
                 num_postprocess_blocks: int, likelihood: str, num_mix: int, data_dim: int,
                 weight_norm: bool, batch_norm: bool, padding_mode: str, latent_scales: list,
                 latent_width: list, num_blocks_per_scale: int, activation: str, z_L_prior: dict,
                 start_scale_at_x: bool = False, min_logvar: float = -8, decoder_res_mode: str = '2x3',
                 num_condition_channels: int = 0):
        super().__init__()
        self.latent_scales, self.latent_width = latent_scales, latent_width
        # from the top (smallest) scale to the bottom, in place
        self.latent_scales.reverse()
        self.latent_width.reverse()
        self.num_latents = sum(latent_scales)
        self.data_dim = data_dim
        self.top = data_dim // 2 ** (len(latent_scales) - (1 if start_scale_at_x else 0))
        self.q = nn.ModuleList(conv3x3(2 * num_ch, 2 * w) for w, s in zip(latent_width, latent_scales)
                               for _ in range(s))
        self.p = nn.ModuleList(conv3x3(num_ch, 2 * w) for w, s in zip(latent_width, latent_scales)
                               for _ in range(s))
        self.z = nn.ModuleList(conv3x3(w, num_ch) for w, s in zip(latent_width, latent_scales)
                               for _ in range(s))
        n_out = data_ch if likelihood == 'bernoulli' else 2 * num_mix
        self.out = conv3x3(num_ch, n_out)

    def ladder(self, h, enc_s, mode, t):
        p_dist, q_dist, z_samples = [], [], []
        k = 0
        for j, n in enumerate(self.latent_scales):
            if j > 0:
                h = F.interpolate(h, scale_factor=2.0)
            for _ in range(n):
                mu, lv = self.p[k](h).chunk(2, 1)
                p = Normal(mu, lv)
                if mode == 'sample':
                    z, q = p.sample(1.0 if t is None else t), None
                else:
                    e = enc_s.pop()
                    q = Normal(*self.q[k](torch.cat([h, e], 1)).chunk(2, 1))
                    z = q.sample()
                h = h + self.z[k](z)
                p_dist.append(p), q_dist.append(q), z_samples.append(z)
                k += 1
        h = F.interpolate(h, size=(self.data_dim, self.data_dim))
        return self.out(F.silu(h)), p_dist, q_dist, z_samples
""",
    "model/context_decoder.py": """
import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets.dct import DCT
from utils.distribution import Normal
from model.ddgm import DiffusionPrior
from model.decoder import LadderDecoder


class ContextBlock(nn.Module):
    def __init__(self, data_ch, ctx_size, num_ch, prior):
        super().__init__()
        self.dct = DCT(ctx_size)
        self.register_buffer('dct_scale', torch.ones(1, data_ch, ctx_size, ctx_size))
        self.prior = prior
        self.to_h = nn.Conv2d(data_ch, num_ch, 1)

    def x_to_ctx(self, x, preprocess=False):
        return self.dct(x) / self.dct_scale

    def ctx_to_x(self, u):
        return u * self.dct_scale


class ContextLadderDecoder(LadderDecoder):
    def __init__(self, num_ch: int, scale_ch_mult: float, block_ch_mult: float, data_ch: int,
                 num_postprocess_blocks: int, likelihood: str, num_mix: int, data_dim: int,
                 weight_norm: bool, batch_norm: bool, padding_mode: str, latent_scales: list,
                 latent_width: list, num_blocks_per_scale: int, activation: str, z_L_prior: dict,
                 ctx_type: str, ctx_size: int, start_scale_at_x: bool = False, min_logvar: float = -8,
                 decoder_res_mode: str = '2x3'):
        super().__init__(num_ch, scale_ch_mult, block_ch_mult, data_ch, num_postprocess_blocks,
                         likelihood, num_mix, data_dim, weight_norm, batch_norm, padding_mode,
                         latent_scales, latent_width, num_blocks_per_scale, activation, z_L_prior,
                         start_scale_at_x, min_logvar, decoder_res_mode)
        self.decoder_blocks = nn.ModuleList([ContextBlock(data_ch, ctx_size, num_ch, z_L_prior)])
        self.ctx_shape = (data_ch, ctx_size, ctx_size)

    def forward(self, enc_s, mode='train', N=None, t=None):
        block = self.decoder_blocks[0]
        if mode == 'sample':
            u = block.prior.sample(N, self.ctx_shape)
            p_u = None
        else:
            u = enc_s.pop()
            p_u = block.prior.log_prob(u)
        h = block.to_h(F.interpolate(u, size=(self.top, self.top)))
        out, p_dist, q_dist, z_samples = self.ladder(h, list(enc_s), mode, t)
        return (out,), [p_u] + p_dist, [None] + q_dist, [u] + z_samples
""",
    "model/vae.py": """
import math
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
import torchvision
import wandb
import os
from tqdm import tqdm
import matplotlib.pyplot as plt
from utils.distribution import Normal, Bernoulli, MixtureLogistic256
from model.ddgm import DiffusionPrior


class LADDER_VAE(nn.Module):
    def __init__(self, encoder, decoder, likelihood, beta_start, beta_end, warmup, is_k, latent_scales,
                 **kwargs):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.beta_end, self.is_k, self.latent_scales = beta_end, is_k, latent_scales
        self.num_mix = decoder.out.out_channels // 2
        self.likelihood = Bernoulli if likelihood == 'bernoulli' else (
            lambda p: MixtureLogistic256(p, self.num_mix))
        self.current_epoch = None

    def forward(self, batch, mode='train'):
        p_xz_params, p_dist, q_dist, z_samples = self.decoder(self.encode(batch), mode=mode)
        p_xz = self.likelihood(*p_xz_params)
        return self.get_x_from_px(p_xz), p_xz, z_samples, q_dist, p_dist

    def get_x_from_px(self, p_xz):
        return p_xz.get_E() * 2 - 1 if isinstance(p_xz, Bernoulli) else p_xz.sample()

    def eval_log_p_x(self, p_xz, x):
        if isinstance(p_xz, Bernoulli):
            x = torch.bernoulli(0.5 * (x + 1))
        return p_xz.log_prob(x)

    def kl(self, fwd_output):
        _, _, z_sample, q_dist, p_dist = fwd_output
        kls = [-p_dist[0]] + [q.log_prob(z) - p.log_prob(z)
                              for z, q, p in zip(z_sample[1:], q_dist[1:], p_dist[1:])]
        return torch.stack(kls, 1), {}

    def get_beta(self):
        return self.beta_end

    def train_step(self, batch, mode='train'):
        fwd = self.forward(batch, mode=mode)
        re = -self.eval_log_p_x(fwd[1], batch[0]).mean(0)
        kl = self.kl(fwd)[0].sum(1).mean()
        beta = self.get_beta() if mode == 'train' else 1
        loss = (re + beta * kl) / np.log(2.) / np.prod(batch[0].shape[1:])
        return loss, {'loss': loss.data}

    def estimate_nll(self, batch, K=100):
        elbo = torch.stack([-self.eval_log_p_x(f[1], batch[0]) - self.kl(f)[0].sum(1)
                            for f in (self.forward(batch, mode='test') for _ in range(K))])
        return -(torch.logsumexp(-elbo, 0) - np.log(K)), {}

    def generate_x(self, N=25, t=None):
        p_xz_params, _, _, _ = self.decoder([None] * (sum(self.latent_scales) + 1), mode='sample', N=N, t=t)
        return self.get_x_from_px(self.likelihood(*p_xz_params))
""",
    "model/context_ladder_vae.py": """
import math
import matplotlib.pyplot as plt
import numpy as np
import torch
import torchvision
import wandb
import os
import torch.nn as nn
from model.vae import LADDER_VAE


class CTX_LADDER_VAE(LADDER_VAE):
    def encode(self, batch):
        x = batch[0]
        return self.encoder(x) + [self.decoder.decoder_blocks[0].x_to_ctx(x, preprocess=False)]
""",
}

# The checkout's own top-level packages.
PACKAGES = ("model", "utils", "datasets")


def write_checkout(root) -> str:
    """Write the miniature checkout under ``root``; returns its path."""
    root = str(root)
    for rel, text in FILES.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text.lstrip("\n"))
    return root


def third_party_imports() -> set[str]:
    """Top-level names the miniature imports at module level besides the standard library,
    torch, numpy and its own packages: the ones a user's environment may lack."""
    names = set()
    for text in FILES.values():
        for node in ast.parse(text).body:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"torch", "numpy", *PACKAGES}
