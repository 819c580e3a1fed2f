"""Export a run's weights as a hub-style folder: ``python -m dvpvae.export RUN OUT``.

RUN is a run folder (its best checkpoint by validation loss, else the latest) or one
checkpoint folder; the EMA weights by default (``--no-ema``: the trained weights). OUT
receives config.json, model.safetensors and a model card (``DVPVAE.save_pretrained``):
``DVPVAE.from_pretrained(OUT)``, ``FastDVPVAE.from_pretrained(OUT)`` and
``python -m dvpvae.evaluate OUT`` read it, and ``push_to_hub`` uploads it.
"""
from __future__ import annotations

import argparse
import os
import sys

from dvpvae.checkpoint import CheckpointError, CheckpointManager, load_model, resolve, weights_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dvpvae.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="a run folder or a checkpoint folder")
    p.add_argument("out", metavar="OUT", help="the folder to write (replaced if it holds an earlier export)")
    p.add_argument("--no-ema", action="store_true", help="export the trained weights instead of the EMA")
    return p


def describe(path: str, ckpt: str) -> str:
    """Why ``resolve(path)`` picked ``ckpt``."""
    if os.path.abspath(path) == os.path.abspath(ckpt):
        return "the folder given"
    mgr = CheckpointManager(os.path.dirname(ckpt))
    if os.path.abspath(mgr.best() or "") == os.path.abspath(ckpt):
        return f"the best checkpoint, validation loss {mgr.best_info()['val_loss']:.6g}"
    return "the latest checkpoint (no best one recorded)"


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints what it exported and returns 0."""
    args = build_parser().parse_args(argv)
    try:
        ckpt = resolve(args.run)
        weights = weights_file(ckpt, use_ema=not args.no_ema)
        model = load_model(ckpt, use_ema=not args.no_ema)
        why = describe(args.run, ckpt)
        model.save_pretrained(args.out)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    kind = "EMA" if os.path.basename(weights) == "ema.safetensors" else "trained"
    note = "" if kind == "EMA" or args.no_ema else " (the folder holds no EMA)"
    print(f"exported the {kind} weights{note} of {ckpt} ({why}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
