"""Evaluate a trained DVP-VAE: ``python -m dvpvae.evaluate RUN_DIR_OR_CHECKPOINT ...``.

Reports, on the validation or test split and with the EMA weights: the negative ELBO
(eval-mode T-point diffusion bound), the importance-sampled NLL with K samples (MODEL.md
section 7), bits/dim of the NLL, and the fraction of active units; saves sample grids at
temperatures 1.0, 0.8 and 0.6. All per-image values are nats unless they say bpd.
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
from dvpvae.checkpoint import atomic_write, load_model, read_config, resolve
from dvpvae.data import DATASETS, load_dataset, to_float

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
    p.add_argument("--model", choices=("reference", "fast"), default="reference")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=64, help="images per sample grid")
    p.add_argument("--out-dir", default=None, help="where PNGs go (default: <path>/eval)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    return p


def _run_args(ckpt_dir: str) -> dict:
    """The training args recorded in run.json of the run that holds ``ckpt_dir``, if any."""
    for d in (ckpt_dir, os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir)))):
        p = os.path.join(d, "run.json")
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f).get("args", {})
    return {}


@torch.no_grad()
def evaluate(model, images, k: int, batch_size: int, chunk_size: int, progress: bool = True) -> dict:
    """nelbo, nll (nats/image), bpd and active units of ``model`` on uint8 ``images``."""
    from tqdm import tqdm

    model.eval()
    n = len(images)
    nelbo = nll = 0.0
    xs = torch.from_numpy(images)
    dev = next(model.parameters()).device
    for start in tqdm(range(0, n, batch_size), desc=f"ELBO + NLL (k={k})", disable=not progress):
        x = to_float(xs[start:start + batch_size].to(dev))
        nelbo += float(-model(x).elbo.sum())
        nll += float(model.estimate_nll(x, k=k, chunk_size=chunk_size).sum())
    au = model.active_units(to_float(xs.to(dev)), batch_size=batch_size)
    nelbo, nll = nelbo / n, nll / n
    return {"nelbo": nelbo, "nll": nll, "bpd": nll * model.bits_per_nat,
            "nelbo_bpd": nelbo * model.bits_per_nat,
            "active_units": float(au[0.01]), "active_units_0.001": float(au[0.001]),
            "k": k, "num_images": n}


def format_table(res: dict) -> str:
    rows = [("negative ELBO", f"{res['nelbo']:.3f} nats", f"{res['nelbo_bpd']:.4f} bpd"),
            (f"NLL (IS, k={res['k']})", f"{res['nll']:.3f} nats", f"{res['bpd']:.4f} bpd"),
            ("active units", f"{res['active_units']:.3f} (>0.01)",
             f"{res['active_units_0.001']:.3f} (>0.001)"),
            ("images", f"{res['num_images']} ({res['split']})", "")]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the table and returns 0."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.k is not None and args.k <= 0:
        raise SystemExit(f"--k must be positive, got {args.k}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = resolve(args.path)
    config = read_config(ckpt)
    run = _run_args(ckpt)
    data_name = args.data or run.get("data") or config.dataset
    data_root = args.data_root or run.get("data_root") or "data"
    model = load_model(ckpt, kind=args.model, use_ema=not args.no_ema, device=device)
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
        x = model.sample(args.num_samples, temperature=t)
        samples[str(t)] = plotting.save_image_grid(x, os.path.join(out_dir, f"samples_t{t:.1f}.png"))
    res["samples"] = samples

    print(format_table(res))
    if args.json:
        atomic_write(args.json, json.dumps(res, indent=1) + "\n")
    if not all(math.isfinite(res[k]) for k in ("nelbo", "nll")):
        print("warning: non-finite results", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
