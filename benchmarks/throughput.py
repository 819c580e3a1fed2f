"""Throughput of DVP-VAE: training step, evaluation pass, importance-sampled NLL, sampling.

    python benchmarks/throughput.py       # the defaults below
    python benchmarks/throughput.py --batch 250 --nll-batch 16 --k 100 --sample-n 100 --repeats 5 \
        --threads 2                       # the paper's MNIST training batch, K = 100

Defaults: preset mnist, train/eval batch 64, nll on 8 images with k = 10, sampling of 64
images, 2 warm-up calls and 5 timed repeats per (provider, task).

Providers (``--providers``), all in one process and one run:
  DVPVAE      the reference model (plain PyTorch, eager)
  FastDVPVAE  the drop-in fast model, ``FastDVPVAE.from_reference(DVPVAE, **flags)``: the
              reference's modules, so exactly its weights; ``--fast-flag NAME=on|off`` sets
              its constructor flags (compile, fused_kernels, extension, cuda_graphs), and
              ``--precision float32,bf16`` times one FastDVPVAE per precision, named
              ``FastDVPVAE`` (float32) and ``FastDVPVAE-bf16``
  official    the authors' research code (AKuzina/dvp_vae), only with ``--official PATH``:
              its modules are imported from that checkout (never copied here) with stubs for
              packages it imports but does not need for these four calls (wandb, hydra, ...)

Tasks (``--tasks``):
  train   forward + backward + Adamax step (lr, weight_decay, eps of the preset) + the q_logvar
          projection; every provider trains its own copy of the same initial weights
  eval    ``model.eval()`` forward under no_grad (the T-point diffusion bound)
  nll     ``estimate_nll(x, k)`` on ``--nll-batch`` images with ``--k`` importance samples each
  sample  ``model.sample(n)`` with ``n = --sample-n``

Method. Data are random uint8 images (fixed seed) mapped to [-1, 1]; ``dct_scale`` is computed
from them. Per task, every provider first runs ``--warmup`` untimed calls: the first one
includes torch.compile for FastDVPVAE, so the table reports it (``first s``) and the whole
warm-up (``warm-up s``) separately from the steady state. Then one call per provider runs
under the memory probe (see ``_harness.PeakMemory``: on CPU the peak RSS increase over the
RSS just before the call, sampled every millisecond after returning freed heap to the OS;
on CUDA ``max_memory_allocated`` above the allocation before the call). Then ``--repeats``
timings, the providers interleaved within each repeat (and the order rotated between
repeats) so that load from other processes on a shared machine hits every provider alike.
Reported: median with min and max; images/s = images per call / median (nll: images, each
with k samples; sample: images drawn).

Roofline. ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs (convolutions,
matmuls, attention: the ops that do arithmetic at scale; elementwise ops are not counted)
of each task once on the reference model; every provider computes the same function, so
achieved GFLOP/s = those FLOPs / its median (for a provider that skips work, an effective
rate: the reference's work per second). Two peaks: the best rate of square matmuls
(``--peak-sizes``) with the same thread count, in float32 (in bfloat16 for the bf16 rows),
and on CPU the ISA's theoretical fp32 FMA peak, cores x GHz x FMA lanes x 2
(``_harness.fma_peak``: lanes from the ISA, the clock from cpufreq / lscpu / /proc/cpuinfo;
the JSON's ``fma_peak`` records the inputs and assumptions; not given for bf16 rows).
``--no-flops`` skips the counts and both peaks.

Output: the table on stdout, and the report as JSON in ``benchmarks/results/throughput.json``
(``--json PATH`` elsewhere), from which ``benchmarks/RESULTS.md`` is regenerated
(``_harness.save_report``). The JSON holds the run (command, machine, threads, versions,
timestamp), the configuration and ``results``: one object per (model, task) with ``model``,
``task``, ``preset``, ``batch``, ``images_per_s``, ``peak_mem_mb`` and extras (``it_per_s``,
``seconds_median/min/max``, ``warmup_s``, ``first_call_s``, ``gflops``, ...), among them
``first_call_cache``: what torch.compile's caches did in the first call (``_harness.CompileCache``).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import math
import os
import statistics
import sys
import time
import types

import _paths  # noqa: E402,F401  (this checkout's dvpvae first)

import torch  # noqa: E402

import _harness as H  # noqa: E402
from dvpvae import DVPVAE, FastDVPVAE, get_config, set_dct_scale  # noqa: E402
from dvpvae.config import PRECISIONS  # noqa: E402
from dvpvae.ops import get_ops  # noqa: E402

TASKS = ("train", "eval", "nll", "sample")
PROVIDERS = ("DVPVAE", "FastDVPVAE", "official")
# Small sizes: the no-argument run is the README's first command and includes FastDVPVAE's
# torch.compile warm-up.
DEFAULTS = dict(preset="mnist", batch=64, tasks="train,eval,nll,sample", repeats=5, warmup=2,
                k=10, nll_batch=8, sample_n=64)
# FastDVPVAE's constructor flags, forwarded by ``FastDVPVAE.from_reference``.
FAST_FLAGS = ("compile", "fused_kernels", "extension", "cuda_graphs")
# The columns of this benchmark's table in RESULTS.md: (report key, header).
TABLE_COLUMNS = [("model", "model"), ("task", "task"), ("batch", "images/call"),
                 ("images_per_s", "images/s"), ("seconds_median", "median s"), ("seconds_min", "min s"),
                 ("seconds_max", "max s"), ("first_call_s", "first call s"),
                 ("first_call_cache", "compile cache"), ("peak_mem_mb", "peak MB"),
                 ("gflops", "GFLOP/s"), ("fraction_of_peak", "of matmul peak"),
                 ("fraction_of_fma_peak", "of FMA peak"), ("speedup_vs_DVPVAE", "x DVPVAE")]
# A timing of one call shorter than this is repeated back-to-back (``inner`` calls) so that
# the clock and Python overhead do not dominate tiny configurations.
MIN_TIMING_S = 0.05


# ------------------------------------------------------------------ data and models
def make_images(cfg, n: int, seed: int = 0) -> torch.Tensor:
    """n random uint8 images of the preset's shape, mapped to [-1, 1] as the data loaders do."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n,) + tuple(cfg.image_shape), generator=g, dtype=torch.uint8)
    return u8.float() / 127.5 - 1.0


def parse_fast_flags(items) -> dict:
    """``["compile=off", ...]`` -> ``{"compile": False}``; unknown flags and values exit."""
    flags = {}
    for item in items or []:
        name, _, val = item.partition("=")
        if name not in FAST_FLAGS or val not in ("on", "off"):
            raise SystemExit(f"--fast-flag expects NAME=on|off with NAME one of {', '.join(FAST_FLAGS)}; "
                             f"got {item!r}")
        flags[name] = val == "on"
    return flags


class Provider:
    """One implementation: a model for eval/nll/sample and a factory for a training copy."""

    def __init__(self, name, model, make_train, eval_fn, nll_fn, sample_fn):
        self.name = name
        self.model = model
        self.make_train = make_train  # () -> step(x): each call builds an independent copy
        self.eval_fn, self.nll_fn, self.sample_fn = eval_fn, nll_fn, sample_fn


def adamax_for(model, cfg):
    return torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                              weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def fast_name(precision: str) -> str:
    """The provider name of FastDVPVAE computing in ``precision``."""
    return "FastDVPVAE" if precision == "float32" else f"FastDVPVAE-{precision}"


def ours(name, model, ref, cfg, fast_flags):
    """Provider for DVPVAE / FastDVPVAE (same API); ``fast_flags`` None for DVPVAE."""
    model.eval()

    def make_train():
        # Its own copy of the *initial* weights, so that the eval/nll/sample model is not
        # changed by training and the providers do not train each other's weights.
        tm = copy.deepcopy(ref)
        if fast_flags is not None:
            tm = FastDVPVAE.from_reference(tm, **fast_flags)
        tm.train()
        opt = adamax_for(tm, cfg)

        def step(x):
            out = tm(x)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            tm.constrain_()
        return step

    def eval_fn(x):
        with torch.no_grad():
            model(x)

    return Provider(name, model, make_train, eval_fn,
                    lambda x, k: model.estimate_nll(x, k),
                    lambda n: model.sample(n))


# ------------------------------------------------------------------ the research code
# Packages the research code's model/, utils/ and datasets/ import at module level but that
# none of train_step / estimate_nll / generate_x calls (logging, config, data, plotting,
# metrics); tests/official_checkout.py writes a miniature checkout with the same imports.
_STUB_ROOTS = ("wandb", "hydra", "omegaconf", "torchvision", "torchmetrics", "matplotlib", "tqdm",
               "six", "scipy", "PIL")


class _Anything:
    """Stand-in for any attribute of a stubbed package: callable, subclassable, iterable."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return _Anything()

    def __getattr__(self, name):
        return _Anything()

    def __iter__(self):
        return iter(())

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an empty module for ``roots`` and their submodules (``matplotlib.pyplot``)."""

    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        pass


def _install_stubs() -> list[str]:
    missing = []
    for root in _STUB_ROOTS:
        try:
            found = importlib.util.find_spec(root) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(root)
    if missing:
        sys.meta_path.append(_StubFinder(missing))
    return missing


def build_official(path: str, cfg, images: torch.Tensor | None, device: torch.device, seed: int = 0):
    """The research code's CTX_LADDER_VAE for ``cfg``, imported from the checkout at ``path``.

    Its hydra configs are composed by hand from our Config (same field meanings); the
    research code's own init gives the weights (speed does not depend on them) and
    ``images`` its ``dct_scale`` (None: the caller sets it). Returns (model, notes).
    """
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "model")):
        raise ImportError(f"{path} does not look like a dvp_vae checkout (no model/ folder)")
    notes = []
    stubbed = _install_stubs()
    if stubbed:
        notes.append("official: stubbed missing packages " + ",".join(stubbed))
    # Its top-level package names (model, utils, datasets) are generic and may already name
    # other modules here (HuggingFace ``datasets``, say): set those aside while the checkout,
    # first in sys.path, is imported, then put them back. The research modules keep their
    # references to each other, so they need not stay in sys.modules.
    roots = ("model", "utils", "datasets")
    aside = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in roots}
    for root in roots:
        # model/ and utils/ have no __init__.py: as namespace packages they would lose to any
        # regular module of the same name further down sys.path, so bind them here.
        folder = os.path.join(path, root)
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "__init__.py")):
            package = types.ModuleType(root)
            package.__path__ = [folder]
            sys.modules[root] = package
    sys.path.insert(0, path)
    try:
        cvae = importlib.import_module("model.context_ladder_vae")
        enc_mod = importlib.import_module("model.encoder")
        dec_mod = importlib.import_module("model.context_decoder")
        ddgm = importlib.import_module("model.ddgm")
        unet_mod = importlib.import_module("utils.thirdparty.unet")
        dist = importlib.import_module("utils.distribution")
    finally:
        sys.path.remove(path)
        for k in [k for k in sys.modules if k.split(".")[0] in roots]:
            del sys.modules[k]
        sys.modules.update(aside)
    if not hasattr(dist, "one_hot"):
        # MixtureLogistic256.sample calls a ``one_hot`` the research code never defines
        # (NameError on every logistic-mixture forward); supply the obvious one.
        import torch.nn.functional as F

        dist.one_hot = lambda idx, depth, dim=-1, device=None: F.one_hot(idx, depth).movedim(-1, dim).float()
        notes.append("official: defined the missing utils.distribution.one_hot")
    torch.manual_seed(seed)
    c = cfg.image_channels
    unet = unet_mod.UNetModel(image_size=cfg.ctx_size, in_channels=c, out_channels=c,
                              model_channels=cfg.unet_channels, num_res_blocks=cfg.unet_res_blocks,
                              # evaluated by the research code, as its yaml gives it
                              attention_resolutions="tuple([])", dropout=cfg.unet_dropout,
                              channel_mult=(1,), num_heads=cfg.unet_heads, use_scale_shift_norm=True)
    prior = ddgm.DiffusionPrior(model=unet, T=cfg.diffusion_steps,
                                noise_schedule=ddgm.LinearNoiseSchedule(cfg.gamma_min, cfg.gamma_max,
                                                                        train=False),
                                t_sample="uniform", parametrization="eps", ll="gaussian", cont_time=True)

    def common():
        # Fresh lists for every constructor, as hydra gives them: the research decoder
        # reverses latent_scales and latent_width in place.
        return dict(num_ch=cfg.num_ch, scale_ch_mult=cfg.scale_ch_mult, block_ch_mult=cfg.block_ch_mult,
                    data_ch=c, data_dim=cfg.image_size, weight_norm=False, batch_norm=False,
                    latent_scales=list(cfg.latent_scales), latent_width=list(cfg.latent_width),
                    activation=cfg.activation, start_scale_at_x=cfg.start_scale_at_x)

    encoder = enc_mod.SmallLadderEncoder(num_init_blocks=0, num_blocks_per_scale=cfg.enc_blocks_per_scale,
                                         dset="cifar10" if cfg.standardize_input else "mnist", **common())
    decoder = dec_mod.ContextLadderDecoder(num_postprocess_blocks=cfg.num_postprocess_blocks,
                                           likelihood=cfg.likelihood, num_mix=cfg.num_mix,
                                           padding_mode="zeros", num_blocks_per_scale=cfg.dec_blocks_per_scale,
                                           z_L_prior=prior, ctx_type="dct", ctx_size=cfg.ctx_size,
                                           min_logvar=cfg.min_logvar, decoder_res_mode="2x3", **common())
    model = cvae.CTX_LADDER_VAE(encoder, decoder, likelihood=cfg.likelihood, beta_start=cfg.beta,
                                beta_end=cfg.beta, warmup=0, is_k=cfg.is_k,
                                latent_scales=list(cfg.latent_scales))
    if images is not None:
        from dvpvae.dct import compute_dct_scale

        block = model.decoder.decoder_blocks[0]
        block.dct_scale.data = compute_dct_scale(images, cfg.ctx_size, cfg.dct_scale_images)[None].to(
            block.dct_scale)
    # The research code hard-codes 'cuda' as the diffusion sampler's device.
    prior.device = device
    return model.to(device), notes


def official_provider(model, cfg):
    model.eval()
    init_state = copy.deepcopy(model.state_dict())

    def batch(x):
        return [x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)]

    def make_train():
        tm = copy.deepcopy(model)
        tm.load_state_dict(init_state)
        tm.train()
        opt = adamax_for(tm, cfg)

        def step(x):
            loss, _ = tm.train_step(batch(x), mode="train")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def eval_fn(x):
        with torch.no_grad():
            model.train_step(batch(x), mode="test")

    def nll_fn(x, k):
        with torch.no_grad():
            model.estimate_nll(batch(x), k)

    def sample_fn(n):
        with torch.no_grad():
            model.generate_x(n)

    return Provider("official", model, make_train, eval_fn, nll_fn, sample_fn)


def build_providers(args, cfg, images, device) -> tuple[dict, object, list[str]]:
    """{name: Provider} for the requested providers, the reference model, notes."""
    notes = []
    torch.manual_seed(args.seed)
    ref = DVPVAE(cfg).to(device)
    set_dct_scale(ref, images)
    wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
    out = {}
    fast_flags = parse_fast_flags(args.fast_flag)
    if fast_flags:
        notes.append("FastDVPVAE flags: " + ", ".join(f"{k}={v}" for k, v in fast_flags.items()))
    for name in wanted:
        if name == "DVPVAE":
            out[name] = ours(name, ref, ref, cfg, None)
        elif name == "FastDVPVAE":
            for precision in args.precision:
                flags = dict(fast_flags, precision=precision)
                out[fast_name(precision)] = ours(fast_name(precision), FastDVPVAE.from_reference(ref, **flags),
                                                 ref, cfg, flags)
        elif name == "official":
            if not args.official:
                notes.append("official skipped: pass --official PATH (a checkout of AKuzina/dvp_vae)")
                continue
            try:
                model, more = build_official(args.official, cfg, images, device, args.seed)
                notes += more
                out[name] = official_provider(model, cfg)
            except Exception as e:  # any failure of foreign code: report it and go on
                notes.append(f"official skipped: could not build it from {args.official} "
                             f"({type(e).__name__}: {e})")
                print(f"note: official provider unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            raise SystemExit(f"unknown provider {name!r}; choose from {','.join(PROVIDERS)}")
    return out, ref, notes


# ------------------------------------------------------------------ FLOPs
def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def task_flops(ref, cfg, task, data, args) -> int | None:
    """FLOPs of one call of ``task`` on the reference (train: forward + backward, no optimizer).

    Counted with the reference provider: FlopCounterMode sees ATen ops only, not the custom
    ops (C++ prior sampler, convolutions) of the other providers, which compute the same.
    """
    m = ref  # not a copy: nothing here changes the weights (train only leaves grads, cleared below)
    if task == "train":
        def fn():
            m.train()
            try:
                m(data["train"]).loss.backward()
            finally:
                m.eval()
                m.zero_grad(set_to_none=True)
    elif task == "eval":
        def fn():
            with torch.no_grad():
                m(data["eval"])
    elif task == "nll":
        def fn():
            m.estimate_nll(data["nll"], args.k)
    else:
        def fn():
            m.sample(args.sample_n)
    provider, m.ops = m.ops, get_ops("reference")
    try:
        return count_flops(fn)
    except Exception as e:  # the count is an annotation; never lose the timings over it
        print(f"note: FLOP count of {task} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    finally:
        m.ops = provider


# ------------------------------------------------------------------ measurement
def task_callable(prov: Provider, task: str, data: dict, args):
    if task == "train":
        step = prov.make_train()
        x = data["train"]
        return lambda: step(x)
    if task == "eval":
        x = data["eval"]
        return lambda: prov.eval_fn(x)
    if task == "nll":
        x = data["nll"]
        return lambda: prov.nll_fn(x, args.k)
    if task == "sample":
        return lambda: prov.sample_fn(args.sample_n)
    raise ValueError(task)


def images_per_call(task: str, args) -> int:
    return {"train": args.batch, "eval": args.batch, "nll": args.nll_batch, "sample": args.sample_n}[task]


def measure_task(providers: dict, task: str, data: dict, args, device) -> list[dict]:
    """Warm-up, memory probe and interleaved timings of one task for every provider."""
    fns, rows, inner = {}, {}, {}
    for name, prov in providers.items():
        row = dict(model=name, task=task, preset=args.preset, batch=images_per_call(task, args))
        if task == "nll":
            row["k"] = args.k
        rows[name] = row
        try:
            fn = task_callable(prov, task, data, args)
            warm = []
            for i in range(max(1, args.warmup)):
                call = f"{name} {task}: warm-up call {i + 1}/{max(1, args.warmup)}"
                hint = " (a first call includes torch.compile: minutes with a cold cache)" if i == 0 else ""
                with H.Heartbeat(lambda s: _progress(f"{call} running for {s:.0f} s{hint}")), \
                        H.CompileCache() as cache:
                    warm.append(H.time_calls(fn, device))
                _progress(f"{call} took {warm[-1]:.2f} s")
                if i == 0:
                    row["first_call_cache"] = cache.outcome
            row.update(first_call_s=warm[0], warmup_s=sum(warm), warmup_calls=len(warm))
            inner[name] = max(1, math.ceil(MIN_TIMING_S / max(warm[-1], 1e-6)))
            with H.PeakMemory(device) as mem:
                fn()
            row["peak_mem_mb"] = mem.mb
            if mem.peak_rss_mb is not None:
                row["peak_rss_mb"] = mem.peak_rss_mb
            fns[name] = fn
        except Exception as e:  # one broken provider must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"note: {name} {task} failed: {row['error']}", file=sys.stderr)
    names = list(fns)
    times = {n: [] for n in names}
    if names:
        _progress(f"{task}: timing {args.repeats} repeats of {', '.join(names)}")
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for n in order:
            try:
                times[n].append(H.time_calls(fns[n], device, inner[n]))
            except Exception as e:
                rows[n]["error"] = f"{type(e).__name__}: {e}"
                fns.pop(n)
                names.remove(n)
                break
    for n, ts in times.items():
        if not ts or "error" in rows[n]:
            continue
        med = statistics.median(ts)
        rows[n].update(seconds_median=med, seconds_min=min(ts), seconds_max=max(ts), repeats=len(ts),
                       inner=inner[n], it_per_s=1.0 / med, images_per_s=rows[n]["batch"] / med)
    return list(rows.values())


def _progress(msg: str) -> None:
    # stderr, so that the table on stdout stays clean.
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def run(args) -> dict:
    """Run the benchmark described by ``args`` (see ``parse_args``) and return the report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = get_config(args.preset)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {','.join(TASKS)}")
    n_data = max(args.batch, args.nll_batch, 512)
    images = make_images(cfg, n_data, args.seed)
    providers, ref, notes = build_providers(args, cfg, images, device)
    x = images.to(device)
    data = {"train": x[:args.batch], "eval": x[:args.batch], "nll": x[:args.nll_batch]}

    report = dict(benchmark="throughput", **H.machine_info(device))
    rates = H.matmul_rates(device, args.peak_sizes) if args.flops else {}
    peak_n = max(rates, key=rates.get, default=None)
    peak = rates.get(peak_n)
    # The bf16 rows' roofline: the same square matmuls in bfloat16.
    timed_bf16 = args.flops and fast_name("bf16") in providers
    bf16_rates = H.matmul_rates(device, args.peak_sizes, torch.bfloat16) if timed_bf16 else {}
    bf16_peak = max(bf16_rates.values(), default=None)
    fma = H.fma_peak(torch.get_num_threads()) if args.flops and device.type == "cpu" else None
    report.update(matmul_peak_gflops=peak, matmul_peak_n=peak_n, matmul_rates=rates, fma_peak=fma,
                  matmul_peak_bf16_gflops=bf16_peak, matmul_rates_bf16=bf16_rates,
                  config=dict(preset=args.preset, batch=args.batch, tasks=tasks, repeats=args.repeats,
                              warmup=args.warmup, k=args.k, nll_batch=args.nll_batch,
                              sample_n=args.sample_n, providers=list(providers), seed=args.seed,
                              precisions=list(args.precision),
                              min_timing_s=MIN_TIMING_S,
                              loadavg_start=_loadavg()),
                  memory_method=("torch.cuda.max_memory_allocated above the allocation before the call"
                                 if device.type == "cuda" else
                                 "peak process RSS (sampled every 1 ms from /proc/self/statm) above the "
                                 "RSS just before one post-warm-up call, after malloc_trim"),
                  flops={}, results=[], notes=notes)
    for task in tasks:
        rows = measure_task(providers, task, data, args, device)
        if args.flops:
            _progress(f"{task}: counting FLOPs on the reference")
        flops = task_flops(ref, cfg, task, data, args) if args.flops else None
        report["flops"][task] = flops
        base = next((r for r in rows if r["model"] == "DVPVAE" and "seconds_median" in r), None)
        for r in rows:
            if "seconds_median" not in r:
                continue
            if flops:
                r["flops"] = flops
                r["gflops"] = flops / r["seconds_median"] / 1e9
                is_bf16 = r["model"] == fast_name("bf16")
                row_peak = bf16_peak if is_bf16 else peak
                if row_peak:
                    r["fraction_of_peak"] = r["gflops"] / row_peak
                if fma and not is_bf16:  # the FMA peak is float32's
                    r["fraction_of_fma_peak"] = r["gflops"] / fma["gflops"]
            if base is not None:
                r["speedup_vs_DVPVAE"] = base["seconds_median"] / r["seconds_median"]
                # Under contention the fastest repeat is the one least disturbed by other
                # processes: the ratio of minima is the second opinion on the speed-up.
                r["speedup_vs_DVPVAE_of_min"] = base["seconds_min"] / r["seconds_min"]
        report["results"] += rows
    report["config"]["loadavg_end"] = _loadavg()
    return report


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ------------------------------------------------------------------ output
def _f(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"


def print_table(rep: dict) -> None:
    c = rep["config"]
    print(f"device {rep['device']} ({rep['device_name']}), {rep['threads']} threads, torch {rep['torch']}, "
          f"triton {rep['triton']}, {rep['timestamp']}")
    print(f"preset {c['preset']}: batch {c['batch']} (train/eval), nll {c['nll_batch']} images x k={c['k']}, "
          f"sample n={c['sample_n']}; warm-up {c['warmup']} calls, {c['repeats']} repeats; "
          f"load average {_f((c['loadavg_start'] or [None])[0], '.2f')} at start")
    load = max((c["loadavg_start"] or [0])[0], (c.get("loadavg_end") or [0])[0])
    cores = os.cpu_count() or 1
    if rep["device"] == "cpu" and load > 0.5 * cores:
        print(f"warning: the machine is shared (load average up to {load:.1f} on {cores} cores, this run "
              f"included): medians include waiting for the CPU and the min/max spread shows it; the min "
              f"is the closer estimate of uncontended speed (JSON: speedup_vs_DVPVAE_of_min)")
    if rep["matmul_peak_gflops"]:
        rates = ", ".join(f"{n}^3 {g:.1f}" for n, g in rep["matmul_rates"].items())
        print(f"measured fp32 matmul peak: {rep['matmul_peak_gflops']:.1f} GFLOP/s (best of {rates})")
    if rep.get("matmul_peak_bf16_gflops"):
        rates = ", ".join(f"{n}^3 {g:.1f}" for n, g in rep["matmul_rates_bf16"].items())
        print(f"measured bf16 matmul peak: {rep['matmul_peak_bf16_gflops']:.1f} GFLOP/s (best of {rates}); "
              f"the {fast_name('bf16')} rows' %peak is of it")
    fma = rep.get("fma_peak")
    if fma:
        print(f"theoretical fp32 FMA peak ({fma['isa']}): {fma['cores']} cores x {fma['ghz']:.2f} GHz x "
              f"{fma['fma_lanes']} FMA lanes x 2 = {fma['gflops']:.1f} GFLOP/s ({fma['assumption']})")
    for n in rep["notes"]:
        print(f"note: {n}")
    head = (f"{'model':<15} {'task':<6} {'imgs':>5} {'it/s':>8} {'img/s':>9} {'median s':>9} {'min s':>8} "
            f"{'max s':>8} {'first s':>8} {'cache':>6} {'warm-up s':>9} {'peak MB':>8} {'GFLOP/s':>8} "
            f"{'%peak':>6} {'%FMA':>6} {'x DVPVAE':>8}")
    print()
    print(head)
    print("-" * len(head))
    for r in rep["results"]:
        if "seconds_median" not in r:
            print(f"{r['model']:<15} {r['task']:<6} {r['batch']:>5} ERROR {r.get('error', '')[:90]}")
            continue
        pct, pct_fma = r.get("fraction_of_peak"), r.get("fraction_of_fma_peak")
        print(f"{r['model']:<15} {r['task']:<6} {r['batch']:>5} {r['it_per_s']:>8.3f} {r['images_per_s']:>9.2f} "
              f"{r['seconds_median']:>9.3f} {r['seconds_min']:>8.3f} {r['seconds_max']:>8.3f} "
              f"{r['first_call_s']:>8.2f} {r.get('first_call_cache', '-'):>6} {r['warmup_s']:>9.2f} "
              f"{_f(r.get('peak_mem_mb'), '8.1f'):>8} "
              f"{_f(r.get('gflops'), '8.2f'):>8} {_f(None if pct is None else 100 * pct, '6.1f'):>6} "
              f"{_f(None if pct_fma is None else 100 * pct_fma, '6.1f'):>6} "
              f"{_f(r.get('speedup_vs_DVPVAE'), '7.2f') + 'x' if 'speedup_vs_DVPVAE' in r else '-':>8}")
    print()
    print("imgs = images per call (nll: images, each with k importance samples); first s = first call "
          "(includes torch.compile for FastDVPVAE); cache = what the compile caches did in the first call "
          "(none: nothing compiled; hit: every graph loaded from disk; miss: compiled afresh; bypass: a cache "
          "refused a graph, so every process traces it afresh); warm-up s = all warm-up calls; peak MB = "
          + ("peak CUDA allocation above the pre-call allocation" if rep["device"].startswith("cuda") else
             "peak RSS increase during one call (1 ms sampling)")
          + "; GFLOP/s from FlopCounterMode counts (conv/matmul only) of the reference; %peak of the "
          "measured matmul peak, %FMA of the ISA's theoretical FMA peak.")


def _sizes(text: str) -> tuple[int, ...]:
    """A comma list of positive matmul sizes."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive sizes, got {text!r}")
    return sizes


def precision_list(text: str) -> tuple[str, ...]:
    """A comma list of distinct compute precisions of FastDVPVAE."""
    items = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in items if v not in PRECISIONS]
    if not items or bad or len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"expected a comma list of distinct precisions from "
                                         f"{','.join(PRECISIONS)}, got {text!r}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--preset", default=d["preset"], help="mnist, omniglot, cifar10, tiny (default %(default)s)")
    p.add_argument("--batch", type=int, default=d["batch"], help="train/eval batch (default %(default)s)")
    p.add_argument("--tasks", default=d["tasks"], help="comma list of " + ",".join(TASKS))
    p.add_argument("--repeats", type=int, default=d["repeats"], help="timed repeats (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d["warmup"],
                   help="untimed calls per (provider, task) before timing (default %(default)s)")
    p.add_argument("--k", type=int, default=d["k"], help="importance samples for nll (default %(default)s)")
    p.add_argument("--nll-batch", type=int, default=d["nll_batch"], help="images per estimate_nll call "
                   "(default %(default)s)")
    p.add_argument("--sample-n", type=int, default=d["sample_n"], help="images per sample call "
                   "(default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: keep current)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--providers", default="DVPVAE,FastDVPVAE,official",
                   help="comma subset of " + ",".join(PROVIDERS) + " (official needs --official)")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="checkout of the authors' code (AKuzina/dvp_vae) to time as provider 'official'")
    p.add_argument("--fast-flag", action="append", default=[], metavar="NAME=on|off",
                   help="constructor flag of FastDVPVAE (" + ", ".join(FAST_FLAGS) + "), repeatable, "
                        "to measure what each fast path contributes; default: all on")
    p.add_argument("--precision", type=precision_list, default=("float32",), metavar="P[,P]",
                   help="FastDVPVAE's compute precisions, a comma list of " + ",".join(PRECISIONS) + ", one "
                        "FastDVPVAE per precision in the same run (default float32; bf16: bfloat16 "
                        "convolutions and matmuls under autocast, float32 densities)")
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip the FLOP counts and the matmul peak")
    p.add_argument("--peak-sizes", type=_sizes, default=H.PEAK_SIZES, metavar="N,N,...",
                   help="square matmul sizes for the measured peak, the best rate of them "
                        f"(default {','.join(map(str, H.PEAK_SIZES))})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help=H.JSON_HELP)
    args = p.parse_args(argv)
    for name in ("batch", "repeats", "k", "nll_batch", "sample_n"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rep = run(args)
    rep["wall_s"] = time.perf_counter() - t0
    print_table(rep)
    print(f"total wall time {rep['wall_s']:.0f} s")
    H.save_report("throughput", rep, args.json, argv, TABLE_COLUMNS, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
