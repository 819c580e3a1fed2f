"""Time to quality: test -ELBO against training wall-clock seconds, per implementation.

    python benchmarks/convergence.py --data mnist --data-root data --seconds 600
    python benchmarks/convergence.py --data npz --data-root images.npz --steps 300 --eval-every 60 \\
        --providers DVPVAE,FastDVPVAE,official --official ../dvp_vae --batch-size 250

Providers (``--providers``), trained one after the other from the same seed:
  DVPVAE      ``python -m dvpvae.train``'s reference model
  FastDVPVAE  its ``--model fast`` (compile time counts: it is part of time to quality);
              ``--precision float32,bf16`` trains one per precision, ``FastDVPVAE`` (float32)
              and ``FastDVPVAE-bf16`` (the CLI's ``--precision bf16``)
  official    the authors' research model (``--official PATH``, a checkout of AKuzina/dvp_vae,
              loaded as ``benchmarks/throughput.py`` loads it) trained with the same recipe

Every provider trains with the CLI's recipe, through ``dvpvae.train.Trainer`` itself (data
order, Adamax, warm-up + cosine schedule, clipping, skips, EMA): the same config flags as the
CLI (``--batch-size 250 --lr 3e-3 ...``). ``--steps N`` is the CLI's ``--max-steps N`` (also
the schedule's length); with ``--seconds`` alone the schedule is the preset's full one and the
run stops on the clock, as an interrupted CLI run would. The clock counts training steps
only: the test evaluations of the raw and the EMA weights (-ELBO, the eval-mode T-point
bound, on the first ``--eval-images`` test images with the same random draws every time;
with ``--k`` also ``estimate_nll``, for official the research code's estimate) run every
``--eval-every`` seconds of that clock, at 0 and at the end, and are not counted.

Time to quality, for the raw and for the EMA weights: the target is the best -ELBO that every
provider reaches (the largest of their minima); each provider's time is the clock at which
its curve, linearly interpolated between evaluations, first gets there; ``speedup_vs`` gives
the ratios of those times.

Output: a table on stdout, the report as JSON in ``benchmarks/results/convergence.json``
(``--json PATH`` elsewhere; RESULTS.md is regenerated beside it) and a PNG of the curves
beside the JSON (``--png PATH``). JSON keys: ``config``, ``notes``, ``curves`` ({provider:
[{seconds, step, nelbo_raw, nelbo_ema[, nll_raw, nll_ema]}]}), ``time_to_quality`` ({raw|ema:
{target_nelbo, seconds: {provider: s}, speedup_vs: {base: {provider: ratio}}}}), ``results``
(one summary row per provider), ``png``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
import types

import _paths  # noqa: E402,F401  (this checkout's dvpvae first)

import torch  # noqa: E402

import _harness as H  # noqa: E402
import throughput  # noqa: E402
from dvpvae import plotting  # noqa: E402
from dvpvae import train as T  # noqa: E402
from dvpvae.config import PRECISIONS  # noqa: E402
from dvpvae.data import DATASETS, to_float  # noqa: E402

PROVIDERS = ("DVPVAE", "FastDVPVAE", "official")
WEIGHTS = ("raw", "ema")
TABLE_COLUMNS = [("provider", "provider"), ("steps", "steps"), ("train_s", "train s"),
                 ("s_per_step", "s/step"), ("first_step_s", "first step s"),
                 ("s_per_later_step", "s/step after the first"),
                 ("best_nelbo_raw", "best -ELBO raw"), ("best_nelbo_ema", "best -ELBO EMA"),
                 ("seconds_to_target_raw", "s to target raw"), ("speedup_vs_DVPVAE_raw", "x DVPVAE raw"),
                 ("seconds_to_target_ema", "s to target EMA"), ("speedup_vs_DVPVAE_ema", "x DVPVAE EMA")]


def _progress(msg: str) -> None:
    print(f"[convergence] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the research model
class OfficialModel(torch.nn.Module):
    """The research model behind the interface ``Trainer`` and the evaluation use.

    ``forward(x)`` returns loss (bits/dim of mean(rec + beta * kl)), rec (N,), kl (N, L) and
    elbo (N,) in nats from one research forward pass (train mode: one random diffusion
    time, eval mode: its T-point bound). ``dct_scale`` is the research buffer (a view), so
    ``dvpvae.set_dct_scale`` sets it. The research code clamps the pseudoinput log-variance
    inside its forward, so ``constrain_`` has nothing to do.
    """

    def __init__(self, net: torch.nn.Module, config):
        super().__init__()
        self.net = net
        self.config = config
        self.validate_inputs = False

    @property
    def bits_per_nat(self) -> float:
        return 1.0 / (math.log(2) * math.prod(self.config.image_shape))

    @property
    def dct_scale(self) -> torch.Tensor:
        return self.net.decoder.decoder_blocks[0].dct_scale[0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def constrain_(self) -> None:
        pass

    def _batch(self, x):
        return [x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)]

    def forward(self, x: torch.Tensor):
        fwd = self.net(self._batch(x), mode="train" if self.training else "test")
        rec = -self.net.eval_log_p_x(fwd[1], x)
        kl = self.net.kl(fwd)[0]
        loss = (rec.mean() + self.config.beta * kl.sum(1).mean()) * self.bits_per_nat
        return types.SimpleNamespace(loss=loss, rec=rec, kl=kl, elbo=-(rec + kl.sum(1)))

    @torch.no_grad()
    def estimate_nll(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.net.estimate_nll(self._batch(x), k)[0]


def _official_builder(args, notes: list):
    """A ``Trainer`` model builder giving the research model: the rest of the recipe stays the CLI's."""
    def build(config, *kind_and_options):
        net, more = throughput.build_official(args.official, config, None, torch.device(args.device),
                                              config.seed)
        notes.extend(more)
        return OfficialModel(net, config)
    return build


def cli_model(provider: str) -> list[str]:
    """The CLI's --model (and --precision) options that train ``provider``'s model."""
    fast = {throughput.fast_name(p): p for p in PRECISIONS}
    if provider in fast:
        return ["--model", "fast", "--precision", fast[provider]]
    return ["--model", "reference"]  # DVPVAE, and official's recipe (its model comes from build)


def make_trainer(provider: str, args, out: str, notes: list):
    argv = ["--preset", args.preset, "--data-root", args.data_root, "--out", out, "--device", args.device]
    argv += cli_model(provider)
    argv += ["--data", args.data] if args.data else []
    argv += ["--max-steps", str(args.steps)] if args.steps else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--no-download"] if args.no_download else []
    targs = T.build_parser().parse_args(argv)
    for name, value in T.config_overrides(args).items():
        setattr(targs, f"cfg_{name}", value)
    if provider == "official":
        trainer = T.Trainer(targs, build=_official_builder(args, notes))
    else:
        trainer = T.Trainer(targs)
    if len(trainer.train_iter) == 0:
        raise SystemExit(f"{trainer.data_name}: fewer training images than one batch of "
                         f"{trainer.config.batch_size}")
    return trainer


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def mean_bound(model, images: torch.Tensor, batch_size: int, seed: int, k: int | None) -> dict:
    """Mean -ELBO (and with ``k`` the mean NLL estimate) in nats over ``images``, with the same
    random draws on every call; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    nelbo = nll = 0.0
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            nelbo += float(-model(x).elbo.sum())
            if k:
                nll += float(model.estimate_nll(x, k).sum())
    model.train(was_training)
    out = {"nelbo": nelbo / len(images)}
    if k:
        out["nll"] = nll / len(images)
    return out


def evaluate(trainer, images, args) -> dict:
    row = {}
    for weights, model in (("raw", trainer.model), ("ema", trainer.ema.module)):
        for key, v in mean_bound(model, images, trainer.config.test_batch_size, trainer.config.seed,
                                 args.k).items():
            row[f"{key}_{weights}"] = v
    return row


# ------------------------------------------------------------------ training
def train_provider(provider: str, args, notes: list, eta) -> tuple[list[dict], dict]:
    """Train ``provider`` for the budget; returns (curve, summary row)."""
    with tempfile.TemporaryDirectory(prefix="convergence-") as out:
        trainer = make_trainer(provider, args, out, notes)
    images = to_float(torch.from_numpy(trainer.data.split("test")[:args.eval_images])).to(trainer.device)
    limit_s = args.seconds or math.inf
    limit_steps = args.steps or math.inf
    curve, clock, first_step_s = [], 0.0, None

    def record():
        with H.Heartbeat(lambda s: _progress(f"{provider}: evaluating at step {trainer.step} for {s:.0f} s "
                                             "(the first evaluation compiles FastDVPVAE's pass)")):
            point = dict(seconds=clock, step=trainer.step, **evaluate(trainer, images, args))
        curve.append(point)
        _progress(f"{provider}: step {trainer.step}, {clock:.0f} s: -ELBO raw {point['nelbo_raw']:.2f}, "
                  f"EMA {point['nelbo_ema']:.2f} nats; {eta(provider, clock, trainer.step)}")

    record()
    next_eval = args.eval_every
    epoch = 0
    while clock < limit_s and trainer.step < limit_steps:
        for x in trainer.train_iter.iterate(epoch):
            t0 = time.perf_counter()
            # FastDVPVAE's first step compiles: minutes with a cold cache.
            with (H.Heartbeat(lambda s: _progress(f"{provider}: first training step running for {s:.0f} s "
                                                  "(includes torch.compile for FastDVPVAE)"))
                  if first_step_s is None else contextlib.nullcontext()):
                trainer.train_step(x)
            H.sync(trainer.device)
            dt = time.perf_counter() - t0
            trainer.step += 1
            clock += dt
            first_step_s = dt if first_step_s is None else first_step_s
            if clock >= limit_s or trainer.step >= limit_steps:
                break
            if clock >= next_eval:
                record()
                next_eval = (math.floor(clock / args.eval_every) + 1) * args.eval_every
        epoch += 1
    record()
    later_steps = trainer.step - 1
    summary = dict(provider=provider, steps=trainer.step, train_s=clock, s_per_step=clock / max(trainer.step, 1),
                   first_step_s=first_step_s,
                   # without the first step, which holds FastDVPVAE's compile
                   s_per_later_step=(clock - first_step_s) / later_steps if later_steps > 0 else None,
                   num_parameters=trainer.model.num_parameters(), eval_images=len(images))
    for w in WEIGHTS:
        finite = [p[f"nelbo_{w}"] for p in curve if math.isfinite(p[f"nelbo_{w}"])]
        summary[f"final_nelbo_{w}"] = curve[-1][f"nelbo_{w}"]
        summary[f"best_nelbo_{w}"] = min(finite) if finite else None
    return curve, summary


def seconds_to(curve: list[dict], key: str, target: float) -> float | None:
    """The clock at which ``curve[key]`` first reaches ``target`` (linear between evaluations)."""
    prev = None
    for p in curve:
        v = p[key]
        if not math.isfinite(v):
            prev = None
            continue
        if v <= target:
            if prev is None or prev[key] == v:
                return p["seconds"]
            frac = (prev[key] - target) / (prev[key] - v)
            return prev["seconds"] + frac * (p["seconds"] - prev["seconds"])
        prev = p
    return None


def _ratio(a, b):
    return a / b if a is not None and b else None


def time_to_quality(curves: dict) -> dict:
    """{raw|ema: {target_nelbo, seconds, speedup_vs}} (see the module docstring)."""
    out = {}
    for w in WEIGHTS:
        key = f"nelbo_{w}"
        best = {p: min((q[key] for q in c if math.isfinite(q[key])), default=None) for p, c in curves.items()}
        reached = [v for v in best.values() if v is not None]
        if not reached:
            out[w] = dict(target_nelbo=None, seconds={}, speedup_vs={})
            continue
        target = max(reached)
        secs = {p: seconds_to(c, key, target) for p, c in curves.items()}
        ratios = {b: {p: _ratio(secs[b], s) for p, s in secs.items()} for b in secs}
        out[w] = dict(target_nelbo=target, seconds=secs, speedup_vs=ratios)
    return out


# ------------------------------------------------------------------ output
def plot_title(rep: dict) -> str:
    c = rep["config"]
    data = os.path.basename(c["data_root"]) if c["data"] == "npz" else c["data"]
    return f"preset {c['preset']} on {data}, {rep['threads']} threads, {rep['cpu']}"


def save_plot(curves: dict, ttq: dict, path: str, title: str) -> str:
    plt = plotting._pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (prov, curve) in enumerate(curves.items()):
        color = f"C{i}"
        secs = [p["seconds"] for p in curve]
        ax.plot(secs, [p["nelbo_raw"] for p in curve], color=color, marker="o", ms=3, label=f"{prov} raw")
        ax.plot(secs, [p["nelbo_ema"] for p in curve], color=color, ls="--", label=f"{prov} EMA")
    for w, ls in (("raw", ":"), ("ema", "-.")):
        if ttq[w]["target_nelbo"] is not None:
            ax.axhline(ttq[w]["target_nelbo"], color="gray", ls=ls, lw=0.8, label=f"target ({w})")
    # The bound at initialisation is far above the rest: the axis spans the later points, on a
    # log scale so that both the first drop and the gaps near the target show.
    later = [v for c in curves.values() for p in c[1:] for v in (p["nelbo_raw"], p["nelbo_ema"])
             if math.isfinite(v) and v > 0]
    if later:
        ax.set_yscale("log")
        ax.set_ylim(min(later) / 1.03, max(later) * 1.03)
        for axis_ticks in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_ticks(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("training wall-clock [s] (evaluation excluded)")
    ax.set_ylabel("test -ELBO [nats]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _f(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def print_table(rep: dict) -> None:
    c = rep["config"]
    print(f"{rep['cpu'] if rep['device'] == 'cpu' else rep['device_name']} ({rep['isa']}), {rep['threads']} threads, "
          f"torch {rep['torch']}; preset {c['preset']} on {c['data']}, budget "
          f"{c['seconds'] or '-'} s / {c['steps'] or '-'} steps per provider")
    for n in rep["notes"]:
        print(f"note: {n}")
    head = f"{'provider':<15} {'steps':>6} {'train s':>8} {'s/step':>7} {'later':>7} {'best raw':>9} {'best EMA':>9} " \
           f"{'s->tgt raw':>10} {'s->tgt EMA':>10}"
    print(head)
    print("-" * len(head))
    for r in rep["results"]:
        print(f"{r['provider']:<15} {r['steps']:>6} {r['train_s']:>8.1f} {r['s_per_step']:>7.3f} "
              f"{_f(r['s_per_later_step'], '7.3f'):>7} "
              f"{_f(r['best_nelbo_raw'], '9.3f'):>9} {_f(r['best_nelbo_ema'], '9.3f'):>9} "
              f"{_f(r['seconds_to_target_raw'], '10.1f'):>10} {_f(r['seconds_to_target_ema'], '10.1f'):>10}")
    for w in WEIGHTS:
        for base, ratios in rep["time_to_quality"][w]["speedup_vs"].items():
            pairs = ", ".join(f"{p} {_f(r, '.2f')}x" for p, r in ratios.items() if p != base)
            if pairs:
                print(f"time to quality ({w}) vs {base}: {pairs}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default="DVPVAE,FastDVPVAE",
                   help="comma subset of " + ",".join(PROVIDERS) + " (official needs --official)")
    p.add_argument("--official", default=None, metavar="PATH", help="checkout of AKuzina/dvp_vae")
    p.add_argument("--precision", type=throughput.precision_list, default=("float32",), metavar="P[,P]",
                   help="FastDVPVAE's compute precisions, a comma list of " + ",".join(PRECISIONS) + ", one "
                        "FastDVPVAE trained per precision (default float32)")
    p.add_argument("--preset", default="mnist", help="mnist, omniglot, cifar10, tiny (default %(default)s)")
    p.add_argument("--data", choices=DATASETS, default=None, help="default: the preset's dataset")
    p.add_argument("--data-root", default="data", help="dataset folder, or the .npz file (default %(default)s)")
    p.add_argument("--no-download", action="store_true", help="never download missing dataset files")
    p.add_argument("--seconds", type=float, default=None, help="training clock budget per provider")
    p.add_argument("--steps", type=int, default=None, help="step budget per provider (the CLI's --max-steps)")
    p.add_argument("--eval-every", type=float, default=None,
                   help="seconds of training clock between evaluations (default: a tenth of --seconds)")
    p.add_argument("--eval-images", type=int, default=1000, help="test images evaluated (default %(default)s)")
    p.add_argument("--k", type=int, default=None, help="also estimate the NLL with k importance samples")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: keep)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, metavar="PATH", help=H.JSON_HELP)
    p.add_argument("--png", default=None, metavar="PATH", help="the plot (default: beside the JSON)")
    T.add_config_flags(p)
    args = p.parse_args(argv)
    if args.seconds is None and args.steps is None:
        p.error("give a budget: --seconds and/or --steps")
    for name in ("seconds", "steps", "eval_every", "eval_images", "k"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.eval_every is None:
        if args.seconds is None:
            p.error("--steps alone needs --eval-every SECONDS")
        args.eval_every = args.seconds / 10
    args.providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    unknown = [s for s in args.providers if s not in PROVIDERS]
    if unknown or not args.providers:
        p.error(f"--providers: choose from {','.join(PROVIDERS)}, got {','.join(args.providers) or 'none'}")
    if "official" in args.providers and not args.official:
        p.error("provider official needs --official PATH (a checkout of AKuzina/dvp_vae)")
    args.providers = [q for name in args.providers
                      for q in ([throughput.fast_name(x) for x in args.precision] if name == "FastDVPVAE" else [name])]
    return args


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    notes, curves, rows = [], {}, []
    start = time.perf_counter()

    def eta(provider, clock, step):
        # The training clock left (a step budget at this provider's s/step so far, for it
        # and for every provider after it), times wall seconds per clock second so far.
        limits = [args.seconds] if args.seconds else []
        if args.steps and step:
            limits.append(args.steps * clock / step)
        if not limits:
            return "ETA after the first steps"
        full = min(limits)
        later = len(args.providers) - args.providers.index(provider) - 1
        trained = sum(r["train_s"] for r in rows) + clock
        wall_per_clock = (time.perf_counter() - start) / trained if trained > 0 else 1.0
        return f"ETA {(max(full - clock, 0.0) + later * full) * wall_per_clock:.0f} s"

    for provider in args.providers:
        _progress(f"{provider}: building the trainer")
        curve, row = train_provider(provider, args, notes, eta)
        curves[provider], rows = curve, rows + [row]
    ttq = time_to_quality(curves)
    for w in WEIGHTS:
        t = ttq[w]
        if t["target_nelbo"] is not None:
            times = ", ".join(f"{p} {_f(s, '.1f')} s" for p, s in t["seconds"].items())
            notes.append(f"time to quality, {w} weights: target -ELBO {t['target_nelbo']:.3f} nats "
                         f"reached after {times} of training")
    for row in rows:
        for w in WEIGHTS:
            row[f"seconds_to_target_{w}"] = ttq[w]["seconds"].get(row["provider"])
            if "DVPVAE" in curves:
                row[f"speedup_vs_DVPVAE_{w}"] = ttq[w]["speedup_vs"]["DVPVAE"].get(row["provider"])
    cfg = {k: getattr(args, k) for k in ("preset", "data", "data_root", "providers", "seconds", "steps", "eval_every",
                                         "eval_images", "k")}
    cfg["precisions"] = list(args.precision)
    cfg["data"] = cfg["data"] or T.get_config(args.preset).dataset
    cfg["config_overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in T.config_overrides(args).items()}
    return dict(benchmark="convergence", **H.machine_info(args.device), config=cfg, notes=notes,
                curves=curves, time_to_quality=ttq, results=rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    rep = run(args)
    json_path = args.json or os.path.join(H.RESULTS_DIR, "convergence.json")
    rep["png"] = save_plot(rep["curves"], rep["time_to_quality"], args.png or os.path.splitext(json_path)[0] + ".png",
                           plot_title(rep))
    print_table(rep)
    H.save_report("convergence", rep, json_path, argv, TABLE_COLUMNS, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
