"""Evaluate a trained DVP-VAE: ``python -m dvpvae.evaluate RUN_DIR_OR_CHECKPOINT ...``.

Reports, on the validation or test split and with the EMA weights, the estimates below with
their standard errors over images, the effective sample size of the importance weights and
the fraction of active units; saves sample grids at temperatures 1.0, 0.8 and 0.6.

Result keys (``--json``); every estimate NAME comes as NAME (nats per image, the mean over
images), NAME_se (standard error of that mean: sample std over images / sqrt(images); None
for one image), NAME_bpd and NAME_bpd_se (the same in bits per dimension):

* ``nelbo``: the negative ELBO of the eval-mode forward pass, the training objective's
  estimate (-log p(u) by one draw of the T-point diffusion bound, the ladder latents by
  their analytic KL). An ELBO.
* ``nll``: importance-sampled -log p(x) with k samples (``DVPVAE.estimate_nll``, estimator
  "trajectory"): u's forward diffusion trajectory is a latent too, so exp(-nll) is unbiased
  for p(x) of the T-step model ``sample`` draws from, and the estimate is an upper bound on
  its -log p(x) in expectation (MODEL.md section 7). An IS estimate.
* ``nelbo_trajectory``: the negative ELBO of that T-step model, -(mean of the k log weights
  of ``nll``); ``nll`` is below it for every image, by what the k samples gain over one.
  With few diffusion steps the T-step model is worse than the T-point bound suggests, so
  this (and ``nll``) can exceed ``nelbo``.
* ``nll_bound_plugin``: the same samples with one draw of the T-point bound in place of
  log p(u) (estimator "bound_plugin", the research code's estimate): neither unbiased nor
  a bound. Reported for comparison with published numbers.

``kinds`` maps each estimate to "ELBO", "IS" or "IS, plug-in bound (not valid)"; NAME_ess_mean
and NAME_ess_min (the IS estimates) are the mean and minimum over images of the effective
sample size (sum w)^2 / sum w^2 of an image's k weights (between 1 and k; near 1, one
sample dominates and the estimate is close to its best sample's ELBO). Also: ``k``,
``num_images``, ``active_units`` (> 0.01), ``active_units_0.001``, ``split``, ``data``,
``checkpoint``, ``seconds`` and the sample grids' paths (``samples``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from dvpvae import plotting
from dvpvae.cli import add_model_options, check_common_args
from dvpvae.checkpoint import CheckpointError, atomic_write, load_model, read_config, resolve
from dvpvae.data import DATASETS, load_dataset, to_float
from dvpvae.model import importance_nll

TEMPERATURES = (1.0, 0.8, 0.6)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dvpvae.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder (best, else latest checkpoint), a checkpoint folder, or "
                        "exported weights (config.json + model.safetensors)")
    p.add_argument("--data", choices=DATASETS, default=None, help="default: the run's dataset")
    p.add_argument("--data-root", default=None, help="default: the run's --data-root")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="npz: validation fraction (default: the run's, else 0.1)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--k", type=int, default=None, help="importance samples per image (default: the config's is_k)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: test_batch_size)")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="image-samples per forward pass of the importance sampler")
    add_model_options(p)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=64, help="images per sample grid")
    p.add_argument("--prior-steps", type=_positive_int, default=None, metavar="S",
                   help="ancestral steps of the diffusion prior for the sample grids (default: its T)")
    p.add_argument("--layer-grid", action="store_true",
                   help=f"also write layer_grid.png: a row per image (the first {LAYER_GRID_ROWS}), columns "
                        "x, the image of u's posterior mean, then u and the top k = 0 ... L ladder latents "
                        "from the posterior with the rest drawn from the prior")
    p.add_argument("--out-dir", default=None, help="where PNGs go (default: <path>/eval)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


LAYER_GRID_ROWS = 8


@torch.no_grad()
def save_layer_grid(model, images, path: str) -> str:
    """What each layer encodes, as a PNG at ``path``: a row per image (the first
    ``LAYER_GRID_ROWS`` of uint8 ``images``), columns x, the image of u's posterior mean (its
    DCT context), then ``model.reconstruct`` with keep = k for k = 0 ... L (u and the top k
    ladder latents from the posterior, the others drawn from the prior), from one encoding."""
    model.eval()
    x = to_float(torch.from_numpy(images[:LAYER_GRID_ROWS]).to(next(model.parameters()).device))
    latents = model.encode(x)
    columns = [("x", x), ("u", latents.context)]
    columns += [(f"k={k}", model.decode(latents.samples(k)).images) for k in range(len(latents.ladder) + 1)]
    return plotting.save_labelled_grid(columns, path)


def check_args(args: argparse.Namespace) -> None:
    """Reject bad command-line values before any work starts (a one-line SystemExit): sizes
    below 1, a missing data root, a path that holds no readable checkpoint config."""
    fail = check_common_args(args, "dvpvae-evaluate",
                             ("k", "max_images", "batch_size", "chunk_size", "num_samples", "threads"))
    try:
        read_config(resolve(args.path))
    except CheckpointError as e:
        fail(e)


def _run_args(ckpt_dir: str) -> dict:
    """The training args recorded in run.json of the run that holds ``ckpt_dir``, if any."""
    for d in (ckpt_dir, os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir)))):
        p = os.path.join(d, "run.json")
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f).get("args", {})
    return {}


# Reported estimate -> its kind (the module docstring says what each one is).
ESTIMATES = {"nelbo": "ELBO", "nelbo_trajectory": "ELBO", "nll": "IS",
             "nll_bound_plugin": "IS, plug-in bound (not valid)"}
# IS estimate -> the estimator of DVPVAE.estimate_nll whose log weights give it.
IS_ESTIMATES = {"nll": "trajectory", "nll_bound_plugin": "bound_plugin"}


def standard_error(values: torch.Tensor) -> float | None:
    """Standard error of the mean of per-image values: sample std / sqrt(n); None for n = 1."""
    n = values.numel()
    return float(values.double().std() / math.sqrt(n)) if n > 1 else None


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 of each image's importance weights, from log weights (k, N)."""
    log_w = log_w.double()
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))


@torch.no_grad()
def evaluate(model, images, k: int, batch_size: int, chunk_size: int, progress: bool = True) -> dict:
    """The ``ESTIMATES`` of ``model`` on uint8 ``images`` with standard errors, effective
    sample sizes and active units (keys: the module docstring). Both IS estimates come from
    one importance-sampling pass; progress is shown per pass of up to ``chunk_size``
    image-samples."""
    from tqdm import tqdm

    model.eval()
    n = len(images)
    xs = torch.from_numpy(images)
    dev = next(model.parameters()).device
    passes = sum(math.ceil(k / max(1, chunk_size // len(xs[s:s + batch_size]))) for s in range(0, n, batch_size))
    if progress:
        print(f"{n} images x k={k} importance samples = {n * k} image-samples in {passes} passes",
              file=sys.stderr, flush=True)
    bar = tqdm(total=n * k, unit="image-sample", unit_scale=True, desc="ELBO + IS", disable=not progress)

    def tick(rows):
        bar.update(rows)
        bar.set_postfix_str(f"{bar.n / k / max(bar.format_dict['elapsed'], 1e-9):.2f} images/s")

    per_image = {name: [] for name in ESTIMATES}
    ess = {name: [] for name in IS_ESTIMATES}
    for start in range(0, n, batch_size):
        x = to_float(xs[start:start + batch_size].to(dev))
        per_image["nelbo"].append(-model(x).elbo.double().cpu())
        log_w = {est: lw.double().cpu() for est, lw in
                 model.importance_log_weights(x, k, chunk_size, progress=tick).items()}
        per_image["nelbo_trajectory"].append(-log_w["trajectory"].mean(0))
        for name, estimator in IS_ESTIMATES.items():
            per_image[name].append(importance_nll(log_w[estimator]))
            ess[name].append(effective_sample_size(log_w[estimator]))
    bar.close()
    au = model.active_units(to_float(xs.to(dev)), batch_size=batch_size)
    res = {"k": k, "num_images": n, "kinds": dict(ESTIMATES)}
    for name, values in per_image.items():
        values = torch.cat(values)
        mean, se = float(values.mean()), standard_error(values)
        res.update({name: mean, f"{name}_se": se, f"{name}_bpd": mean * model.bits_per_nat,
                    f"{name}_bpd_se": None if se is None else se * model.bits_per_nat})
    for name, values in ess.items():
        values = torch.cat(values)
        res.update({f"{name}_ess_mean": float(values.mean()), f"{name}_ess_min": float(values.min())})
    res.update({"active_units": float(au[0.01]), "active_units_0.001": float(au[0.001])})
    return res


def format_table(res: dict) -> str:
    """The results as an aligned text table: value +- standard error in nats and bits/dim."""
    def pm(value, se, digits):
        return f"{value:.{digits}f}" + ("" if se is None else f" +- {se:.{digits}f}")

    k = res["k"]
    labels = {"nelbo": "negative ELBO", "nelbo_trajectory": f"negative ELBO, T-step model (k={k})",
              "nll": f"NLL (IS, k={k})", "nll_bound_plugin": f"NLL, plug-in bound (k={k}, not valid)"}
    rows = [("estimate", "nats / image", "bits / dim", "")]
    for name, label in labels.items():
        note = (f"ESS mean {res[f'{name}_ess_mean']:.2f}, min {res[f'{name}_ess_min']:.2f} of {k}"
                if f"{name}_ess_mean" in res else res["kinds"][name])
        rows.append((label, pm(res[name], res[f"{name}_se"], 3),
                     pm(res[f"{name}_bpd"], res[f"{name}_bpd_se"], 4), note))
    rows += [("active units", f"{res['active_units']:.3f} (>0.01)", f"{res['active_units_0.001']:.3f} (>0.001)", ""),
             ("images", f"{res['num_images']} ({res['split']})", "", "")]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d}".rstrip() for a, b, c, d in rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the table and returns 0."""
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = resolve(args.path)
    config = read_config(ckpt)
    run = _run_args(ckpt)
    data_name = args.data or run.get("data") or config.dataset
    data_root = args.data_root or run.get("data_root") or "data"
    model = load_model(ckpt, kind=args.model, use_ema=not args.no_ema, device=device, precision=args.precision)
    model.validate_inputs = False
    val_fraction = args.val_fraction or run.get("val_fraction") or 0.1
    data = load_dataset(data_name, data_root, val_size=config.val_size, val_fraction=val_fraction,
                        download_ok=not args.no_download)
    images = data.split(args.split)
    if tuple(images.shape[1:]) != config.image_shape:
        raise SystemExit(f"{data_name} images are {tuple(images.shape[1:])}, the model expects "
                         f"{config.image_shape}")
    if args.max_images:
        images = images[:args.max_images]

    torch.manual_seed(args.seed)
    t0 = time.time()
    res = evaluate(model, images, args.k or config.is_k, args.batch_size or config.test_batch_size, args.chunk_size)
    res.update(split=args.split, data=data_name, checkpoint=os.path.abspath(ckpt),
               seconds=time.time() - t0)

    out_dir = args.out_dir or os.path.join(args.path if os.path.isdir(args.path)
                                           else os.path.dirname(args.path), "eval")
    samples = {}
    for t in TEMPERATURES:
        torch.manual_seed(args.seed)
        x = model.sample(args.num_samples, temperature=t, prior_steps=args.prior_steps)
        samples[str(t)] = plotting.save_image_grid(x, os.path.join(out_dir, f"samples_t{t:.1f}.png"))
    res["samples"] = samples
    res["prior_steps"] = args.prior_steps or config.diffusion_steps
    if args.layer_grid:
        torch.manual_seed(args.seed)
        res["layer_grid"] = save_layer_grid(model, images, os.path.join(out_dir, "layer_grid.png"))

    print(format_table(res))
    if args.json:
        atomic_write(args.json, json.dumps(res, indent=1) + "\n")
    if not all(math.isfinite(res[k]) for k in ("nelbo", "nll")):
        print("warning: non-finite results", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
